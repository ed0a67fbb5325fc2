"""The frontend's one way to tritonserver: gRPC streams to the front model (tritonclient's asyncio client), the
repository index for the models it serves (the LLMs, and their methods: serving/methods.py), and the decode models'
running / waiting gauges from the metrics port.

One bidirectional gRPC stream per generation: closing it early (the HTTP client went away, a stop string
matched) cancels the request, which the front model sees and stops the sequence's decoding at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import urllib.request
from typing import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions, model_config_pb2 as pb
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from ..repository import (CLIENT_INPUTS, CLIENT_OUTPUTS, COMPONENTS, METHOD_INPUTS, METHOD_OUTPUTS,
                          RETIRED_COMPONENTS, model_name)
from ..serve import grpc_admin_headers, grpc_inference_headers
from .errors import ApiError, busy, from_triton, invalid

# The front model's inputs -> their wire datatypes (a config's TYPE_STRING is BYTES on the wire)
INPUT_TYPES = {name: pb.DataType.Name(dtype).removeprefix("TYPE_").replace("STRING", "BYTES")
               for name, dtype, _ in CLIENT_INPUTS + METHOD_INPUTS}
OUTPUT_NAMES = [name for name, _, _ in CLIENT_OUTPUTS]
METHOD_OUTPUT_NAMES = [name for name, _, _ in METHOD_OUTPUTS]
_KEEPALIVE = KeepAliveOptions()
# tritonclient's own channel options (it drops them all when given any), plus a reconnect backoff of at most 1 s
# instead of gRPC's 120 s: when tritonserver restarts (mstriton.supervisor), /health and the doors are back within
# a second of it rather than up to two minutes later (measured: 6.6 s after a restart of 19 s).
CHANNEL_ARGS = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.keepalive_time_ms", _KEEPALIVE.keepalive_time_ms),
                ("grpc.keepalive_timeout_ms", _KEEPALIVE.keepalive_timeout_ms),
                ("grpc.keepalive_permit_without_calls", _KEEPALIVE.keepalive_permit_without_calls),
                ("grpc.http2.max_pings_without_data", _KEEPALIVE.http2_max_pings_without_data),
                ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 1000)]
_GAUGE = re.compile(r'^(mstriton_requests_(?:running|waiting))\{[^}]*model="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)$')


@dataclasses.dataclass
class LlmInfo:
    name: str
    max_seq_len: int
    vocab_size: int
    slots: int          # sequences the decode model runs at once
    max_waiting: int    # requests it queues beyond those
    tool_format: str = "generic"  # how its chat template writes tool calls (tokenizer/chat.py's TOOL_FORMATS)


class Triton:
    def __init__(self, grpc_url: str, metrics_url: str | None = None, admin_key: str | None = None, *,
                 api_key: str | None = None):
        self.grpc_url = grpc_url
        # the repository index and model configs are admin APIs, closed behind this key (mstriton.serve)
        self._admin_headers = grpc_admin_headers(admin_key) or None
        # an exposed tritonserver with an API key wants it on inference too (mstriton.serve); a loopback one ignores it
        self._inference_headers = grpc_inference_headers(api_key) or None
        host = grpc_url.rsplit(":", 1)[0]
        self.metrics_url = metrics_url or f"http://{host}:8002/metrics"
        self._client: grpcclient.InferenceServerClient | None = None
        self._info: dict[str, LlmInfo] = {}
        # model -> the LLM whose method it is ("": not a method), read once from its config
        self._method_owner: dict[str, str] = {}
        self._methods: dict[str, str] = {}  # the methods served at the last look: NAME_METHOD -> NAME
        # vLLM's request histograms (gateway_metrics.RequestTimings), observed by the shared request path; the app
        # sets them (None: not measured)
        self.timings = None

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        # made on first use: a grpc.aio channel belongs to the event loop it was made in (uvicorn's)
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.grpc_url, channel_args=CHANNEL_ARGS)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready())
        except InferenceServerException:
            return False

    async def llms(self) -> list[str]:
        """The LLMs the server serves now: front models whose pipeline and decode models are loaded."""
        return sorted(n for n, llm in (await self.served()).items() if n == llm)

    async def served(self) -> dict[str, str]:
        """Every model a client may name, with the LLM it runs on: the LLMs (themselves), and their methods
        (NAME_METHOD: a front model whose config names a `method`, of an LLM that is served)."""
        try:
            index = await self.client.get_model_repository_index(headers=self._admin_headers, as_json=True)
        except InferenceServerException as exc:
            raise busy(f"tritonserver at {self.grpc_url} did not answer: {exc.message()}") from None
        ready = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
        llms = {n for n in ready if model_name(n, "pipeline") in ready and model_name(n, "decode") in ready}
        served = {n: n for n in llms}
        own = {model_name(llm, c) for llm in llms for c in COMPONENTS + RETIRED_COMPONENTS}
        for name in sorted(ready - own):
            llm = await self._owner(name)
            if llm in llms:
                served[name] = llm
        self._methods = {n: llm for n, llm in served.items() if n != llm}
        return served

    async def _owner(self, name: str) -> str:
        """The LLM whose method `name` is, from its config (cached); "" for any other model."""
        if name not in self._method_owner:
            try:
                config = await self._config(name)
            except ApiError:
                return ""  # asked again next time
            parameters = config.get("parameters", {})
            method = parameters.get("method", {}).get("string_value")
            self._method_owner[name] = parameters.get("llm_name", {}).get("string_value", "") if method else ""
        return self._method_owner[name]

    def is_method(self, model: str) -> bool:
        """Whether `model` is a method (as served at the last look: `require` looks)."""
        return model in self._methods

    def llm_of(self, model: str) -> str:
        """The LLM `model` runs on: a method's, or `model` itself."""
        return self._methods.get(model, model)

    async def info(self, llm: str) -> LlmInfo:
        """Limits of `llm` from its models' configs (cached: they change only with a reload). A method's are its
        LLM's."""
        if llm in self._methods:
            return dataclasses.replace(await self.info(self._methods[llm]), name=llm)
        if llm not in self._info:
            tokenizer = await self._config(model_name(llm, "tokenizer"))
            decode = await self._config(model_name(llm, "decode"))

            def param(config, key, default=None):
                return config.get("parameters", {}).get(key, {}).get("string_value", default)

            self._info[llm] = LlmInfo(
                name=llm, max_seq_len=int(param(tokenizer, "max_seq_len")),
                vocab_size=int(param(tokenizer, "vocab_size")),
                slots=int(param(decode, "max_slots", str(decode.get("max_batch_size", 1)))),
                max_waiting=int(param(decode, "max_waiting", "64")),
                tool_format=param(tokenizer, "tool_format", "generic"))
        return self._info[llm]

    async def _config(self, name: str) -> dict:
        try:
            return (await self.client.get_model_config(name, headers=self._admin_headers, as_json=True))["config"]
        except InferenceServerException as exc:
            raise from_triton(exc.message() or str(exc)) from None

    async def require(self, llm: str) -> str:
        """404 unless `llm` (an LLM or a method) is served; the LLM it runs on."""
        served = await self.served()
        if llm not in served:
            raise not_found(llm, served)
        return served[llm]

    async def generate(self, llm: str, inputs: dict, names: dict[str, str] | None = None) -> AsyncIterator[dict]:
        """Stream `llm`'s responses to `inputs` (front-model input name -> Python value), as dicts of output
        name -> value, until the final one (whose finish_reason is set). Closing the generator early cancels.
        `names`: the client's names of the inputs, for the errors that name one."""
        tensors = [_tensor(name, value, (names or {}).get(name, name)) for name, value in inputs.items()]
        # tokens_json only when asked for: the front model sends it only then
        wanted = [n for n in OUTPUT_NAMES if n != "tokens_json" or inputs.get("return_tokens")]
        if self.is_method(llm):  # postprocess's dict, with the last response
            wanted += METHOD_OUTPUT_NAMES
        outputs = [grpcclient.InferRequestedOutput(name) for name in wanted]

        async def requests():
            yield {"model_name": llm, "inputs": tensors, "outputs": outputs}

        stream = self.client.stream_infer(requests(), headers=self._inference_headers)
        finished = False
        try:
            async for result, error in stream:
                if error is not None:
                    finished = True
                    await _read_to_end(stream)
                    raise from_triton(error.message() or str(error), names)
                out = {name: _value(result.as_numpy(name)) for name in wanted if result.get_output(name) is not None}
                if out.get("finish_reason"):
                    finished = True
                    await _read_to_end(stream)
                yield out
                if finished:
                    return
        except InferenceServerException as exc:  # the stream itself failed (server gone, restarting)
            finished = True
            raise busy(f"tritonserver at {self.grpc_url}: {exc.message() or exc}") from None
        except grpc.RpcError as exc:  # tritonclient passes a broken stream's error on as it is (server killed)
            finished = True
            raise busy(f"tritonserver at {self.grpc_url}: {exc.code().name}: {exc.details()}") from None
        finally:
            if not finished:
                stream.cancel()

    async def gauges(self) -> dict[str, dict[str, float]]:
        """mstriton_requests_running / _waiting by decode model, read from tritonserver's metrics port."""
        def read() -> str:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                return response.read().decode()
        try:
            text = await asyncio.to_thread(read)
        except OSError as exc:
            raise busy(f"tritonserver's metrics at {self.metrics_url} did not answer: {exc}") from None
        values: dict[str, dict[str, float]] = {"mstriton_requests_running": {}, "mstriton_requests_waiting": {}}
        for line in text.splitlines():
            match = _GAUGE.match(line)
            if match:
                values[match.group(1)][match.group(2)] = float(match.group(3))
        return values


