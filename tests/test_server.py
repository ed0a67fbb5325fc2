"""The real tritonserver with converted test models, driven through tritonclient (gRPC streaming, KServe v2
HTTP) and plain HTTP (generate, generate_stream SSE). Results are checked against transformers' greedy text."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import serving_streaming_checkpoint
from mstriton.server_process import metric_value

PROMPTS = ["The quick brown fox", "Streaming keeps every space", "MindSpore 图模式 🚀", "Numbers 3.14159 and",
           "a", "  leading spaces, double  spaces and a tab\there and a longer prompt to vary the length"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # tiny's KV pool: 40 blocks of 16 tokens, far less than its 16 slots of 128 tokens could hold (128 blocks):
    # concurrent streams preempt each other and must still end as their single runs do
    with serving_streaming_checkpoint(tmp_path_factory.mktemp("server"), {"tiny": 16, "tiny1": 1},
                                      decode_parameters={"tiny1": {"shutdown_grace_seconds": "0.3"}},
                                      kv_cache_blocks={"tiny": 40}) as triton:
        yield triton


@pytest.fixture(scope="module")
def expected(server):
    """transformers' greedy continuation of each prompt, as text."""
    import torch
    from transformers import LlamaForCausalLM
    from mstriton.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(server.checkpoint / "tokenizer.model")
    model = LlamaForCausalLM.from_pretrained(server.checkpoint).eval()
    model.generation_config.eos_token_id = None

    def greedy(prompt: str, n: int) -> str:
        """The new text: the whole sequence's text past the prompt's, so the joining space is kept."""
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        return tokenizer.decode(out[0].tolist())[len(tokenizer.decode(ids[0].tolist())):]

    return greedy


# ---- clients ------------------------------------------------------------------------------------------

