"""Limits on what one request may hold (params.RequestLimits), checked before anything is tokenized: the prompt's
bytes, stop / bad words, chat messages, JSON nesting, the HTTP frontend's body. Units without a server, then one
check through the real tritonserver and frontend that a 10 MB prompt is refused at once, never tokenized."""

from __future__ import annotations

import asyncio
import json
import time
import types
import urllib.request

import numpy as np
import pytest

from test_fuzz import MODEL, grpc_stream_error, http_request, limits_servers  # noqa: F401 - first (it imports
# mindspore before protobuf loads); limits_servers: the fuzz test's servers, shared (started once per session)
from mstriton.frontend.errors import ApiError
from mstriton.frontend.fields import Fields, json_body
from mstriton.params import (LIMITS, MAX_JSON_DEPTH, GenerationParams, ParameterError, RequestLimits,
                             check_prompt_fits, check_text_size, json_depth_exceeds)
from mstriton.serving.requests import parse_request
from mstriton.tokenizer import validate_messages

TEN_MB = 10 * 1024 * 1024


def inputs(**arrays):
    return lambda name: arrays.get(name)


def text(value: bytes | str) -> np.ndarray:
    return np.array([[value.encode() if isinstance(value, str) else value]], dtype=object)


# ---- the limits and their settings ---------------------------------------------------------------------------

def test_defaults_and_the_environment_variables_that_set_them():
    assert (LIMITS.max_prompt_bytes, LIMITS.max_words, LIMITS.max_word_bytes, LIMITS.max_messages,
            LIMITS.max_body_bytes) == (1 << 20, 16, 1024, 1024, 4 << 20)
    limits = RequestLimits.from_environment({"MSTRITON_MAX_PROMPT_BYTES": "2048", "MSTRITON_MAX_WORDS": " 4 "})
    assert (limits.max_prompt_bytes, limits.max_words, limits.max_messages) == (2048, 4, 1024)
    for bad in ("0", "-5", "1e6", "lots"):
        with pytest.raises(ValueError, match=r"\$MSTRITON_MAX_MESSAGES must be a positive integer"):
            RequestLimits.from_environment({"MSTRITON_MAX_MESSAGES": bad})


def test_text_size_counts_utf8_bytes_and_names_the_field():
    check_text_size("text_input", "é" * 512, 1024)  # 1024 bytes: at the limit
    with pytest.raises(ParameterError, match=r"'text_input' must be at most 1023 bytes of UTF-8 text, got 1024 bytes"):
        check_text_size("text_input", "é" * 512, 1023)
    with pytest.raises(ParameterError, match="got 1025 bytes"):
        check_text_size("x", b"a" * 1025, 1024)
    # a str longer in characters than the limit is refused without being encoded
    with pytest.raises(ParameterError, match="got 2000 characters"):
        check_text_size("x", "a" * 2000, 1024)
    check_text_size("x", "🚀" * 256, 1024)  # 4 bytes each


# ---- the Triton doors: parse_request, before anything else reads the request ----------------------------------

def test_a_10_mb_prompt_is_refused_from_its_size_before_it_is_decoded():
    # invalid UTF-8 throughout: the error is the size, so the bytes were never decoded
    started = time.perf_counter()
    with pytest.raises(ParameterError, match=rf"'text_input' must be at most {1 << 20} bytes of UTF-8 text, "
                                             rf"got {TEN_MB} bytes"):
        parse_request(inputs(text_input=text(b"\xff" * TEN_MB)))
    assert time.perf_counter() - started < 0.5
    with pytest.raises(ParameterError, match="'messages' must be at most"):  # not parsed as JSON either
        parse_request(inputs(messages=text(b"[" * TEN_MB)))
    # HTTP generate's parameters: MindSpore Serving's / TGI's spelling of the prompt
    with pytest.raises(ParameterError, match="'text_input' must be at most"):
        parse_request(inputs(), {"inputs": "x" * TEN_MB})
    # the limit is the caller's to set
    assert parse_request(inputs(text_input=text("x" * 2000))).text == "x" * 2000
    with pytest.raises(ParameterError, match="at most 1000 bytes"):
        parse_request(inputs(text_input=text("x" * 2000)), limits=RequestLimits(max_prompt_bytes=1000))


