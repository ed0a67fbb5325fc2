"""Methods (docs/methods.md) against the real tritonserver 2.51 and the HTTP frontend, on the tiny streaming test
model converted once by tools/convert.py (with the ChatML template: the example asks for a chat) with two methods:
the example client_examples/methods/summarize.py and a `broken` one whose functions fail on request. Through every
door that names a model:

- tritonclient's gRPC stream on NAME_METHOD: the raw pieces are the LLM's own greedy text for the prompt
  preprocess made, and the last response carries postprocess's dict (method_output); not streamed, text_output is
  postprocess's;
- KServe v2 /infer and HTTP /generate on NAME_METHOD_unary, the method's own field as a request parameter;
- the frontend's /v1/models, /v1/completions and /v1/chat/completions (the openai SDK) with model NAME_METHOD, the
  method's field as a field of the body;
- a failing preprocess or postprocess is an error naming the method and the function for that request only, and
  the next request is answered;
- client_examples/method_client.py, as a user runs it.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import REPO_ROOT, save_streaming_checkpoint

MODEL = "tiny"
SUMMARIZE, BROKEN = f"{MODEL}_summarize", f"{MODEL}_broken"
EXAMPLE = REPO_ROOT / "client_examples" / "methods" / "summarize.py"
TEXT = "Streaming keeps every space, and every word arrives whole."
MAX_TOKENS, MAX_WORDS = 24, 1

BROKEN_SOURCE = '''
def preprocess(request):
    how = request.get("fail")
    if how == "preprocess":
        raise ValueError("no good")
    if how == "preprocess_crash":
        raise KeyError("boom")
    if how == "preprocess_type":
        return ["not", "a", "dict"]
    return {"text_input": request["text_input"], "max_tokens": request.get("max_tokens", 4)}


def postprocess(text, request):
    if request.get("fail") == "postprocess":
        raise RuntimeError("bad postprocess")
    return {"text_output": text.upper(), "length": len(text)}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model converted by the command line with two methods (the flag given twice), and served."""
    from mstriton.repository import COMPONENTS, model_name
    from mstriton.server_process import python_environment, running_server

    root = tmp_path_factory.mktemp("methods")
    checkpoint = save_streaming_checkpoint(root)
    broken = root / "broken.py"
    broken.write_text(BROKEN_SOURCE)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "convert.py"), "--checkpoint", str(checkpoint),
                             "--name", MODEL, "--model-repository", str(root / "repo"), "--max-batch-size", "2",
                             "--max-seq-len", "256", "--template", "chatml", "--method", f"summarize={EXAMPLE}",
                             "--method", f"broken={broken}"], capture_output=True, text=True, timeout=600,
                            env=python_environment())
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "repo" / SUMMARIZE / "1" / "method.py").read_bytes() == EXAMPLE.read_bytes()
    assert sorted(p.name for p in (root / "repo").iterdir()) == sorted(
        [model_name(MODEL, c) for c in COMPONENTS] + [SUMMARIZE, f"{SUMMARIZE}_unary", BROKEN, f"{BROKEN}_unary"])
    with running_server(root / "repo", root / "server.log") as triton:
        yield triton


@pytest.fixture(scope="module")
def frontend(server, tmp_path_factory):
    from mstriton.server_process import running_frontend

    with running_frontend(server, tmp_path_factory.mktemp("methods-frontend") / "frontend.log") as fe:
        yield fe


@pytest.fixture(scope="module")
def openai_client(frontend):
    import openai
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def example():
    from mstriton.serving.methods import load_method
    return load_method(EXAMPLE, "summarize")


@pytest.fixture(scope="module")
def expected(server, example):
    """What the summarize method must answer for TEXT: the LLM's own greedy text for the chat its preprocess
    makes (streamed from the plain model), and its postprocess's dict for that text."""
    request = {"text_input": TEXT, "max_words": MAX_WORDS, "max_tokens": MAX_TOKENS}
    chat = example.preprocess(dict(request))["messages"]
    pieces, _, error = grpc_stream(server, MODEL, {"messages": json.dumps(chat), "max_tokens": MAX_TOKENS})
    assert error is None, error
    raw = "".join(pieces)
    assert len(raw.split()) > MAX_WORDS, raw  # postprocess has something to cut
    return raw, example.postprocess(raw, request)


