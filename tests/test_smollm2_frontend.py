"""The HTTP frontend, in front of the real tritonserver serving SmolLM2, driven by real clients: the `openai` SDK
(sync and async), huggingface_hub's InferenceClient on the TGI routes, and plain HTTP with MindSpore Serving's
request bodies. Greedy text through every door equals the gRPC stream's (and transformers'); log-probabilities
equal transformers' log-softmax; usage equals the tokenizer's counts; errors are each protocol's."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.request

import numpy as np
import pytest

from conftest import SMOLLM2_MAX_WAITING
from test_smollm2_server import MAX_TOKENS, QUESTION, grpc_stream

PROMPT = "The three primary colours are"
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def frontend(smollm2_server, tmp_path_factory):
    from mstriton.server_process import running_frontend

    with running_frontend(smollm2_server, tmp_path_factory.mktemp("frontend") / "frontend.log") as fe:
        yield fe


@pytest.fixture(scope="module")
def keyed_frontend(smollm2_server, tmp_path_factory):
    from mstriton.server_process import running_frontend

    with running_frontend(smollm2_server, tmp_path_factory.mktemp("keyed") / "frontend.log", api_key=API_KEY) as fe:
        yield fe


@pytest.fixture(scope="module")
def openai_client(frontend):
    import openai
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def grpc_completion(smollm2_server):
    """The gRPC stream's text for PROMPT, 12 tokens: what every door must answer for the same request."""
    pieces, _ = grpc_stream(smollm2_server, None, {"text_input": np.array([[PROMPT.encode()]], np.object_),
                                                   "max_tokens": np.array([[12]], np.int32)})
    return "".join(pieces)


@pytest.fixture(scope="module")
def grpc_answer(smollm2_server):
    pieces, reasons = grpc_stream(smollm2_server, QUESTION)
    return "".join(pieces)


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, bytes, "http.client.HTTPMessage"]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def sse_data(raw: bytes, prefix: str = "data:") -> list[str]:
    return [line[len(prefix):].strip() for line in raw.decode().splitlines() if line.startswith(prefix)]


# ---- OpenAI ----------------------------------------------------------------------------------------------

def test_models_lists_the_served_llm(openai_client):
    assert [m.id for m in openai_client.models.list().data] == ["smollm2"]
    assert openai_client.models.retrieve("smollm2").id == "smollm2"


def test_chat_equals_the_grpc_stream_and_transformers_with_usage(openai_client, grpc_answer, smollm2_reference):
    ids = smollm2_reference.chat_ids(QUESTION)
    generated = smollm2_reference.greedy(ids, MAX_TOKENS)
    assert grpc_answer == smollm2_reference.decode(generated) and "Paris" in grpc_answer
    reply = openai_client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS,
                                                  temperature=0)
    assert reply.choices[0].message.content == grpc_answer
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(generated))
    assert reply.usage.total_tokens == len(ids) + len(generated)

    chunks = list(openai_client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == grpc_answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(generated)


def test_async_client_streams_two_chats_at_once(frontend, grpc_answer):
    import openai

    async def both():
        client = openai.AsyncOpenAI(base_url=f"{frontend.url}/v1", api_key="unused", max_retries=0)

        async def one():
            stream = await client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS,
                                                          stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        texts = await asyncio.gather(one(), one())
        await client.close()
        return texts
    assert asyncio.run(both()) == [grpc_answer, grpc_answer]


def test_logprobs_equal_transformers_log_softmax(openai_client, smollm2_reference):
    reply = openai_client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, logprobs=True,
                                                  top_logprobs=5)
    content = reply.choices[0].logprobs.content
    ids = smollm2_reference.chat_ids(QUESTION)
    generated = smollm2_reference.greedy(ids, 8)
    expected = smollm2_reference.log_softmax(ids + generated)[len(ids) - 1:]
    assert len(content) == len(generated)
    for step, (entry, token) in enumerate(zip(content, generated)):
        assert entry.token == smollm2_reference.tokenizer.decode([token])
        assert abs(entry.logprob - expected[step, token]) < 1e-3
        best = np.argsort(-expected[step])[:5]
        assert [a.token for a in entry.top_logprobs] == [smollm2_reference.tokenizer.decode([t]) for t in best]
        np.testing.assert_allclose([a.logprob for a in entry.top_logprobs], expected[step, best], atol=1e-3)
        assert entry.bytes == list(entry.token.encode())

    completion = openai_client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert all(len(alternatives) == 3 for alternatives in logprobs.top_logprobs)