def test_stop_and_bad_words_are_counted_and_measured():
    words = [f"w{i}".encode() for i in range(16)]
    parsed = parse_request(inputs(text_input=text("hi"), stop_words=np.array([words], object),
                                  bad_words=np.array([[b"a,b,c"]], object)))
    assert len(parsed.params.stop_words) == 16 and parsed.params.bad_words == ["a", "b", "c"]
    with pytest.raises(ParameterError, match=r"'stop_words' may hold at most 16 words, got 5000"):
        parse_request(inputs(text_input=text("hi"), stop_words=np.array([[b"w"] * 5000], object)))
    with pytest.raises(ParameterError, match=r"'bad_words' may hold at most 16 words, got 17"):
        parse_request(inputs(text_input=text("hi"), bad_words=text(",".join("abcdefghijklmnopq"))))
    with pytest.raises(ParameterError, match=r"'stop_words\[1\]' must be at most 1024 bytes"):
        parse_request(inputs(text_input=text("hi"), stop_words=np.array([[b"ok", b"x" * 1025]], object)))
    with pytest.raises(ParameterError, match="'stop_words' must be at most"):  # one huge item, never decoded
        parse_request(inputs(text_input=text("hi"), stop_words=text(b"\xff" * TEN_MB)))


def test_messages_are_counted_and_their_nesting_bounded():
    one = {"role": "user", "content": "hi"}
    assert len(validate_messages([one] * 1024)) == 1024
    with pytest.raises(ParameterError, match="'messages' may hold at most 1024 messages, got 1025"):
        parse_request(inputs(messages=text(json.dumps([one] * 1025))))
    with pytest.raises(ParameterError, match="at most 3 messages"):
        validate_messages([one] * 4, max_messages=3)
    # Python's json parser recurses: a deep value ended in RecursionError, which left the front model's request
    # unanswered (a hang); deep values that parse are refused too, before anything walks them again
    for deep in ("[" * 100_000 + "]" * 100_000,
                 json.dumps([{**one, "name": json.loads("[" * 200 + "]" * 200)}])):
        with pytest.raises(ParameterError, match=f"'messages' must not nest lists and objects more than "
                                                 f"{MAX_JSON_DEPTH} deep"):
            parse_request(inputs(messages=text(deep)))
    with pytest.raises(ParameterError, match=r"'messages\[0\].role' must be one of .*got 'xxxx"):
        validate_messages([{"role": "x" * 10_000, "content": "hi"}])
    assert not json_depth_exceeds([[{"a": [1]}]], 4) and json_depth_exceeds([[{"a": [1]}]], 3)


@pytest.mark.parametrize("field, value", [("temperature", float("inf")), ("repetition_penalty", float("inf")),
                                          ("temperature", float("nan")), ("top_p", float("nan")),
                                          ("presence_penalty", float("inf")), ("repetition_penalty", 0.0)])
def test_infinite_and_nan_settings_are_refused(field, value):
    # HTTP generate's JSON reads `Infinity`, and 1e300 arrives in an FP32 input as inf: temperature inf was
    # accepted and sampled before
    with pytest.raises(ParameterError, match=f"'{field}' must be"):
        GenerationParams(**{field: value}).validate(max_new_tokens_limit=100, vocab_size=100)


# ---- the tokenizer step: a prompt that cannot fit is refused from its size ------------------------------------

def test_prompt_fit_bound_from_the_vocabularys_longest_token(tmp_path):
    from conftest import copy_test_hf_tokenizer, copy_test_tokenizer
    from mstriton.tokenizer import load_tokenizer

    copy_test_hf_tokenizer(tmp_path)
    copy_test_tokenizer(tmp_path)
    hf, sp = load_tokenizer(tmp_path / "tokenizer.json"), load_tokenizer(tmp_path / "tokenizer.model")
    rng = np.random.default_rng(0)
    words = ["MindSpore", "graphs", "served", "by", "Triton", "的", "🚀", "   ", "\n", "quick", "x", "The"]
    for _ in range(50):
        sample = "".join(rng.choice(words, size=int(rng.integers(1, 40))))
        # the bound the check rests on: no text takes fewer tokens than its bytes / max_token_bytes
        assert len(sample.encode()) <= len(hf.encode(sample, add_special_tokens=False)) * hf.max_token_bytes
        plain = " ".join(rng.choice(words[:5] + words[9:], size=int(rng.integers(1, 40))))
        assert len(plain.encode()) <= len(sp.encode(plain, add_special_tokens=False)) * sp.max_token_bytes
    # the exception the bound documents: sentencepiece folds a run of spaces (or of unknown characters) into one
    # token, so such text can fit where its size says it cannot
    assert len(sp.encode("a" + " " * 100 + "b", add_special_tokens=False)) * sp.max_token_bytes < 102
    check_prompt_fits("text_input", 127 * 10, max_seq_len=128, max_token_bytes=10)
    with pytest.raises(ParameterError, match=r"'messages' must be at most 1270 bytes for this model .*"
                                             r"max_seq_len=128 tokens\), got 1271 bytes"):
        check_prompt_fits("messages", 1271, max_seq_len=128, max_token_bytes=10)