def tensors_of(grpcclient, values: dict) -> list:
    inputs = []
    for name, value in values.items():
        if isinstance(value, str):
            array = np.array([[value.encode()]], np.object_)
        elif isinstance(value, bool):
            array = np.array([[value]], np.bool_)
        else:
            array = np.array([[value]], np.int32)
        tensor = grpcclient.InferInput(name, list(array.shape), {np.object_: "BYTES", np.bool_: "BOOL",
                                                                 np.int32: "INT32"}[array.dtype.type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_stream(server, model: str, values: dict, parameters: dict | None = None):
    """(the text pieces, the method_output dict or None, the error message or None) of one gRPC stream."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer(model, tensors_of(grpcclient, values), parameters=parameters,
                              enable_empty_final_response=True)
    pieces, output = [], None
    try:
        while True:
            result, error = results.get(timeout=120)
            if error is not None:
                return pieces, output, error.message()
            if result.as_numpy("text_output") is not None:
                pieces.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            if result.as_numpy("method_output") is not None:
                output = json.loads(result.as_numpy("method_output").reshape(-1)[0])
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return pieces, output, None
    finally:
        client.stop_stream()
        client.close()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ---- tritonclient gRPC ---------------------------------------------------------------------------------------

def test_grpc_stream_applies_pre_and_postprocessing(server, expected):
    raw, summary = expected
    pieces, output, error = grpc_stream(server, SUMMARIZE, {
        "text_input": TEXT, "max_tokens": MAX_TOKENS, "method_fields": json.dumps({"max_words": MAX_WORDS})})
    assert error is None, error
    assert len(pieces) > 1 and "".join(pieces) == raw  # streamed: the generated text as it came
    assert output == summary and summary["text_output"] == " ".join(raw.split()[:MAX_WORDS])
    assert summary["summary_words"] == MAX_WORDS and summary["truncated"] is True

    # not streamed: one response, its text postprocess's; the field as a request parameter this time
    pieces, output, error = grpc_stream(server, SUMMARIZE, {"text_input": TEXT, "max_tokens": MAX_TOKENS,
                                                            "stream": False}, parameters={"max_words": MAX_WORDS})
    assert error is None, error
    assert pieces == [summary["text_output"]] and output == summary


# ---- KServe v2 and HTTP generate on the unary entry -------------------------------------------------------------

def test_kserve_infer_and_generate_on_the_unary_entry(server, expected):
    _, summary = expected
    status, answer = post(f"http://{server.http}/v2/models/{SUMMARIZE}_unary/infer", {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [TEXT]},
                   {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [MAX_TOKENS]}],
        "parameters": {"max_words": MAX_WORDS}})
    assert status == 200, answer
    outputs = {o["name"]: o["data"][0] for o in answer["outputs"]}
    assert outputs["text_output"] == summary["text_output"]
    assert json.loads(outputs["method_output"]) == summary and outputs["num_output_tokens"] == MAX_TOKENS

    status, answer = post(f"http://{server.http}/v2/models/{SUMMARIZE}_unary/generate", {
        "text_input": TEXT, "max_tokens": MAX_TOKENS, "parameters": {"max_words": MAX_WORDS}})
    assert status == 200, answer
    assert answer["text_output"] == summary["text_output"] and json.loads(answer["method_output"]) == summary


# ---- the frontend: OpenAI ------------------------------------------------------------------------------------

def test_v1_models_lists_the_methods_with_their_llm(openai_client, frontend):
    assert [m.id for m in openai_client.models.list().data] == [MODEL, BROKEN, SUMMARIZE]
    card = openai_client.models.retrieve(SUMMARIZE)
    assert card.id == SUMMARIZE and card.model_extra["parent"] == MODEL
    assert "parent" not in openai_client.models.retrieve(MODEL).model_extra


def test_openai_completions_and_chat_with_model_name_method(openai_client, frontend, expected):
    import openai

    raw, summary = expected
    reply = openai_client.completions.create(model=SUMMARIZE, prompt=TEXT, max_tokens=MAX_TOKENS,
                                             extra_body={"max_words": MAX_WORDS})
    assert reply.choices[0].text == summary["text_output"]
    assert reply.choices[0].model_extra["method_output"] == summary
    assert reply.usage.completion_tokens == MAX_TOKENS
    # without max_tokens, the method's own default (2 * max_words + 8), not the door's (the whole context)
    reply = openai_client.completions.create(model=SUMMARIZE, prompt=TEXT, extra_body={"max_words": MAX_WORDS})
    assert reply.usage.completion_tokens == 2 * MAX_WORDS + 8 or reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens <= 2 * MAX_WORDS + 8

    chunks = list(openai_client.completions.create(model=SUMMARIZE, prompt=TEXT, max_tokens=MAX_TOKENS,
                                                   stream=True, extra_body={"max_words": MAX_WORDS}))
    assert "".join(c.choices[0].text for c in chunks) == raw  # streamed: the text as it came
    last = [c.choices[0] for c in chunks if c.choices[0].finish_reason]
    assert len(last) == 1 and last[0].model_extra["method_output"] == summary

    # a chat: the example summarizes the last user message, which is the same text here
    chat = openai_client.chat.completions.create(model=SUMMARIZE, max_tokens=MAX_TOKENS,
                                                 messages=[{"role": "user", "content": TEXT}],
                                                 extra_body={"max_words": MAX_WORDS})
    assert chat.choices[0].message.content == summary["text_output"]
    assert chat.choices[0].model_extra["method_output"] == summary
    chunks = list(openai_client.chat.completions.create(model=SUMMARIZE, max_tokens=MAX_TOKENS, stream=True,
                                                        messages=[{"role": "user", "content": TEXT}],
                                                        extra_body={"max_words": MAX_WORDS}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == raw
    assert [c.choices[0].model_extra.get("method_output") for c in chunks if c.choices[0].finish_reason] == [summary]

    # the method's own field is refused by the method (400, naming it); a plain model refuses unknown fields
    with pytest.raises(openai.BadRequestError, match="method summarize: preprocess raised ValueError: max_words"):
        openai_client.completions.create(model=SUMMARIZE, prompt=TEXT, max_tokens=4, extra_body={"max_words": 0})
    with pytest.raises(openai.BadRequestError, match="unknown field 'max_words'"):
        openai_client.completions.create(model=MODEL, prompt=TEXT, max_tokens=4, extra_body={"max_words": 3})
    with pytest.raises(openai.BadRequestError, match="'stop' is not supported by the method") as raised:
        openai_client.completions.create(model=SUMMARIZE, prompt=TEXT, max_tokens=4, stop=["."])
    assert raised.value.param == "stop"

    # the frontend's vLLM metrics count a method's requests under its LLM
    with urllib.request.urlopen(f"{frontend.url}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert f'model_name="{SUMMARIZE}"' not in metrics
    assert f'vllm:e2e_request_latency_seconds_count{{model_name="{MODEL}"}}' in metrics


def test_mindspore_serving_door_reaches_a_method_by_name(server, frontend):
    """MindSpore Serving's body has no field of the method's own: the method's default max_words (30) applies, as
    on KServe v2 /infer without it."""
    status, answer = post(f"http://{server.http}/v2/models/{SUMMARIZE}_unary/infer", {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [TEXT]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [MAX_TOKENS]}]})
    assert status == 200, answer
    outputs = {o["name"]: o["data"][0] for o in answer["outputs"]}
    assert json.loads(outputs["method_output"])["summary_words"] <= 30
    request = urllib.request.Request(f"{frontend.url}/models/{SUMMARIZE}/generate", method="POST", data=json.dumps(
        {"inputs": TEXT, "parameters": {"max_new_tokens": MAX_TOKENS}}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        assert json.loads(response.read()) == {"generated_text": outputs["text_output"]}


# ---- a failing method --------------------------------------------------------------------------------------

@pytest.mark.parametrize("how, message, status", [
    ("preprocess", "method broken: preprocess raised ValueError: no good", 400),
    ("preprocess_crash", "method broken: preprocess raised KeyError: 'boom'", 500),
    ("preprocess_type", "method broken: preprocess returned list, not a dict", 500),
    ("postprocess", "method broken: postprocess raised RuntimeError: bad postprocess", 500),
])
def test_a_failing_method_fails_that_request_only(server, openai_client, how, message, status):
    import openai

    _, _, error = grpc_stream(server, BROKEN, {"text_input": "Streaming keeps", "max_tokens": 3},
                              parameters={"fail": how})
    assert error is not None and message in error
    code, answer = post(f"http://{server.http}/v2/models/{BROKEN}_unary/infer", {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["Streaming keeps"]}],
        "parameters": {"fail": how}})
    assert code == status and message in answer["error"], (code, answer)
    # (HTTP generate answers every failed inference with 400, whatever its code)
    code, answer = post(f"http://{server.http}/v2/models/{BROKEN}_unary/generate",
                        {"text_input": "Streaming keeps", "max_tokens": 3, "parameters": {"fail": how}})
    assert code == 400 and message in answer["error"], (code, answer)
    with pytest.raises(openai.BadRequestError if status == 400 else openai.InternalServerError, match=message):
        openai_client.completions.create(model=BROKEN, prompt="Streaming keeps", max_tokens=3,
                                         extra_body={"fail": how})

    # the next requests are answered: the method's, and the plain model's
    pieces, output, error = grpc_stream(server, BROKEN, {"text_input": "Streaming keeps", "max_tokens": 3,
                                                         "stream": False})
    assert error is None and output["text_output"] == pieces[0] and pieces[0] == pieces[0].upper()
    assert output["length"] == len(pieces[0]) > 0
    reply = openai_client.completions.create(model=MODEL, prompt="Streaming keeps", max_tokens=3)
    assert reply.choices[0].text.upper() == pieces[0]


# ---- the client example ----------------------------------------------------------------------------------------

def test_the_method_client_example_prints_the_summary(server, expected):
    from mstriton.server_process import python_environment

    raw, summary = expected
    result = subprocess.run([sys.executable, str(REPO_ROOT / "client_examples" / "method_client.py"), "--model",
                             SUMMARIZE, "--grpc-url", server.grpc, "--http-url", server.http, "--max-words",
                             str(MAX_WORDS), "--max-tokens", str(MAX_TOKENS), TEXT], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT, env=python_environment())
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.dumps(summary, ensure_ascii=False)
    assert result.stdout == (f"grpc stream ({SUMMARIZE}): {raw}\nmethod_output: {shown}\n"
                             f"kserve infer ({SUMMARIZE}_unary): {summary['text_output']}\nmethod_output: {shown}\n")