def test_completions_prompt_lists_echo_stop_and_lengths(openai_client, smollm2_reference, grpc_completion):
    expected = smollm2_reference.decode(smollm2_reference.greedy(smollm2_reference.text_ids(PROMPT), 12))
    assert expected == grpc_completion
    reply = openai_client.completions.create(model="smollm2", prompt=[PROMPT, PROMPT], max_tokens=12)
    assert [c.text for c in reply.choices] == [expected, expected] and [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 24
    assert reply.usage.prompt_tokens == 2 * len(smollm2_reference.text_ids(PROMPT))

    echoed = openai_client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, echo=True)
    assert echoed.choices[0].text == PROMPT + expected

    # a stop string ends the text before it, wherever the tokens split it
    stop = expected.strip().split()[1]
    cut = openai_client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, stop=[stop, "zzz"])
    assert cut.choices[0].text == expected[:expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = openai_client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, stop=stop,
                                                stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected[:expected.index(stop)]


def test_n_and_seed(openai_client):
    def sample(**settings):
        reply = openai_client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=10, temperature=1.0,
                                                 **settings)
        return [c.text for c in reply.choices]
    first = sample(n=2, seed=7)
    assert len(first) == 2
    assert sample(n=2, seed=7) == first          # reproducible
    assert first[0] != first[1]                   # each of the n has its own seed
    assert sample(seed=7) == first[:1]            # the first of n is the same request alone


def test_openai_errors_are_the_sdk_exceptions_naming_the_param(openai_client, keyed_frontend):
    import openai

    cases = [({"max_tokens": 100000}, "max_tokens"), ({"temperature": 5}, "temperature"),
             ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
             ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
             ({"logit_bias": {"1": 200}}, "logit_bias.1"),
             ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"), ({"n": 0}, "n"),
             ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages")]
    for settings, param in cases:
        body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 4, **settings}
        with pytest.raises(openai.BadRequestError) as raised:
            openai_client.chat.completions.create(**body)
        assert raised.value.param == param, (settings, raised.value)
        assert param in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=2, extra_body={"suffix": "x"})
    assert raised.value.param == "suffix"
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="no-such-model", messages=QUESTION)

    keyless = openai.OpenAI(base_url=f"{keyed_frontend.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        keyless.models.list()
    keyed = openai.OpenAI(base_url=f"{keyed_frontend.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in keyed.models.list().data] == ["smollm2"]
    assert get(f"{keyed_frontend.url}/health")[0] == 200
    assert get(f"{keyed_frontend.url}/metrics")[0] == 200
    assert post(f"{keyed_frontend.url}/generate", {"inputs": PROMPT})[0] == 401
    assert post(f"{keyed_frontend.url}/models/smollm2", {"inputs": PROMPT})[0] == 401


def test_a_full_server_answers_503_with_retry_after(frontend, smollm2_server):
    """2 slots and 1 waiting place: of 5 long requests at once, some are refused busy, the rest complete."""
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 200, "min_tokens": 200}

    async def burst():
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*[loop.run_in_executor(None, post, f"{frontend.url}/v1/completions", body)
                                      for _ in range(2 + SMOLLM2_MAX_WAITING + 2)])
    results = asyncio.run(burst())
    statuses = sorted(status for status, _, _ in results)
    assert 503 in statuses and 200 in statuses, statuses
    for status, raw, headers in results:
        if status == 503:
            assert json.loads(raw)["error"]["type"] == "server_busy" and int(headers.get("Retry-After")) >= 1
        else:
            assert json.loads(raw)["usage"]["completion_tokens"] == 200


# ---- TGI -------------------------------------------------------------------------------------------------

def test_tgi_routes_with_huggingface_hub(frontend, grpc_completion):
    from huggingface_hub import InferenceClient

    expected = grpc_completion
    client = InferenceClient(base_url=frontend.url)
    assert client.text_generation(PROMPT, max_new_tokens=12) == expected
    out = client.text_generation(PROMPT, max_new_tokens=12, details=True)
    assert out.generated_text == expected
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 12
    assert "".join(t.text for t in out.details.tokens) == expected
    assert client.text_generation(PROMPT, max_new_tokens=12, return_full_text=True) == PROMPT + expected

    events = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True, details=True))
    assert "".join(e.token.text for e in events) == expected
    assert events[-1].generated_text == expected and events[-1].details.finish_reason == "length"
    assert all(e.generated_text is None for e in events[:-1])
    assert list(client.text_generation(PROMPT, max_new_tokens=12, stream=True)) == list(expected_pieces(events))

    status, raw = get(f"{frontend.url}/info")
    info = json.loads(raw)
    assert status == 200 and info["model_id"] == "smollm2" and info["max_total_tokens"] == 512


