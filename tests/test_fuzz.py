"""Fuzz: a few thousand seeded random malformed requests through every door of the real tritonserver and frontend:
Triton's HTTP generate / generate_stream (front model and NAME_unary), KServe /infer on NAME_unary, tritonclient
gRPC (a stream to the front model, infer on NAME_unary), and the frontend's OpenAI, MindSpore Serving and TGI
routes. Wrong types, wrong shapes, out-of-range and huge values, deeply nested JSON, invalid UTF-8, NaN and
infinities, unknown fields, too many or too long words and messages, empty and non-JSON bodies.

Every request is malformed under its door's contract, so every one must be refused: a 4xx, an INVALID_ARGUMENT, an
error response on a stream; never a 5xx from our code, never a hang. tritonserver and its model processes keep
their PIDs, no Python traceback reaches the logs, and greedy streams running beside the fuzz all the while give
exactly a solo run's text.

One class of 5xx is tritonserver 2.51's own and cannot be changed from a model: its HTTP JSON parser answers a
body that is not JSON, not an object, or a value of the wrong JSON type for a declared input (a string for
max_tokens, null for text_input, -1 for the UINT64 seed, a KServe input without `inputs`) with HTTP 500 before any
model sees the request. Those cases are marked where they are made, and only they may get 500, only with the
parser's own messages (TRITON_PARSER_500). Deeper than about 40,000 levels, the same parser crashes tritonserver
(a stack overflow, rapidjson's recursive parse; fixed upstream in triton-inference-server/common#156, not in
2.51), so nesting sent to Triton's HTTP port stays at most MAX_TRITON_DEPTH; the frontend gets any depth.

The seed is MSTRITON_FUZZ_SEED (default 15); a failure names the case's door, mutations and seed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import queue
import random
import threading
import time
import urllib.parse
from pathlib import Path

# mindspore before anything loads protobuf: its generated code needs the pure-Python protobuf it selects on import,
# and the server fixture converts a model in this process, while the clients (tritonclient) load protobuf too
import mindspore  # noqa: F401,I001
import numpy as np
import pytest

from conftest import serving_streaming_checkpoint

MODEL = "fuzz"
SEED = int(os.environ.get("MSTRITON_FUZZ_SEED", "15"))
# requests per door; about 2,500 in all, two to three minutes here on two shared cores
COUNTS = {"triton_generate": 600, "kserve_infer": 300, "grpc_stream": 250, "grpc_unary": 250, "frontend": 1100}
# tritonserver 2.51's HTTP JSON parser crashed the server at 40,000 levels of nesting (20,000 passed)
MAX_TRITON_DEPTH = 5000
PROMPT = "The quick brown fox"
BESIDE_PROMPT, BESIDE_TOKENS = "Streaming keeps every space", 60
TIMEOUT = 60  # seconds for any one request: more is a hang
TRITON_PARSER_500 = ("failed to parse the request JSON buffer", "attempt to get members for non-object",
                     "Unable to parse", "attempt to access", "Converting keyword: 'parameters': Unable to parse")
# Messages of tritonserver's own checks of a request against the model's config (all INVALID_ARG)
TRITON_REFUSALS = ("unexpected inference input", "data-type is", "unexpected shape for input",
                   "batch size does not match", "unexpected inference output", "expected", "already exists",
                   "has invalid type", "out of bounds index", "unexpected size for input")
INVALID = "invalid request: "


# ---- the servers: one tritonserver and one frontend, shared with test_input_limits.py ----------------------------

_SHARED: dict = {}


@pytest.fixture(scope="session")
def limits_servers(request, tmp_path_factory):
    """(tritonserver, frontend) serving the streaming test checkpoint as MODEL: 4 slots of 128 tokens, no chat
    template. Started once per session however many modules ask for it (each module that imports this fixture
    gets a fixture definition of its own; the servers are cached here)."""
    if "servers" not in _SHARED:
        from mstriton.server_process import running_frontend

        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)
        root = tmp_path_factory.mktemp("limits")
        server = stack.enter_context(serving_streaming_checkpoint(root, {MODEL: 4}))
        frontend = stack.enter_context(running_frontend(server, root / "frontend.log"))
        _SHARED["servers"] = (server, frontend)
    return _SHARED["servers"]


# ---- clients -----------------------------------------------------------------------------------------------------

def http_request(url: str, body: bytes, timeout: float = TIMEOUT, method: str = "POST") -> tuple[int, str]:
    """(status, body text) of one HTTP request; a response cut short reads as what arrived."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, parts.path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        try:
            data = response.read()
        except http.client.IncompleteRead as exc:
            data = exc.partial
        return response.status, data.decode("utf-8", "replace")
    finally:
        connection.close()


def _infer_inputs(arrays: dict):
    """name -> numpy array, or (array, datatype) to send a datatype the array's dtype would not say."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tensors = []
    for name, value in arrays.items():
        array, datatype = value if isinstance(value, tuple) else (value, None)
        datatype = datatype or ("BYTES" if array.dtype == np.object_ else np_to_triton_dtype(array.dtype))
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def grpc_stream_text(server, model: str, arrays: dict) -> tuple[str, str | None]:
    """(the joined text_output, the error message or None) of one gRPC stream to the decoupled `model`."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    pieces, error, ended = [], None, False
    try:
        client.async_stream_infer(model, _infer_inputs(arrays), enable_empty_final_response=True)
        while True:
            try:
                result, err = results.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no answer from {model} in {TIMEOUT} s: a hang") from None
            if err is not None:
                error = str(err)
                break
            if result.as_numpy("text_output") is not None:
                pieces.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        ended = True
    finally:
        # a stream whose request never ended is cancelled: stopping it plainly would wait for that end forever
        client.stop_stream(cancel_requests=not ended)
        client.close()
    return "".join(pieces), error