def grpc_stream(server, model: str, prompt: str, max_tokens: int, cancel_after: int | None = None, **inputs):
    """Pieces streamed by tritonclient gRPC; with cancel_after, cancel the stream after that many."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tensors = {"text_input": np.array([[prompt.encode()]], np.object_),
               "max_tokens": np.array([[max_tokens]], np.int32), "stream": np.array([[True]])}
    tensors.update(inputs)
    infer_inputs = []
    for name, array in tensors.items():
        dtype = {np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL", np.dtype(np.float32): "FP32",
                 np.dtype(np.uint64): "UINT64"}.get(array.dtype, "BYTES")
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        infer_inputs.append(tensor)
    client.async_stream_infer(model, infer_inputs, request_id="grpc-1", enable_empty_final_response=True)
    pieces, reasons, error = [], [], None
    while True:
        result, err = results.get(timeout=120)
        if err is not None:
            error = err
            break
        response = result.get_response()
        if result.as_numpy("text_output") is not None:
            pieces.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            reasons.append(result.as_numpy("finish_reason").reshape(-1)[0].decode())
        if cancel_after is not None and len(pieces) >= cancel_after:
            client.stop_stream(cancel_requests=True)
            return pieces, reasons, "cancelled"
        if response.parameters.get("triton_final_response") and response.parameters[
                "triton_final_response"].bool_param:
            break
    client.stop_stream()
    return pieces, reasons, error


def http_post(server, path: str, body: dict, timeout: float = 120):
    request = urllib.request.Request(f"http://{server.http}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sse_pieces(server, body: dict) -> list[dict]:
    status, text = http_post(server, "/v2/models/tiny/generate_stream", body)
    assert status == 200, text
    return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]


def kserve_infer(server, prompt: str, max_tokens: int) -> str:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http)
    text = httpclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt.encode()]], np.object_))
    limit = httpclient.InferInput("max_tokens", [1, 1], "INT32")
    limit.set_data_from_numpy(np.array([[max_tokens]], np.int32))
    result = client.infer("tiny_unary", [text, limit])
    return result.as_numpy("text_output").reshape(-1)[0].decode()


# ---- tests ---------------------------------------------------------------------------------------------

def test_finished_stream_iterators_are_dropped_only_after_a_round_trip():
    """The workaround for 2.51's stub freeing a finished BLS stream without the GIL (serving/finished_streams.py):
    a held iterator outlives every is_cancelled() that may have answered from the cache (True), and goes at the
    first one that made a round trip (False) and began after it was held."""
    import weakref

    from mstriton.serving.finished_streams import FinishedStreams

    class Iterator:
        pass

    streams = FinishedStreams()
    first = Iterator()
    gone_first = weakref.ref(first)
    streams.hold(first)
    del first
    assert streams.is_cancelled(lambda: True) is True and gone_first() is not None  # cached: no round trip
    second = Iterator()
    gone_second = weakref.ref(second)

    def round_trip():  # held while this round trip is under way: not covered by it
        streams.hold(second)
        return False

    assert streams.is_cancelled(round_trip) is False
    del second
    assert gone_first() is None and gone_second() is not None and len(streams) == 1
    assert streams.releasing(lambda: False)() is False and gone_second() is None and len(streams) == 0


def test_all_models_load(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http)
    for suffix in ("", "_unary", "_pipeline", "_tokenizer", "_decode"):
        assert client.is_model_ready(f"tiny{suffix}")


def test_grpc_stream_sse_and_kserve_infer_return_the_transformers_greedy_text(server, expected):
    for prompt in PROMPTS[:3]:
        want = expected(prompt, 12)
        pieces, reasons, error = grpc_stream(server, "tiny", prompt, 12)
        assert error is None and len(pieces) == 12
        assert "".join(pieces) == want
        assert reasons[-1] == "length" and all(r == "" for r in reasons[:-1])
        events = sse_pieces(server, {"text_input": prompt, "max_tokens": 12, "stream": True})
        assert len(events) == 12 and "".join(e["text_output"] for e in events) == want
        assert kserve_infer(server, prompt, 12) == want
        status, body = http_post(server, "/v2/models/tiny_unary/generate", {"text_input": prompt, "max_tokens": 12})
        assert status == 200 and json.loads(body)["text_output"] == want


def test_streamed_pieces_never_hold_broken_utf8(server):
    events = sse_pieces(server, {"text_input": PROMPTS[2], "max_tokens": 40, "stream": True})
    pieces = [e["text_output"] for e in events]
    status, body = http_post(server, "/v2/models/tiny_unary/generate", {"text_input": PROMPTS[2], "max_tokens": 40})
    whole = json.loads(body)["text_output"]
    assert "".join(pieces) == whole
    # A character split between pieces would show as U+FFFD in a piece; random weights may also emit byte
    # tokens that never form a character, which the whole text shows as U+FFFD too. Only those may appear.
    assert sum(p.count("\ufffd") for p in pieces) == whole.count("\ufffd")


def test_sampling_parameters_per_request_and_mindspore_serving_spelling(server):
    body = {"text_input": PROMPTS[0], "max_tokens": 10, "temperature": 0.9, "top_k": 20, "top_p": 0.95,
            "seed": 1234, "repetition_penalty": 1.1, "return_log_probs": True}
    first = json.loads(http_post(server, "/v2/models/tiny_unary/generate", body)[1])
    again = json.loads(http_post(server, "/v2/models/tiny_unary/generate", body)[1])
    other = json.loads(http_post(server, "/v2/models/tiny_unary/generate", {**body, "seed": 99})[1])
    assert first["text_output"] == again["text_output"] and first["text_output"] != other["text_output"]
    assert len(first["output_log_probs"]) == 10 and all(lp <= 0 for lp in first["output_log_probs"])
    assert abs(sum(first["output_log_probs"]) - first["cum_log_probs"]) < 1e-3
    streamed = sse_pieces(server, {**body, "stream": True})
    assert "".join(e["text_output"] for e in streamed) == first["text_output"]
    # MindSpore Serving / TGI spelling: parameters.max_new_tokens, do_sample=false
    status, text = http_post(server, "/v2/models/tiny_unary/generate",
                             {"text_input": PROMPTS[0], "parameters": {"max_new_tokens": 5, "do_sample": False,
                                                                       "return_full_text": True}})
    result = json.loads(text)
    assert status == 200 and result["num_output_tokens"] == 5 and result["text_output"].startswith(PROMPTS[0])


def test_sixteen_concurrent_streams_each_equal_their_single_result(server):
    cases = [(PROMPTS[i % len(PROMPTS)], 4 + (i * 5) % 23) for i in range(16)]
    singles = [json.loads(http_post(server, "/v2/models/tiny_unary/generate",
                                    {"text_input": p, "max_tokens": n})[1])["text_output"] for p, n in cases]
    with ThreadPoolExecutor(16) as pool:
        streamed = list(pool.map(lambda case: grpc_stream(server, "tiny", *case), cases))
    for (pieces, reasons, error), single, (_, n) in zip(streamed, singles, cases):
        assert error is None and len(pieces) == n and "".join(pieces) == single


def test_stream_interval_sends_several_tokens_per_response(server, expected):
    """The first token alone, then four per response; the same text and log-probabilities as one per token."""
    body = {"text_input": PROMPTS[0], "max_tokens": 14, "stream": True, "return_log_probs": True}
    one = sse_pieces(server, body)
    four = sse_pieces(server, {**body, "stream_interval": 4})
    assert [e["num_output_tokens"] for e in one] == list(range(1, 15))
    assert [e["num_output_tokens"] for e in four] == [1, 5, 9, 13, 14]
    assert "".join(e["text_output"] for e in four) == "".join(e["text_output"] for e in one) == \
        expected(PROMPTS[0], 14)
    logprobs = [e["output_log_probs"] for e in four]
    logprobs = [lp if isinstance(lp, list) else [lp] for lp in logprobs]
    assert [len(lp) for lp in logprobs] == [1, 4, 4, 4, 1]
    assert np.allclose(sum(logprobs, []), [e["output_log_probs"] for e in one], atol=1e-5)
    pieces, reasons, error = grpc_stream(server, "tiny", PROMPTS[1], 9,
                                         stream_interval=np.array([[3]], np.int32))
    assert error is None and len(pieces) == 4 and reasons[-1] == "length"
    assert "".join(pieces) == expected(PROMPTS[1], 9)


BAD_INPUTS = [
    ({"text_input": ""}, "text_input"),
    ({"text_input": "word " * 200}, "max_seq_len=128"),
    ({"text_input": "hi", "max_tokens": 0}, "'max_tokens' must be in [1,"),
    ({"text_input": "hi", "max_tokens": -3}, "'max_tokens' must be in [1,"),
    ({"text_input": "hi", "max_tokens": 5000}, "'max_tokens' must be in [1,"),
    ({"text_input": "hi", "top_p": 0.0}, "'top_p' must be in (0, 1]"),
    ({"text_input": "hi", "top_p": 1.5}, "'top_p' must be in (0, 1]"),
    ({"text_input": "hi", "temperature": -1.0}, "'temperature' must be >= 0"),
    ({"text_input": "hi", "top_k": -1}, "'top_k' must be >= 0"),
    ({"text_input": "hi", "stream_interval": 0}, "'stream_interval' must be in [1, 256]"),
    ({"messages": "not json"}, "'messages' must be a JSON list"),
    ({"messages": '[{"role": "wizard", "content": "hi"}]'}, "'messages[0].role' must be one of"),
    ({"messages": '[{"role": "user"}]'}, "'messages[0].content' is required"),
    ({"messages": '[{"role": "user", "content": "hi"}]', "text_input": "hi"}, "not both"),
    # the test model's sentencepiece tokenizer has no chat template, and it was converted without --template
    ({"messages": '[{"role": "user", "content": "hi"}]'}, "'messages' needs a chat template"),
]


def test_bad_inputs_are_refused_by_name_while_another_stream_continues(server, expected):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    result = {}
    runner = threading.Thread(target=lambda: result.update(
        stream=grpc_stream(server, "tiny", PROMPTS[1], 60)))
    runner.start()
    for body, message in BAD_INPUTS:
        for path in ("/v2/models/tiny_unary/generate", "/v2/models/tiny/generate_stream"):
            status, text = http_post(server, path, body)
            assert status == 400, (path, body, status, text)
            assert message in text, (body, text)
    status, text = http_post(server, "/v2/models/tiny_unary/infer", {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": ["hi"]},
        {"name": "max_tokens", "datatype": "INT32", "shape": [1, 1], "data": [0]}]})
    # INVALID_ARG even for a range found inside the ensemble (the prompt's length is known in its tokenizer step)
    assert status == 400 and "'max_tokens' must be in [1," in text, (status, text)
    client = grpcclient.InferenceServerClient(server.grpc)
    wrong = grpcclient.InferInput("text_input", [1, 1], "INT32")  # wrong dtype
    wrong.set_data_from_numpy(np.array([[7]], np.int32))
    with pytest.raises(InferenceServerException, match="text_input"):
        client.infer("tiny_unary", [wrong])
    wrong_shape = grpcclient.InferInput("text_input", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], np.object_))
    with pytest.raises(InferenceServerException, match="text_input"):
        client.infer("tiny_unary", [wrong_shape])
    not_utf8 = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    not_utf8.set_data_from_numpy(np.array([[b"\xff\xfe bad"]], np.object_))
    with pytest.raises(InferenceServerException, match="'text_input' is not valid UTF-8"):
        client.infer("tiny_unary", [not_utf8])
    runner.join(300)
    pieces, _, error = result["stream"]
    assert error is None and "".join(pieces) == expected(PROMPTS[1], 60)


def test_cancelled_stream_frees_the_only_slot_for_the_next_request(server):
    before = server.metrics()
    generated_before = metric_value(before, "mstriton_generation_tokens_total", model="tiny1")
    pieces, _, status = grpc_stream(server, "tiny1", PROMPTS[0], 100, cancel_after=3)
    assert status == "cancelled" and len(pieces) == 3, (str(status), status.message() if hasattr(status, "message") else "")
    pieces, reasons, error = grpc_stream(server, "tiny1", PROMPTS[1], 5)
    assert error is None and len(pieces) == 5
    time.sleep(1)
    after = server.metrics()
    assert metric_value(after, "mstriton_requests_finished_total", model="tiny1", finish_reason="cancelled") >= 1
    # The cancelled request stopped early: far fewer than its 100 tokens were generated in all.
    generated = metric_value(after, "mstriton_generation_tokens_total", model="tiny1") - generated_before
    assert generated < 60, generated


def test_sse_client_hanging_up_frees_the_only_slot(server):
    import http.client

    generated_before = metric_value(server.metrics(), "mstriton_generation_tokens_total", model="tiny1")
    connection = http.client.HTTPConnection(server.http, timeout=60)
    connection.request("POST", "/v2/models/tiny1/generate_stream",
                       body=json.dumps({"text_input": PROMPTS[0], "max_tokens": 100, "stream": True}))
    response = connection.getresponse()
    events = 0
    while events < 2:
        if response.readline().startswith(b"data: "):
            events += 1
    connection.close()  # hang up mid-stream
    status, body = http_post(server, "/v2/models/tiny1_unary/generate", {"text_input": PROMPTS[1], "max_tokens": 5})
    assert status == 200 and json.loads(body)["num_output_tokens"] == 5
    time.sleep(1)
    generated = metric_value(server.metrics(), "mstriton_generation_tokens_total", model="tiny1") - generated_before
    assert generated < 60, generated


def test_explicit_stop_with_the_request_id(server):
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))

    def send(request_id, **arrays):
        inputs = []
        for name, (array, dtype) in arrays.items():
            t = grpcclient.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            inputs.append(t)
        client.async_stream_infer("tiny1", inputs, request_id=request_id)

    send("long-one", text_input=(np.array([[b"The quick"]], np.object_), "BYTES"),
         max_tokens=(np.array([[100]], np.int32), "INT32"), stream=(np.array([[True]]), "BOOL"))
    first, error = results.get(timeout=60)
    assert error is None
    send("long-one", text_input=(np.array([[b""]], np.object_), "BYTES"), stop=(np.array([[True]]), "BOOL"))
    streamed = 1
    try:
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            if result.as_numpy("text_output") is None:
                continue  # the answer to the stop request itself
            streamed += 1
            reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
            if reason:
                break
    finally:
        client.stop_stream()
    assert reason == "cancelled" and streamed < 50


def test_metrics_move(server):
    grpc_stream(server, "tiny", PROMPTS[0], 4)
    time.sleep(1)
    text = server.metrics()
    for name in ("mstriton_time_to_first_token_seconds_count", "mstriton_time_per_output_token_seconds_count",
                 "mstriton_request_latency_seconds_count", "mstriton_prompt_tokens_total",
                 "mstriton_generation_tokens_total"):
        assert metric_value(text, name, model="tiny") > 0, name
    assert metric_value(text, "mstriton_kv_cache_blocks_total", model="tiny_decode") == 40
    assert "mstriton_requests_running" in text and "mstriton_requests_waiting" in text
    assert "mstriton_kv_cache_usage_ratio" in text
    # a prompt of more than two blocks, twice: the second time its full blocks come from the prefix cache
    # (vLLM's counters, in prompt tokens)
    long_prompt = PROMPTS[5] + " " + PROMPTS[5]
    grpc_stream(server, "tiny", long_prompt, 2)
    time.sleep(1)
    text = server.metrics()
    queries = metric_value(text, "vllm:prefix_cache_queries_total", model="tiny_decode")
    hits = metric_value(text, "vllm:prefix_cache_hits_total", model="tiny_decode")
    grpc_stream(server, "tiny", long_prompt, 2)
    time.sleep(1)
    text = server.metrics()
    asked = metric_value(text, "vllm:prefix_cache_queries_total", model="tiny_decode") - queries
    found = metric_value(text, "vllm:prefix_cache_hits_total", model="tiny_decode") - hits
    assert asked > 32 and found == (asked - 1) // 16 * 16, (asked, found)


def test_perf_analyzer_streaming_reports(server, tmp_path):
    binary = Path(sys.prefix) / "bin" / "perf_analyzer"
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"text_input": ["The quick brown fox"], "max_tokens": [8],
                                          "stream": [True]}]}))
    result = subprocess.run([str(binary), "-m", "tiny", "-i", "grpc", "--streaming", "-u", server.grpc,
                             "--input-data", str(data), "--concurrency-range", "2", "--measurement-interval",
                             "3000", "--profile-export-file", str(tmp_path / "profile.json"),
                             # this test checks that it runs and reports, not that a shared CPU is steady
                             "--stability-percentage", "999"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Throughput" in result.stdout
    profile = json.loads((tmp_path / "profile.json").read_text())
    requests = profile["experiments"][0]["requests"]
    assert requests and all(len(r["response_timestamps"]) == 8 for r in requests)


def test_a_burst_of_short_requests_into_one_slot_leaves_the_server_whole(server):
    """480 short streams, 8 at a time, into the one-slot model: every arrival's execute() and the decode loop's
    passes both update the decode model's gauges and counters. tritonserver 2.51's stub is not safe for two threads
    updating one Metric: before the decode model took them one at a time, counters were added twice and
    tritonserver died of SIGSEGV within seconds of such a burst (with a corrupted region short of that, a stream
    could lose its end, and SIGTERM waited out the exit timeout). Every request ends with its tokens, the server
    lives on, and the decode model counted as many prompt tokens as the front model did."""
    def prompt_tokens(text):
        return (metric_value(text, "vllm:prefix_cache_queries_total", model="tiny1_decode"),
                metric_value(text, "mstriton_prompt_tokens_total", model="tiny1"))

    def stream(job):
        try:
            return grpc_stream(server, "tiny1", *job)
        except Exception as exc:  # noqa: BLE001 - e.g. the server is gone: reported below with its log
            return [], [], exc

    decode_before, front_before = prompt_tokens(server.metrics())
    jobs = [(PROMPTS[i % 5], 1 + i % 3) for i in range(480)]  # short prompts: one slot holds each, no preemption
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(stream, jobs))
    assert server.process.poll() is None, server.tail(20)
    failed = [(job, error) for job, (_, _, error) in zip(jobs, outcomes) if error is not None]
    assert not failed, (len(failed), failed[:3])
    assert [len(pieces) for pieces, _, _ in outcomes] == [n for _, n in jobs]
    time.sleep(1)  # the decode loop's last pass sets the counters
    decode_after, front_after = prompt_tokens(server.metrics())
    assert decode_after - decode_before == front_after - front_before > 0, (decode_after - decode_before,
                                                                           front_after - front_before)


def test_every_request_refused_inside_the_ensemble_gets_its_refusal_under_concurrency(server):
    """240 refused requests (top_p out of range: refused by the ensemble's tokenizer step, where the prompt is
    known) among as many valid ones, 16 at a time. While the tokenizer step answered them with error responses,
    tritonserver 2.51's python backend lost the error on its way to the front model's BLS call in about 1 of 25 (the
    client got "the generation ended before its last token"), and a server that had lost one could not unload the
    front model at SIGTERM: the next test's exit status was 1. The refusal now travels as data (common.REFUSAL)."""
    def one(i: int):
        if i % 2:
            return grpc_stream(server, "tiny", PROMPTS[i % 5], 2)
        return grpc_stream(server, "tiny", PROMPTS[i % 5], 2, top_p=np.array([[5.0]], np.float32))

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(480)))
    refusals = [str(error) for _, _, error in outcomes[0::2]]
    wrong = [message for message in refusals if "'top_p' must be in (0, 1], got 5.0" not in message]
    assert not wrong, (len(wrong), wrong[:3])
    answered = [(len(pieces), error) for pieces, _, error in outcomes[1::2]]
    assert answered == [(2, None)] * 240, [a for a in answered if a != (2, None)][:3]