def test_words_that_tokenize_to_nothing_are_left_out(tmp_path):
    """A bad word " " tokenized to [] (sentencepiece drops a lone space) and killed the decode loop's thread with an
    IndexError: every later request hung."""
    from conftest import copy_test_tokenizer
    from mstriton.tokenizer import load_tokenizer

    copy_test_tokenizer(tmp_path)
    sp = load_tokenizer(tmp_path / "tokenizer.model")
    assert sp.encode(" ", add_special_tokens=False) == []
    assert sp.encode_words([" ", "", "fox"]) == [sp.encode("fox", add_special_tokens=False)]


# ---- the HTTP frontend -------------------------------------------------------------------------------------------

def request_of(chunks: list[bytes], headers: dict[str, str], limits: RequestLimits = LIMITS):
    """A Starlette request whose body arrives in `chunks`, and the list of chunks the app has read."""
    from starlette.requests import Request

    read = []

    async def receive():
        if len(read) < len(chunks):
            read.append(chunks[len(read)])
            return {"type": "http.request", "body": read[-1], "more_body": len(read) < len(chunks)}
        return {"type": "http.disconnect"}

    app = types.SimpleNamespace(state=types.SimpleNamespace(limits=limits))
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "app": app, "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive), read


def body_error(chunks, headers=None, limits=LIMITS) -> tuple[ApiError, int]:
    request, read = request_of(chunks, headers or {}, limits)
    with pytest.raises(ApiError) as raised:
        asyncio.run(json_body(request))
    return raised.value, len(read)


def test_an_oversized_body_gets_413_from_its_content_length_unread_or_as_soon_as_the_limit_is_passed():
    error, read = body_error([b"x" * 1000] * 10, {"Content-Length": str(TEN_MB)})
    assert (error.status, error.param, read) == (413, "body", 0)
    assert error.message == f"the request body must be at most {4 << 20} bytes, got {TEN_MB} bytes"
    # no Content-Length (chunked): reading stops at the first chunk past the limit
    error, read = body_error([b"x" * 400] * 10, limits=RequestLimits(max_body_bytes=1000))
    assert (error.status, read) == (413, 3)
    request, _ = request_of([b'{"a": ', b"1}"], {})
    assert asyncio.run(json_body(request)) == {"a": 1}