def grpc_stream_error(server, model: str, arrays: dict) -> str:
    text, error = grpc_stream_text(server, model, arrays)
    assert error is not None, f"accepted: {text!r}"
    return error


# ---- building malformed requests ---------------------------------------------------------------------------------

class Raw:
    """Bytes spliced into a JSON body as they are: invalid UTF-8, deep nesting, tokens JSON has not."""

    def __init__(self, data: bytes):
        self.data = data


def encode(body) -> bytes:
    """`body` as JSON (NaN and Infinity as those tokens), its Raw values spliced in as bytes."""
    raws: list[bytes] = []

    def default(value):
        if isinstance(value, Raw):
            raws.append(value.data)
            return f"@@raw{len(raws) - 1}@@"
        raise TypeError(type(value).__name__)

    data = json.dumps(body, default=default).encode()
    for i, raw in enumerate(raws):
        data = data.replace(f'"@@raw{i}@@"'.encode(), raw)
    return data


def nested(depth: int, leaf: bytes = b"") -> Raw:
    return Raw(b"[" * depth + leaf + b"]" * depth)


INVALID_UTF8 = [b"\xff", b"\xfe\xfe", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\xbc", b"\xed\xa0\x80", b"\xc0\xaf"]


def bad_utf8_text(rng: random.Random) -> bytes:
    """Text with invalid UTF-8 bytes somewhere in it."""
    return b"The " + rng.choice(INVALID_UTF8) + b" quick"


@dataclasses.dataclass
class Case:
    door: str
    mutations: list[str]
    target: str                 # path, or the gRPC model
    payload: object             # bytes (HTTP) or {name: array} (gRPC)
    parser_500: bool = False    # tritonserver's own JSON parser may answer it with 500 (see the docstring)

    def describe(self) -> str:
        return f"{self.door} {self.target} {self.mutations} (seed {SEED})"


# The front model's inputs by type, and values each certainly refuses after tritonserver's conversion (an INT32
# from JSON is truncated to 32 bits: 2**31 + 17 arrives negative, so only values that stay wrong are used).
INT_FIELDS = {"max_tokens": [0, -1, -7, -2 ** 31, 2 ** 31, 2 ** 31 + 17, 1000, 10 ** 6],
              "max_new_tokens": [0, -3, 5000], "min_tokens": [-1, -100, 5, 2 ** 31 - 1], "min_length": [-2, 7],
              "top_k": [-1, -2 ** 31, 2 ** 31 + 1], "end_id": [-1, 10 ** 6, -2 ** 31], "pad_id": [-5, 10 ** 7],
              "stream_interval": [0, -1, 257, 10 ** 6], "top_logprobs": [-1, 21, 10 ** 5]}
FLOAT_FIELDS = {"temperature": [-0.01, -1e30, 1e39, "nan", "inf", "-inf"],
                "top_p": [0.0, -0.5, 1.0001, 2.0, "nan", "inf", 1e39],
                "repetition_penalty": [0.0, -1.0, "nan", "inf", 1e39],
                "presence_penalty": [2.5, -2.5, "nan", "inf", 1e39, -1e39],
                "frequency_penalty": [3.0, -2.01, "nan", "-inf"]}
BOOL_FIELDS = ["stream", "exclude_input_in_output", "return_full_text", "do_sample", "return_log_probs",
               "skip_special_tokens", "return_tokens", "fit_max_tokens"]
# base max_tokens is 4: these replace it (an alias would lose to it)
REPLACES_MAX_TOKENS = {"max_new_tokens"}


def _float(value) -> float:
    return float(value) if isinstance(value, str) else value


def out_of_range(rng: random.Random) -> tuple[str, object]:
    fields = {**INT_FIELDS, **FLOAT_FIELDS}
    name = rng.choice(sorted(fields))
    return name, _float(rng.choice(fields[name]))


def wrong_json_type(rng: random.Random, name: str):
    """A JSON value of the wrong type for the input `name` (never one tritonserver would convert)."""
    if name in FLOAT_FIELDS:
        return rng.choice(["abc", True, None, {}, {"a": 1}, "1.5"])
    if name in BOOL_FIELDS:
        return rng.choice(["yes", 1.5, None, {}, "true", 2])
    if name in ("text_input", "messages", "stop_words", "bad_words"):
        return rng.choice([5, True, None, 1.5, {}, {"a": "b"}])
    return rng.choice(["abc", True, 1.5, None, {}, {"a": 1}, "4"])


def messages_defect(rng: random.Random) -> bytes:
    """A `messages` JSON text no model takes (the fuzz model has no chat template: it refuses good ones too)."""
    one = {"role": "user", "content": "hi"}
    choice = rng.randrange(10)
    if choice == 0:
        return b"not json ["
    if choice == 1:
        return json.dumps([one] * rng.randint(1025, 1100)).encode()
    if choice == 2:
        return b"[" * rng.randint(100, 50_000) + b"]" * 3
    if choice == 3:
        return json.dumps([{**one, "name": json.loads("[" * 80 + "]" * 80)}]).encode()
    if choice == 4:
        return json.dumps([{"role": rng.choice(["wizard", 5, None, "x" * 5000]), "content": "hi"}]).encode()
    if choice == 5:
        return json.dumps([{"role": "user", "content": rng.choice([5, [1], [{"type": "image_url"}], {}])}]).encode()
    if choice == 6:
        return json.dumps(rng.choice([[], {}, "hi", [["user", "hi"]], [None]])).encode()
    if choice == 7:
        return b'[{"role": "user", "content": "' + rng.choice(INVALID_UTF8) + b'"}]'
    if choice == 8:
        return b'[{"role": "user", "content": "a\\ud800b"}]'  # a JSON escape of a lone surrogate
    return json.dumps([one]).encode()  # well formed: refused, as this model has no chat template


def json_string(data: bytes) -> str | Raw:
    """`data` as a JSON string value: as text when it is UTF-8, else spliced in as bytes."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Raw(b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')


def words_defect(rng: random.Random):
    """stop_words / bad_words that break a limit: too many, too long, not UTF-8."""
    choice = rng.randrange(4)
    if choice == 0:
        return [f"w{i}" for i in range(rng.randint(17, 60))]
    if choice == 1:
        return ",".join(f"w{i}" for i in range(rng.randint(17, 40)))
    if choice == 2:
        return ["ok", "x" * rng.randint(1025, 5000)]
    return Raw(b'["ok", "' + rng.choice(INVALID_UTF8) + b'"]')


def noise(rng: random.Random, body: dict) -> None:
    """Unknown fields, which the Triton doors pass as request parameters and ignore (as tensorrtllm_backend):
    never the only defect there."""
    for _ in range(rng.randrange(3)):
        body[f"zz_{rng.randrange(1000)}"] = rng.choice([1, True, "x", -5, "é🚀"])


# -- Triton HTTP generate ---------------------------------------------------------------------------------------

def triton_generate_case(rng: random.Random) -> Case:
    path = rng.choice([f"/v2/models/{MODEL}/generate", f"/v2/models/{MODEL}/generate_stream",
                       f"/v2/models/{MODEL}_unary/generate"])
    body: dict = {"text_input": PROMPT, "max_tokens": 4}
    mutations, parser_500 = [], False
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.choice(["range", "range", "type", "prompt", "messages", "words", "nesting", "body", "utf8",
                           "parameters", "duplicate"])
        mutations.append(kind)
        if kind == "range":
            name, value = out_of_range(rng)
            if name in REPLACES_MAX_TOKENS:
                body.pop("max_tokens", None)
            if name in ("min_tokens", "min_length") and value > 0:
                body["max_tokens"] = 4
            body[name] = value
            mutations[-1] += f":{name}={value}"
        elif kind == "type":
            name = rng.choice(sorted(INT_FIELDS) + sorted(FLOAT_FIELDS) + BOOL_FIELDS + ["text_input", "seed"])
            value = -1 if name == "seed" else wrong_json_type(rng, name)
            if name in REPLACES_MAX_TOKENS:
                body.pop("max_tokens", None)
            body[name] = value
            mutations[-1] += f":{name}={value!r}"[:60]
            parser_500 = True
        elif kind == "prompt":
            choice = rng.randrange(6)
            if choice == 0:
                body.pop("text_input", None)
            elif choice == 1:
                body["text_input"] = rng.choice(["", " ", "\n\t "])
            elif choice == 2:
                body["text_input"] = "x" * rng.randint(2000, 60_000)  # cannot fit 128 tokens: refused unread
            elif choice == 3 and rng.random() < 0.1:
                body["text_input"] = "y" * ((1 << 20) + rng.randint(1, 5000))  # over the prompt limit
            else:
                body["text_input"] = ["a", "b"]  # two prompts: one request holds one
            mutations[-1] += f":{choice}"
        elif kind == "messages":
            body["messages"] = json_string(messages_defect(rng))
            if rng.random() < 0.7:
                body.pop("text_input", None)
        elif kind == "words":
            body[rng.choice(["stop_words", "bad_words"])] = words_defect(rng)
        elif kind == "nesting":
            # never one element: a nested list holding one value is a well-formed tensor of one value
            body[rng.choice(["text_input", "max_tokens", "zz_deep", "temperature"])] = nested(
                rng.randint(2, MAX_TRITON_DEPTH), rng.choice([b"", b"1, 2", b'"a", "b"']))
            parser_500 = True
        elif kind == "body":
            choice = rng.randrange(6)
            mutations[-1] += f":{choice}"
            raw = [b"", b"not json", encode(body)[:-rng.randint(1, 5)], b"[1, 2]", b'"text"',
                   b"[" * rng.randint(1, MAX_TRITON_DEPTH) + b"]"][choice]
            return Case("triton_generate", mutations, path, raw, parser_500=True)
        elif kind == "utf8":
            body["text_input"] = Raw(b'"' + bad_utf8_text(rng) + b'"')
        elif kind == "parameters":
            # HTTP generate's parameters object: tritonserver makes the keys that name an input into that input
            # (a value of the wrong type meets its parser), and passes the others on as request parameters
            name, value, replaces, wrong_type = rng.choice([
                ("max_tokens", 0, None, False), ("top_k", -1, None, False), ("max_new_tokens", -4, "max_tokens", False),
                ("inputs", 5, "text_input", False), ("nested", {"a": 1}, None, False),
                ("temperature", "hot", None, True),
                ("stream", "x", None, True), ("seed", "abc", None, True), ("top_p", "2", None, True),
                ("stop_words", 7, None, True)])
            if replaces:
                body.pop(replaces, None)
            if isinstance(body.get("parameters"), dict):
                body["parameters"][name] = value
            else:
                body["parameters"] = {name: value}
            parser_500 = parser_500 or wrong_type
            mutations[-1] += f":{name}"
        else:  # the same input twice
            return Case("triton_generate", mutations, path,
                        encode(body)[:-1] + b', "stream_interval": 1, "stream_interval": 2}', parser_500=parser_500)
    noise(rng, body)
    return Case("triton_generate", mutations, path, encode(body), parser_500=parser_500)


# -- KServe /infer -------------------------------------------------------------------------------------------------

def _kserve_input(name: str, datatype: str, data, shape=None) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [1, 1], "data": data}


KSERVE_TYPES = {**{n: "INT32" for n in INT_FIELDS}, **{n: "FP32" for n in FLOAT_FIELDS},
                **{n: "BOOL" for n in BOOL_FIELDS}, "seed": "UINT64"}


def kserve_case(rng: random.Random) -> Case:
    base = {"text_input": _kserve_input("text_input", "BYTES", [PROMPT]),
            "max_tokens": _kserve_input("max_tokens", "INT32", [4])}
    inputs = dict(base)
    body: dict = {}
    mutations, parser_500 = [], False
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.choice(["range", "range", "dtype", "shape", "unknown", "missing", "data_type", "structure",
                           "utf8", "words", "prompt", "batch", "output", "body", "nesting"])
        mutations.append(kind)
        if kind == "range":
            name, value = out_of_range(rng)
            if isinstance(value, int) and not -2 ** 31 <= value < 2 ** 31:
                value = -1  # KServe's JSON is not truncated the same way: keep to values INT32 holds
            if name in REPLACES_MAX_TOKENS:
                inputs.pop("max_tokens", None)
            inputs[name] = _kserve_input(name, KSERVE_TYPES[name], [value])
            mutations[-1] += f":{name}={value}"
        elif kind == "dtype":
            name = rng.choice(["text_input", "max_tokens", "temperature", "stream"])
            wrong = rng.choice([t for t in ("INT32", "INT64", "FP32", "FP64", "BOOL", "BYTES", "UINT8")
                                if t != {**KSERVE_TYPES, "text_input": "BYTES"}[name]])
            value = {"BYTES": "x", "BOOL": True}.get(wrong, 1)
            inputs[name] = _kserve_input(name, wrong, [value])
            mutations[-1] += f":{name}:{wrong}"
        elif kind == "shape":
            name = rng.choice(["text_input", "max_tokens"])
            data = inputs.get(name, base[name])["data"]
            shape, data = rng.choice([([1, 2], data * 2), ([2], data * 2), ([1, 1], data * 2), ([1, 0], []),
                                      ([1, 1, 1], data), ([3, 1], data)])
            inputs[name] = {**inputs.get(name, base[name]), "shape": shape, "data": data}
            # a shape whose size is not the data's is the parser's to refuse (500)
            parser_500 = parser_500 or int(np.prod(shape)) != len(data)
            mutations[-1] += f":{name}:{shape}"
        elif kind == "unknown":
            name = rng.choice(["zz", "stop", "text", "inputs"])
            inputs[name] = _kserve_input(name, "BOOL" if name == "stop" else "BYTES",
                                         [True] if name == "stop" else ["x"])
        elif kind == "missing":
            inputs.pop("text_input", None)
        elif kind == "data_type":
            name = rng.choice(["text_input", "max_tokens"])
            inputs[name] = {**inputs.get(name, base[name]), "data": [rng.choice([None, {"a": 1}, True] +
                                                                ([1] if name == "text_input" else ["4", 4.5]))]}
            parser_500 = True
        elif kind == "structure":
            choice = rng.randrange(5)
            mutations[-1] += f":{choice}"
            if choice == 0:
                return Case("kserve_infer", mutations, f"/v2/models/{MODEL}_unary/infer",
                            encode({"inputs": base["text_input"]}), parser_500=True)
            if choice == 1:
                return Case("kserve_infer", mutations, f"/v2/models/{MODEL}_unary/infer", encode({}),
                            parser_500=True)
            if choice == 2:
                return Case("kserve_infer", mutations, f"/v2/models/{MODEL}_unary/infer",
                            encode({"inputs": []}))
            if choice == 3:
                inputs["text_input"] = {**inputs.get("text_input", base["text_input"]), "shape": [-1, 1]}
                parser_500 = True
            else:
                inputs["text_input"] = {k: v for k, v in base["text_input"].items() if k != "datatype"}
                parser_500 = True
        elif kind == "utf8":
            inputs["text_input"] = {**base["text_input"], "data": [Raw(b'"' + bad_utf8_text(rng) + b'"')]}
        elif kind == "words":
            words = [f"w{i}" for i in range(rng.randint(17, 40))] if rng.random() < 0.6 else \
                ["x" * rng.randint(1025, 3000)]
            inputs["stop_words"] = _kserve_input("stop_words", "BYTES", words, [1, len(words)])
        elif kind == "prompt":
            inputs["text_input"] = _kserve_input("text_input", "BYTES", [rng.choice(
                ["", "  ", "z" * rng.randint(1500, 40_000)])])
        elif kind == "batch":  # two requests in one: consistent shapes, refused by the model
            for name, item in list(inputs.items()):
                inputs[name] = {**item, "shape": [item["shape"][0] * 2] + item["shape"][1:], "data": item["data"] * 2}
        elif kind == "output":
            body["outputs"] = [{"name": rng.choice(["nope", "input_ids", "text_input"])}]
        elif kind == "nesting":
            inputs["text_input"] = {**inputs.get("text_input", base["text_input"]),
                                    "data": [nested(rng.randint(2, MAX_TRITON_DEPTH))]}
            parser_500 = True
        else:
            choice = rng.randrange(4)
            mutations[-1] += f":{choice}"
            raw = [b"", b"{", b"[]", b'{"inputs": 5}'][choice]
            return Case("kserve_infer", mutations, f"/v2/models/{MODEL}_unary/infer", raw, parser_500=True)
    body["inputs"] = list(inputs.values())
    return Case("kserve_infer", mutations, f"/v2/models/{MODEL}_unary/infer", encode(body), parser_500=parser_500)


# -- tritonclient gRPC ---------------------------------------------------------------------------------------------

NP_TYPES = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}


def _array(value, datatype: str, shape=(1, 1)) -> np.ndarray:
    if datatype == "BYTES":
        items = value if isinstance(value, list) else [value]
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in items], object).reshape(shape)
    with np.errstate(over="ignore"):  # 1e39 is meant to arrive as inf in an FP32 input
        return np.full(shape, value, NP_TYPES[datatype])


def grpc_arrays(rng: random.Random, unary: bool) -> tuple[dict, list[str]]:
    arrays = {"text_input": _array(PROMPT, "BYTES"), "max_tokens": _array(4, "INT32")}
    mutations = []
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.choice(["range", "range", "dtype", "shape", "batch", "utf8", "prompt", "words", "messages",
                           "unknown", "missing"])
        mutations.append(kind)
        if kind == "range":
            name, value = out_of_range(rng)
            datatype = KSERVE_TYPES[name]
            if datatype == "INT32" and not -2 ** 31 <= value < 2 ** 31:
                value = -2 ** 31  # refused by every INT32 input (top_k takes any large value)
            if name in REPLACES_MAX_TOKENS:
                arrays.pop("max_tokens", None)
            arrays[name] = _array(value, datatype)
            mutations[-1] += f":{name}={value}"
        elif kind == "dtype":
            name = rng.choice(["text_input", "max_tokens", "temperature", "stream", "seed"])
            arrays[name] = rng.choice([np.array([[1]], np.int64), np.array([[1.0]], np.float64),
                                       np.array([[1]], np.int8), np.array([[b"1"]], object)])
            if arrays[name].dtype == np.object_ and name == "text_input":
                arrays[name] = np.array([[7]], np.int32)
            mutations[-1] += f":{name}:{arrays[name].dtype}"
        elif kind == "shape":
            name = rng.choice(["text_input", "max_tokens", "stop_words"])
            item = np.asarray(arrays.get(name, _array("a", "BYTES"))).reshape(1, -1)
            arrays[name] = rng.choice([np.repeat(item, 2, axis=1), item.reshape(-1), item.reshape(1, 1, -1),
                                       np.repeat(item, 2, axis=0), item[:, :0]])
            if name == "stop_words" and arrays[name].ndim == 2 and arrays[name].shape[0] == 1:
                arrays[name] = arrays[name].reshape(1, 1, -1)  # a [1, n] list of words is well formed
            mutations[-1] += f":{name}:{list(arrays[name].shape)}"
        elif kind == "batch":
            arrays = {name: np.repeat(item, 2, axis=0) for name, item in arrays.items()}
        elif kind == "utf8":
            name = rng.choice(["text_input", "stop_words", "bad_words"])
            arrays[name] = _array([bad_utf8_text(rng)], "BYTES")
            mutations[-1] += f":{name}"
        elif kind == "prompt":
            choice = rng.randrange(4)
            arrays["text_input"] = _array([b"", b" \n ", b"p" * rng.randint(2000, 80_000),
                                           b"q" * ((1 << 20) + 1)][choice] if choice < 3 or rng.random() < 0.2
                                          else b"", "BYTES")
            mutations[-1] += f":{choice}"
        elif kind == "words":
            words = words_defect(rng)
            if isinstance(words, Raw):
                words = [b"ok", rng.choice(INVALID_UTF8)]
            words = [words] if isinstance(words, str) else words
            arrays[rng.choice(["stop_words", "bad_words"])] = _array(words, "BYTES", (1, len(words)))
        elif kind == "messages":
            arrays["messages"] = _array([messages_defect(rng)], "BYTES")
            if rng.random() < 0.7:
                arrays.pop("text_input", None)
        elif kind == "unknown":
            arrays[rng.choice(["zz", "text", "input_ids"])] = _array(1, "INT32")
        else:
            arrays.pop("text_input", None)
    if unary and "stop" in arrays:
        arrays.pop("stop")
    return arrays, mutations


def grpc_case(rng: random.Random, unary: bool) -> Case:
    arrays, mutations = grpc_arrays(rng, unary)
    return Case("grpc_unary" if unary else "grpc_stream", mutations, f"{MODEL}_unary" if unary else MODEL, arrays)


# -- the HTTP frontend ---------------------------------------------------------------------------------------------

OPENAI_RANGES = [("temperature", 2.5), ("temperature", -0.1), ("temperature", float("nan")),
                 ("temperature", float("inf")), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 17), ("n", 10 ** 400),
                 ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 10 ** 400), ("max_tokens", 2 ** 31),
                 ("max_tokens", 1000), ("top_k", -2), ("top_k", 2 ** 40), ("seed", -1), ("seed", 2 ** 64),
                 ("presence_penalty", 3), ("frequency_penalty", -3), ("min_tokens", -1), ("min_tokens", 1000),
                 ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", 1e39),
                 ("repetition_penalty", 1e400), ("max_completion_tokens", 0)]
OPENAI_TYPES = {"temperature": ["hot", True, [1]], "n": ["2", 1.5, True], "stream": ["yes", 1, []],
                "stop": [5, [1], {"a": 1}, [None]], "max_tokens": ["10", 4.5, {}], "top_p": ["1", False],
                "seed": ["1", 1.5], "skip_special_tokens": ["no", 0], "stream_options": [5, "x", []],
                "top_k": [0.5, "3"], "model": [5, ["fuzz"], {}]}
OPENAI_REFUSED = [("tools", [{"type": "function"}]), ("best_of", 2), ("suffix", "x"), ("logit_bias", {"x": 1}),
                  ("logit_bias", {"5": 101}), ("logit_bias", {"99999999": 1}), ("logit_bias", [5]),
                  ("response_format", {"type": "yaml"}), ("response_format", {"type": "json_schema"}),
                  ("guided_regex", "[a-"), ("guided_choice", []), ("structured_outputs", {"regex": "a", "json": {}}),
                  ("guided_json", {"type": "foo"}), ("min_p", 1.5), ("stop_token_ids", [-1]),
                  ("stop_token_ids", "x"), ("audio", {}), ("prediction", {}),
                  ("store", True), ("reasoning_effort", "low"), ("web_search_options", {}), ("service_tier", "flex"),
                  ("tool_choice", "required"), ("tools", [{"type": "function", "function": {"name": "a b"}}]),
                  ("functions", [{}]), ("function_call", "auto"),
                  ("stream_options", {"include_usage": True}), ("modalities", ["audio"])]
TGI_PARAMETERS = [("temperature", -1), ("top_k", -1), ("top_p", 0), ("top_p", 1.5), ("repetition_penalty", 0),
                  ("frequency_penalty", 3), ("seed", -1), ("top_n_tokens", 21), ("max_new_tokens", 0),
                  ("max_new_tokens", 10 ** 400), ("max_new_tokens", 2 ** 31), ("max_new_tokens", 1000),
                  ("typical_p", 0.5), ("best_of", 2), ("decoder_input_details", True),
                  ("grammar", {"type": "yaml"}), ("grammar", {"type": "regex", "value": "[a-"}),
                  ("truncate", 10), ("watermark", True), ("adapter_id", "x"), ("details", "yes"),
                  ("do_sample", "yes"), ("stop", ["a"] * 17), ("stop", "x" * 1100), ("stop", [""]),
                  ("return_full_text", 1), ("temperature", float("nan")), ("zz", 1)]
MS_PARAMETERS = [("top_k", -1), ("top_p", 0.001), ("top_p", 1.5), ("temperature", 0), ("temperature", -1),
                 ("repetition_penalty", 0), ("max_new_tokens", 0), ("max_new_tokens", 1000), ("return_protocol", 5),
                 ("do_sample", "yes"), ("return_full_text", 1), ("zz", 1), ("top_k", 10 ** 400),
                 ("max_new_tokens", 2 ** 40)]


def frontend_body_defect(rng: random.Random) -> bytes:
    return rng.choice([b"", b"not json", b"[1]", b'"s"', b"null", b"{", b"[" * rng.randint(1, 200_000),
                       b'{"a": ' + b"[" * rng.randint(65, 50_000) + b"]" * rng.randint(0, 3),
                       b'{"inputs": "a \xff b"}', b'{"model": "fuzz", "prompt": "\xc3\x28"}', b"NaN",
                       b"\xef\xbb\xbf{}"])


def surrogate(text: str = "a") -> Raw:
    """A JSON string with a lone surrogate escape: Python reads it into a str that UTF-8 cannot encode."""
    return Raw(json.dumps(text)[:-1].encode() + b'\\ud800"')


def frontend_case(rng: random.Random) -> Case:
    route = rng.choice(["completions", "chat", "ms", "tgi", "tgi_stream"])
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "ms": f"/models/{MODEL}/generate",
            "tgi": "/generate", "tgi_stream": "/generate_stream"}[route]
    openai = route in ("completions", "chat")
    if openai:
        body: dict = {"model": MODEL, "max_tokens": 4}
        if route == "completions":
            body["prompt"] = PROMPT
        else:
            body["messages"] = [{"role": "user", "content": "hi"}]
        if rng.random() < 0.3:
            body["stream"] = True
    else:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
    mutations = []
    for _ in range(rng.choice([1, 1, 2])):
        kind = rng.choice(["range", "range", "type", "unknown", "prompt", "stop", "refused", "body", "surrogate",
                           "model", "huge", "logprobs"] + (["messages"] * 2 if route == "chat" else []))
        if kind == "huge" and rng.random() > 0.15:
            kind = "range"  # a few megabyte bodies suffice, and each costs its copies
        mutations.append(kind)
        if kind == "body":
            return Case("frontend", mutations, path, frontend_body_defect(rng))
        if kind == "huge":  # over the body limit (413), or over the prompt limit inside it (400)
            size = rng.choice([(4 << 20) + rng.randint(1, 1000), (1 << 20) + rng.randint(1, 1000)])
            if route == "chat":
                body["messages"] = [{"role": "user", "content": "h" * size}]
            else:
                body["prompt" if route == "completions" else "inputs"] = "h" * size
            mutations[-1] += f":{size}"
        elif openai:
            if kind == "range":
                name, value = rng.choice(OPENAI_RANGES)
                body[name] = value
                if name == "max_completion_tokens":
                    body.pop("max_tokens", None)
                mutations[-1] += f":{name}"
            elif kind == "type":
                name = rng.choice(sorted(OPENAI_TYPES))
                body[name] = rng.choice(OPENAI_TYPES[name])
                mutations[-1] += f":{name}"
            elif kind == "unknown":
                body[rng.choice(["zz", "inputs", "parameters", "max_new_tokens", "Model"])] = 1
            elif kind == "prompt":
                if route == "completions":
                    body["prompt"] = rng.choice(["", "  ", [], [1, 2, 3], [["a"]], None, ["a"] * 5])
                    if body["prompt"] == ["a"] * 5:
                        body["n"] = 4  # 20 generations: more than 16
                else:
                    body["messages"] = rng.choice([None, [], "hi"])
            elif kind == "stop":
                body["stop"] = rng.choice([["s"] * rng.randint(17, 50), "x" * rng.randint(1025, 3000), [""],
                                           ["ok", "y" * 2000]])
            elif kind == "refused":
                name, value = rng.choice(OPENAI_REFUSED)
                if name == "stream_options":
                    body.pop("stream", None)
                body[name] = value
                mutations[-1] += f":{name}"
            elif kind == "surrogate":
                where = rng.choice(["prompt", "model", "key", "stop", "role"])
                if where == "prompt" and route == "completions":
                    body["prompt"] = surrogate(PROMPT)
                elif where == "role" and route == "chat":
                    body["messages"] = [{"role": surrogate("user"), "content": "hi"}]
                elif where == "stop":
                    body["stop"] = [surrogate(), 5]
                elif where == "key":
                    return Case("frontend", mutations, path, encode(body)[:-1] + b', "zz\\ud800": 1}')
                else:
                    body["model"] = surrogate(MODEL)
                mutations[-1] += f":{where}"
            elif kind == "model":
                if rng.random() < 0.5:
                    body.pop("model", None)
                else:
                    body["model"] = rng.choice(["nope", "", "fuzz_unary", "../fuzz"])
            elif kind == "messages":
                body["messages"] = rng.choice([
                    [{"role": "wizard", "content": "hi"}], [{"role": "user"}], [{"role": "user", "content": 5}],
                    [{"role": "user", "content": [{"type": "image_url"}]}], [{"role": "user", "content": "hi"}] * 1025,
                    [{"role": "user", "content": "hi", "name": json.loads("[" * 70 + "]" * 70)}], ["hi"]])
            else:  # logprobs
                if route == "chat":
                    body.update(logprobs=rng.choice([True, False]), top_logprobs=rng.choice([25, -1]))
                else:
                    body["logprobs"] = rng.choice([30, -1, True])
        else:
            # a detached dict once an earlier mutation made `parameters` no object: the body is refused anyway
            p = body["parameters"] if isinstance(body.get("parameters"), dict) else {}
            if kind == "range":
                name, value = rng.choice(TGI_PARAMETERS if route.startswith("tgi") else MS_PARAMETERS)
                p[name] = value
                mutations[-1] += f":{name}"
            elif kind == "type":
                choice = rng.randrange(4)
                if choice == 0:
                    body["parameters"] = rng.choice([5, "x", [1]])
                elif choice == 1:
                    body["stream"] = rng.choice(["yes", 1, {}])
                else:
                    name = rng.choice(["max_new_tokens", "top_k", "temperature", "do_sample"])
                    p[name] = rng.choice(["x", 1, [True]] if name == "do_sample" else ["x", [1], {}, True])
                mutations[-1] += f":{choice}"
            elif kind == "unknown":
                body[rng.choice(["zz", "prompt", "model", "messages"])] = 1
            elif kind == "prompt":
                body["inputs"] = rng.choice(["", None, 5, ["a"], {"text": "a"}, True])
                if body["inputs"] is None:
                    body.pop("inputs")
            elif kind == "stop" and route.startswith("tgi"):
                p["stop"] = rng.choice([["s"] * rng.randint(17, 40), "x" * 2000, [5]])
            elif kind == "surrogate":
                body["inputs"] = surrogate(PROMPT)
            elif kind == "model" and route == "ms":
                path = rng.choice(["/models/nope/generate", "/models/fuzz_unary/generate",
                                   "/models/%F0%9F%9A%80/generate"])
            else:
                p["max_new_tokens"] = 0
                mutations[-1] += ":max_new_tokens=0"
    return Case("frontend", mutations, path, encode(body))


def make_cases(rng: random.Random) -> list[Case]:
    cases = [triton_generate_case(rng) for _ in range(COUNTS["triton_generate"])]
    cases += [kserve_case(rng) for _ in range(COUNTS["kserve_infer"])]
    cases += [grpc_case(rng, unary=False) for _ in range(COUNTS["grpc_stream"])]
    cases += [grpc_case(rng, unary=True) for _ in range(COUNTS["grpc_unary"])]
    cases += [frontend_case(rng) for _ in range(COUNTS["frontend"])]
    rng.shuffle(cases)  # doors interleaved, as real traffic would be
    return cases


# ---- checking one case -------------------------------------------------------------------------------------------

def error_message(text: str) -> str:
    """The error message of a Triton HTTP error body (one JSON object, or SSE events carrying one)."""
    for line in text.splitlines():
        line = line.removeprefix("data: ").strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return str(json.loads(line).get("error", ""))
    return text


def run_case(case: Case, server, frontend) -> str:
    """Send the case; assert it was refused as its door refuses. Returns the class of refusal, for the summary."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    if case.door in ("triton_generate", "kserve_infer", "frontend"):
        base = frontend.url if case.door == "frontend" else f"http://{server.http}"
        status, text = http_request(base + case.target, case.payload)
        assert 400 <= status < 500 or (case.parser_500 and status == 500 and error_message(text).startswith(
            TRITON_PARSER_500)), (case.describe(), status, text[:400])
        if case.door == "frontend":
            error = json.loads(text)["error"]  # the door's own error format
            assert (error["message"] if case.target.startswith("/v1/") else error), (case.describe(), text[:300])
            return f"frontend {status}"
        if status == 500:
            return f"{case.door} 500 (tritonserver's JSON parser)"
        message = error_message(text)
        return f"{case.door} {status} {'ours' if INVALID in message else 'tritonserver'}"
    if case.door == "grpc_stream":
        message = grpc_stream_error(server, case.target, case.payload)
        assert INVALID in message or any(m in message for m in TRITON_REFUSALS), (case.describe(), message[:400])
        return f"grpc_stream {'ours' if INVALID in message else 'tritonserver'}"
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        with pytest.raises(InferenceServerException) as raised:
            client.infer(case.target, _infer_inputs(case.payload), client_timeout=TIMEOUT)
    finally:
        client.close()
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT", (case.describe(), str(raised.value)[:400])
    return f"grpc_unary {'ours' if INVALID in str(raised.value) else 'tritonserver'}"


# ---- the test ----------------------------------------------------------------------------------------------------

def process_tree(pid: int) -> dict[int, str]:
    """tritonserver and its model processes: pid -> command line."""
    tree, todo = {}, [pid]
    while todo:
        current = todo.pop()
        cmdline = Path(f"/proc/{current}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        tree[current] = cmdline
        for task in Path(f"/proc/{current}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    return tree


class BesideStreams(threading.Thread):
    """Greedy gRPC streams, one after another, from before the fuzz starts until it ends."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.texts, self.errors = server, [], []
        self.done = threading.Event()

    def run(self):
        arrays = {"text_input": _array(BESIDE_PROMPT, "BYTES"), "max_tokens": _array(BESIDE_TOKENS, "INT32")}
        while not self.done.is_set() or not self.texts:
            try:
                text, error = grpc_stream_text(self.server, MODEL, arrays)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                text, error = "", repr(exc)
            self.texts.append(text)
            if error:
                self.errors.append(error)


def test_malformed_requests_through_every_door_are_refused_and_harm_nothing(limits_servers):
    server, frontend = limits_servers
    solo, error = grpc_stream_text(server, MODEL, {"text_input": _array(BESIDE_PROMPT, "BYTES"),
                                                   "max_tokens": _array(BESIDE_TOKENS, "INT32")})
    assert error is None and solo
    processes = process_tree(server.process.pid)
    # tritonserver, and the stubs of front, unary, tokenizer, prefill, sampler, decode
    assert len(processes) == 7, processes
    frontend_pid = frontend.process.pid
    logs = {path: path.stat().st_size for path in (server.log, frontend.log)}

    cases = make_cases(random.Random(SEED))
    beside = BesideStreams(server)
    beside.start()
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    try:
        for case in cases:
            outcome = run_case(case, server, frontend)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        beside.done.set()
        beside.join(TIMEOUT * 2)
    elapsed = time.monotonic() - started
    print(f"\n{len(cases)} malformed requests in {elapsed:.0f} s (seed {SEED}):")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {count:5d}  {outcome}")

    assert not beside.is_alive() and not beside.errors, beside.errors[:3]
    assert len(beside.texts) >= 2 and all(text == solo for text in beside.texts), \
        [t for t in beside.texts if t != solo][:2]
    assert server.process.poll() is None and frontend.process.poll() is None
    assert process_tree(server.process.pid) == processes  # no model process died or was restarted
    assert frontend.process.pid == frontend_pid
    for path, size in logs.items():
        with open(path, "rb") as log:
            log.seek(size)
            added = log.read().decode(errors="replace")
        assert "Traceback" not in added, added[added.index("Traceback") - 500:][:3000]
    # every door was fuzzed, and each reached our own checks, not only tritonserver's
    for door in ("triton_generate", "kserve_infer", "grpc_stream", "grpc_unary"):
        assert outcomes.get(f"{door} ours", 0) + outcomes.get(f"{door} 400 ours", 0) > 50, outcomes
    assert outcomes.get("frontend 400", 0) > 500 and outcomes.get("frontend 413", 0) > 0, outcomes