def not_found(model: str, served) -> ApiError:
    return ApiError(404, f"The model '{model}' does not exist; this server serves: "
                         f"{', '.join(sorted(served)) or 'nothing yet'}", param="model", code="model_not_found")


# Seconds to wait for a finished request's gRPC call to end. tritonserver ends it as soon as it has sent the final
# response (the client half-closed after its one request): this bounds a server that does not.
CALL_END_SECONDS = 5.0


async def _read_to_end(stream) -> None:
    """Wait for the gRPC call of a request that has had its final response (or its error) to end. Dropped before
    its status arrives, grpc.aio cancels the call, and a stream cancelled just after its request's final response
    left tritonserver 2.51 holding the model: at SIGTERM the front model never unloaded and tritonserver exited 1
    after its exit timeout (docs/limits.md; 143 tritonclient streams cancelled that way were enough)."""
    async def drain():
        async for _ in stream:
            pass
    try:
        await asyncio.wait_for(drain(), CALL_END_SECONDS)
    except (asyncio.TimeoutError, InferenceServerException, grpc.RpcError):
        pass  # the call is over either way; what the request got stands


def _tensor(name: str, value, shown: str) -> grpcclient.InferInput:
    """`value` as the front model's input `name`; a number its datatype cannot hold is a 400 naming the client's
    field (`shown`): the doors bound what they must, and Python's JSON reads integers of any size."""
    kind = INPUT_TYPES[name]
    if kind == "BYTES":
        text = value if isinstance(value, str) else json.dumps(value)
        array = np.array([[text.encode("utf-8")]], np.object_)
    else:
        dtype = np.dtype(triton_to_np_dtype(kind))
        for item in value if isinstance(value, list) else [value]:  # a list: stop_token_ids
            if dtype.kind in "iu" and not isinstance(item, bool):
                info = np.iinfo(dtype)
                if not info.min <= item <= info.max:
                    raise invalid(shown, f"'{shown}' must be in [{info.min}, {info.max}], got {item}")
            if dtype.kind == "f" and not abs(item) <= np.finfo(dtype).max:
                raise invalid(shown, f"'{shown}' must be a finite {dtype.itemsize * 8}-bit number, got {item!r}")
        array = np.array([value] if isinstance(value, list) else [[value]], dtype)
    tensor = grpcclient.InferInput(name, list(array.shape), kind)
    tensor.set_data_from_numpy(array)
    return tensor


def _value(array: np.ndarray):
    flat = array.reshape(-1)
    if array.dtype == np.object_:
        texts = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
        return texts[0] if len(texts) == 1 else texts
    return flat.tolist() if flat.size != 1 else flat[0].item()