def test_sigterm_lets_running_streams_end_and_the_server_exit_cleanly(server):
    """Last in this file: it stops the server. At SIGTERM, every stream either finishes or ends with an error
    saying the server is shutting down, and tritonserver exits with 0 within its exit timeout. `tiny` keeps the
    default grace (20 s), so its stream finishes; `tiny1` (one slot, grace 0.3 s) has more queued work than
    its grace, so some of its streams are ended by the drain: 12 streams of 100 tokens, one at a time, are 1200
    decode steps (4 streams, 400 steps, all finished within 0.3 s on an idle AVX-512 machine)."""
    import tritonclient.grpc  # noqa: F401 - here, not in the streams' threads: under load the import outlasted a wait

    def arrived(model: str) -> float:
        """Requests of `model` running or queued in its decode model, or finished."""
        text = server.metrics()
        return metric_value(text, "mstriton_requests_finished_total", model=model) + sum(
            metric_value(text, gauge, model=f"{model}_decode") for gauge in
            ("mstriton_requests_running", "mstriton_requests_prefilling", "mstriton_requests_waiting"))

    server.stopped_by_test = True
    queued = 12
    results = [{} for _ in range(1 + queued)]
    runners = [threading.Thread(target=lambda r=r, model=model: r.update(stream=grpc_stream(
        server, model, PROMPTS[0], 100))) for r, model in zip(results, ["tiny"] + ["tiny1"] * queued)]
    before = {model: arrived(model) for model in ("tiny", "tiny1")}
    for runner in runners:
        runner.start()
    deadline = time.monotonic() + 30  # every stream is running or queued (100 tokens take about half a second)
    while (arrived("tiny") - before["tiny"] < 1 or arrived("tiny1") - before["tiny1"] < queued) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    code = server.stop(timeout=60)
    stopped_in = time.monotonic() - started
    for runner in runners:
        runner.join(60)
        assert not runner.is_alive()
    assert code == 0, server.tail()
    assert stopped_in < 30, stopped_in  # within the exit timeout, not killed at its end
    outcomes = [r["stream"] for r in results]
    pieces, reasons, error = outcomes[0]
    assert error is None and reasons[-1] == "length" and len(pieces) == 100, (reasons[-1:], error)
    drained = 0
    for pieces, reasons, error in outcomes[1:]:
        if error is None:
            assert reasons[-1] == "length" and len(pieces) == 100
        else:
            assert "shutting down" in str(error), error
            drained += 1
    assert drained >= 1, outcomes
    assert "shutdown probe was refused" in server.log.read_text()