def expected_pieces(events):
    return [e.token.text for e in events]


def test_tgi_refuses_what_it_does_not_implement(frontend):
    status, raw, _ = post(f"{frontend.url}/generate", {"inputs": PROMPT, "parameters": {"grammar": {"type": "json"}}})
    assert status == 400 and "parameters.grammar" in json.loads(raw)["error"]
    status, raw, _ = post(f"{frontend.url}/generate", {"inputs": PROMPT, "parameters": {"top_p": 1.5}})
    assert status == 400 and "parameters.top_p" in json.loads(raw)["error"]


# ---- MindSpore Serving -----------------------------------------------------------------------------------

def test_mindspore_serving_bodies_and_formats(frontend, grpc_completion):
    expected = grpc_completion
    base = f"{frontend.url}/models/smollm2"
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}
    for url, extra in [(base, {"stream": False}), (f"{base}/generate", {})]:
        status, raw, _ = post(url, {**body, **extra})
        assert status == 200 and json.loads(raw.decode().strip()) == {"generated_text": expected}

    # streamed, SSE (the seed's default protocol): one message per token, then the whole text when asked
    full = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "return_full_text": True}}
    for url, extra in [(base, {"stream": True}), (f"{base}/generate_stream", {})]:
        status, raw, _ = post(url, {**full, **extra})
        messages = [json.loads(d) for d in sse_data(raw)]
        assert all(m["event"] == "message" and m["retry"] == 30000 for m in messages)
        assert "".join(m["data"] for m in messages[:-1]) == expected and messages[-1]["data"] == expected

    plain = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "return_protocol": "plain",
                                             "return_full_text": True}}
    status, raw, _ = post(f"{base}/generate_stream", plain)
    lines = [json.loads(d) for d in sse_data(raw)]
    assert [line["token"]["index"] for line in lines[:-1]] == list(range(1, len(lines)))
    assert "".join(line["token"]["text"] for line in lines[:-1]) == expected
    assert lines[-1] == {"generated_text": expected}

    for path in ("get_bs", "get_request_numbers"):
        status, raw = get(f"{frontend.url}/serving/{path}")
        assert status == 200 and json.loads(sse_data(raw)[0])["data"] == 0

    # where the seed clamps silently, we refuse and say why
    for parameters, field in [({"top_p": 0.001, "do_sample": True}, "parameters.top_p"),
                              ({"top_k": -1}, "parameters.top_k"), ({"max_new_tokens": 0}, "parameters.max_new_tokens"),
                              ({"max_new_tokens": 100000}, "parameters.max_new_tokens")]:
        status, raw, _ = post(f"{base}/generate", {"inputs": PROMPT, "parameters": parameters})
        assert status == 400 and field in json.loads(raw)["error"], (parameters, raw)
    assert post(f"{frontend.url}/models/nope/generate", body)[0] == 404


# ---- every door: a client that goes away stops its generation -------------------------------------------

def running(smollm2_server) -> float:
    from mstriton.server_process import metric_value
    return metric_value(smollm2_server.metrics(), "mstriton_requests_running", model="smollm2_decode")


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "max_tokens": 400, "min_tokens": 400,
                              "stream": True}),
    ("/v1/completions", {"model": "smollm2", "prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "stream": True}),
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}),
    ("/models/smollm2/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}),
    # not streamed: the handler waits for the whole answer, and must still see the client go
    ("/v1/chat/completions", {"model": "smollm2", "messages": QUESTION, "max_tokens": 400, "min_tokens": 400}),
    ("/v1/completions", {"model": "smollm2", "prompt": PROMPT, "max_tokens": 400, "min_tokens": 400, "n": 2}),
    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}),
    ("/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}),
    ("/models/smollm2/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 400}}),
])
def test_a_client_that_disconnects_frees_its_slot(frontend, smollm2_server, path, body):
    streamed = path.endswith("_stream") or body.get("stream", False)
    generations = body.get("n", 1)
    connection = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    if streamed:
        response = connection.getresponse()
        assert response.status == 200
        for _ in range(3):
            response.fp.readline()
    started = time.monotonic()
    while running(smollm2_server) != generations:  # the gauge is set after the decode step that admitted it
        assert time.monotonic() - started < 10, "the generation never showed as running"
        time.sleep(0.05)
    connection.sock.shutdown(2)
    connection.close()
    gone = time.monotonic()
    while running(smollm2_server) != 0:
        assert time.monotonic() - gone < 1.0, "the generation went on after its client disconnected"
        time.sleep(0.05)