@pytest.mark.parametrize("body, message", [
    (b"", "not valid JSON"), (b"\xff\xfe", "not valid JSON"), (b"[1]", "must be a JSON object, got list"),
    (b"[" * 100_000 + b"]" * 100_000, f"more than {MAX_JSON_DEPTH} deep"),  # RecursionError: was a 500
    (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", f"more than {MAX_JSON_DEPTH} deep"),
])
def test_bodies_that_are_no_json_object_are_400(body, message):
    error, _ = body_error([body])
    assert error.status == 400 and message in error.message


def test_numbers_beyond_floats_are_400_not_500():
    """Python's JSON reads 1e400 as inf and integers of any size: math.isfinite(10**400) raised OverflowError."""
    for value, integer in ((10 ** 400, False), (-10 ** 400, False), (-10 ** 400, True), (float("inf"), False),
                           (float("inf"), True), (float("nan"), False), (1.5, True)):
        with pytest.raises(ApiError) as raised:
            Fields({"t": value}).number("t", low=0.0, integer=integer)
        assert raised.value.status == 400 and len(raised.value.message) < 200
    # an integer without an upper bound is taken as it is: the front model's INT32 input bounds it (below)
    assert Fields({"n": 10 ** 400}).integer("n", low=1) == 10 ** 400


def test_the_frontend_refuses_numbers_its_triton_inputs_cannot_hold():
    from mstriton.frontend.triton import _tensor

    with pytest.raises(ApiError, match=r"'parameters.max_new_tokens' must be in \[-2147483648, 2147483647\]"):
        _tensor("max_tokens", 10 ** 12, "parameters.max_new_tokens")
    with pytest.raises(ApiError, match="'temperature' must be a finite 32-bit number"):
        _tensor("temperature", 1e300, "temperature")
    assert _tensor("seed", 2 ** 63, "seed").datatype() == "UINT64"


def test_stop_strings_share_the_stop_word_limits():
    assert Fields({"stop": ["a"] * 16}).texts("stop", max_items=16) == ["a"] * 16
    for value, message in ((["a"] * 17, "'stop' may hold at most 16 words, got 17"),
                           ("x" * 1025, r"'stop\[0\]' must be at most 1024 bytes"), ([""], "non-empty")):
        with pytest.raises(ApiError, match=message):
            Fields({"stop": value}).texts("stop", max_items=16)


# ---- through the real tritonserver and frontend ----------------------------------------------------------------

def tokenizer_executions(server, model: str) -> int:
    with urllib.request.urlopen(f"http://{server.http}/v2/models/{model}_tokenizer/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"][0]
    return stats["inference_stats"]["success"]["count"] + stats["inference_stats"]["fail"]["count"]


def test_a_10_mb_prompt_is_refused_at_once_by_the_front_model_and_by_the_frontend(limits_servers):
    server, frontend = limits_servers
    prompt = "word " * (TEN_MB // 5)
    before = tokenizer_executions(server, MODEL)

    started = time.perf_counter()
    error = grpc_stream_error(server, MODEL, {"text_input": text(prompt), "max_tokens": np.array([[4]], np.int32)})
    grpc_seconds = time.perf_counter() - started
    assert f"invalid request: 'text_input' must be at most {1 << 20} bytes of UTF-8 text, got {TEN_MB} bytes" in error

    started = time.perf_counter()
    status, body = http_request(f"http://{server.http}/v2/models/{MODEL}_unary/generate",
                                json.dumps({"text_input": prompt, "max_tokens": 4}).encode())
    unary_seconds = time.perf_counter() - started
    assert status == 400 and f"got {TEN_MB} bytes" in body

    started = time.perf_counter()
    status, body = http_request(f"{frontend.url}/v1/completions",
                                json.dumps({"model": MODEL, "prompt": prompt}).encode())
    frontend_seconds = time.perf_counter() - started
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    # under the body limit, over the prompt's: 400 naming the field as the client spelled it
    status, body = http_request(f"{frontend.url}/generate", json.dumps({"inputs": "x" * (2 << 20)}).encode())
    assert status == 400 and json.loads(body)["error"].startswith(f"'inputs' must be at most {1 << 20} bytes")

    # none of it reached the tokenizer (whose 2.3 s per megabyte on SmolLM2's tokenizer is what this saves)
    assert tokenizer_executions(server, MODEL) == before
    # generous bounds on a shared 2-core machine: moving 10 MB through tritonserver takes ~0.3 s here
    assert grpc_seconds < 10 and unary_seconds < 10 and frontend_seconds < 5, \
        (grpc_seconds, unary_seconds, frontend_seconds)


def test_a_prompt_that_cannot_fit_is_refused_by_the_tokenizer_step_from_its_size(limits_servers):
    server, _ = limits_servers
    status, body = http_request(f"http://{server.http}/v2/models/{MODEL}_unary/generate",
                                json.dumps({"text_input": "x" * 100_000, "max_tokens": 4}).encode())
    assert status == 400 and "max_seq_len=128 tokens), got 100000 bytes" in body, body



def test_a_bad_word_that_tokenizes_to_nothing_leaves_the_decode_loop_running(limits_servers):
    """bad_words [" "]: sentencepiece drops a lone space, the empty ban raised IndexError in the decode model's loop
    thread, and every request after it hung."""
    server, _ = limits_servers
    url = f"http://{server.http}/v2/models/{MODEL}_unary/generate"
    for body in ({"text_input": "The quick", "max_tokens": 3, "bad_words": [" "]},
                 {"text_input": "The quick", "max_tokens": 3}):
        status, text = http_request(url, json.dumps(body).encode(), timeout=60)
        assert status == 200 and json.loads(text)["num_output_tokens"] == 3, text