def test_frontend_metrics_count_requests_by_route_and_status(frontend):
    status, raw = get(f"{frontend.url}/metrics")
    text = raw.decode()
    assert status == 200
    assert 'mstriton_frontend_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'route="/v1/chat/completions",status="400"' in text
    assert "mstriton_frontend_request_seconds_bucket" in text and "mstriton_frontend_requests_in_flight" in text


def gateway_samples(frontend) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the frontend's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, raw = get(f"{frontend.url}/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(raw.decode()) for s in family.samples}


def test_gateway_gauges_and_vllm_histograms_move_under_a_burst(frontend, smollm2_server):
    """The inference gateway's model-server protocol on the frontend's port: 3 long streams at once into 2 slots
    and 1 queue place: vllm:num_requests_running reaches 2 and vllm:num_requests_waiting at least 1 (pod total and
    model_name="smollm2" alike), the KV cache fills, and all three drain to 0; the request histograms count the
    three requests with their tokens."""
    import threading

    def sample(samples, name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    from mstriton.server_process import metric_value

    before = gateway_samples(frontend)
    triton = smollm2_server.metrics()
    block_size = int(metric_value(triton, "mstriton_kv_cache_block_size", model="smollm2_decode"))
    blocks = int(metric_value(triton, "mstriton_kv_cache_blocks_total", model="smollm2_decode"))
    assert block_size > 0 and blocks > 0
    for labels in ({}, {"model_name": "smollm2"}):  # the pod's and the model's
        assert sample(before, "vllm:cache_config_info", block_size=str(block_size), num_gpu_blocks=str(blocks),
                      **labels) == 1
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 120, "min_tokens": 120, "stream": True}
    statuses = []
    streams = [threading.Thread(target=lambda: statuses.append(post(f"{frontend.url}/v1/completions", body)[0]))
               for _ in range(3)]
    for stream in streams:
        stream.start()
    seen = {"running": 0.0, "waiting": 0.0, "usage": 0.0}
    while any(s.is_alive() for s in streams):
        now = gateway_samples(frontend)
        for key, name in (("running", "vllm:num_requests_running"), ("waiting", "vllm:num_requests_waiting"),
                          ("usage", "vllm:kv_cache_usage_perc")):
            total, own = sample(now, name), sample(now, name, model_name="smollm2")
            assert total == own, (name, total, own)  # one LLM served: the pod's sum is its value
            seen[key] = max(seen[key], own)
        time.sleep(0.05)
    assert statuses == [200, 200, 200]
    assert seen["running"] == 2 and seen["waiting"] >= 1 and 0 < seen["usage"] <= 1, seen
    after = gateway_samples(frontend)
    assert sample(after, "vllm:num_requests_running") == 0 and sample(after, "vllm:num_requests_waiting") == 0
    model = {"model_name": "smollm2"}
    assert sample(after, "vllm:e2e_request_latency_seconds_count", **model) - \
        sample(before, "vllm:e2e_request_latency_seconds_count", **model) == 3
    assert sample(after, "vllm:time_to_first_token_seconds_count", **model) - \
        sample(before, "vllm:time_to_first_token_seconds_count", **model) == 3
    assert sample(after, "vllm:generation_tokens_total", **model) - \
        sample(before, "vllm:generation_tokens_total", **model) == 360
    # every token after each request's first chunk is one inter-token gap
    assert sample(after, "vllm:inter_token_latency_seconds_count", **model) - \
        sample(before, "vllm:inter_token_latency_seconds_count", **model) == 3 * 119
    assert sample(after, "vllm:prompt_tokens_total", **model) > sample(before, "vllm:prompt_tokens_total", **model)
    assert sample(after, "vllm:request_success_total", finished_reason="length", **model) - \
        sample(before, "vllm:request_success_total", finished_reason="length", **model) == 3
