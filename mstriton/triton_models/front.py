"""NAME (decoupled): what clients call. Validates the request, runs the NAME_pipeline ensemble through BLS,
and streams its responses to the client.

Why a front model instead of exposing the ensemble: tritonserver 2.51 does not pass a client's cancellation
into the steps of an ensemble. This model sees it (`is_cancelled()`), and tells the decode model to stop the
sequence, which frees its KV-cache slot at the next step. It also serves tensorrtllm_backend's explicit stop:
a request with `stop` true and the request id of a running request.

Every BLS call is made from the stub's event loop, never from a thread of its own: decoupled BLS calls made from
several threads at once crashed tritonserver 2.51 (SIGSEGV, boost lock_exception in libtriton_python.so)
within seconds at four concurrent streams, while the same load on the ensemble alone ran clean. Once the
pipeline call is made, one waiting thread per stream reads its responses and sends the client's (the Python
backend's documented decoupled pattern), so a token costs no hop through the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

from ..params import ParameterError
from ..serving.metrics import RequestMetrics
from ..serving.requests import parse_request
from . import common

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# A client's cancel is seen within this many seconds (is_cancelled() is a round trip to the server process).
CANCEL_CHECK_SECONDS = 0.05
PIPELINE_OUTPUTS = ["text_output", "step_ints", "step_floats"]


class TritonPythonModel:
    def initialize(self, args):
        config = common.model_config(args)
        self.llm = common.parameter(config, "llm_name")
        self.metrics = RequestMetrics(pb_utils, model=args["model_name"])
        self.active: dict[str, str] = {}  # client request id -> key of its running generation
        self.tasks: set[asyncio.Task] = set()  # running streams (a task must be referenced until it ends)

    async def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_request(lambda name: common.get(request, name), common.request_parameters(request))
            except ParameterError as exc:
                sender.send(common.error_response(exc), flags=FINAL)
                continue
            if parsed.stop:
                await self.explicit_stop(request, sender)
                continue
            task = asyncio.ensure_future(self.generate(request, sender, parsed))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return None

    async def explicit_stop(self, request, sender) -> None:
        key = self.active.get(request.request_id())
        if key is not None:
            await self.stop_decode(key)
        sender.send(pb_utils.InferenceResponse(output_tensors=[
            common.bytes_tensor("finish_reason", ["cancelled" if key else ""])]), flags=FINAL)

    async def stop_decode(self, key: str) -> None:
        stop = pb_utils.InferenceRequest(model_name=f"{self.llm}_decode", requested_output_names=["step_ints"],
                                         inputs=[common.bytes_tensor("stop_key", [key])])
        async for _ in common.stream_responses(stop):
            pass

    async def generate(self, request, sender, parsed) -> None:
        arrival = time.monotonic()
        client_id = request.request_id()
        key = f"{client_id or 'request'}-{uuid.uuid4().hex[:12]}"
        if client_id:
            self.active[client_id] = key
        params = parsed.params
        pipeline = pb_utils.InferenceRequest(
            model_name=f"{self.llm}_pipeline", requested_output_names=PIPELINE_OUTPUTS,
            inputs=[common.bytes_tensor("text_input", [parsed.text]),
                    common.bytes_tensor("params_json", [json.dumps(dataclasses.asdict(params))]),
                    common.bytes_tensor("request_key", [key])])
        stream = Stream(arrival=arrival)
        try:
            iterator = await pipeline.async_exec(decoupled=True)
            # The whole stream is relayed by one waiting thread: each response goes from the pipeline to the
            # client there, with no hop through the event loop per token. Only the stop request (a BLS call)
            # is made from the event loop.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(common.RESPONSE_WAITERS, self.relay, iterator, sender, parsed, key, loop,
                                       stream)
        except Exception as exc:  # noqa: BLE001 - the stream must end with an error, never hang
            try:
                sender.send(common.error_response(exc), flags=FINAL)
            except Exception:  # noqa: BLE001 - the client is gone
                pass
        finally:
            if client_id and self.active.get(client_id) == key:
                del self.active[client_id]
            self.metrics.finished(stream.arrival, stream.first, stream.last or time.monotonic(),
                                  stream.prompt_tokens, stream.generated, stream.reason)

    def relay(self, iterator, sender, parsed, key: str, loop, stream: "Stream") -> None:
        """Runs in a waiting thread: reads the pipeline's responses to their end and sends the client's."""
        params = parsed.params
        prefix = "" if params.exclude_input_in_output else parsed.text
        pieces, logprobs = [], []
        cancelled = error_sent = False
        next_check = 0.0
        for response in iterator:  # read to its end, whatever happens
            if error_sent:
                continue
            if response.has_error():
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[], error=common.with_code_restored(response.error())), flags=FINAL)
                error_sent = True
                continue
            if cancelled:
                continue
            out = common.outputs_by_name(response)
            if not out:
                continue
            now = time.monotonic()
            if now >= next_check:  # is_cancelled() is a round trip to the server: not for every token
                next_check = now + CANCEL_CHECK_SECONDS
                if sender.is_cancelled():
                    cancelled = True
                    stream.reason = "cancelled"
                    asyncio.run_coroutine_threadsafe(self.stop_decode(key), loop)
                    continue
            stream.first = stream.first or now
            stream.last = now
            piece = out["text_output"].reshape(-1)[0].decode("utf-8")
            _, stream.prompt_tokens, stream.generated, final, finish = out["step_ints"].reshape(-1).tolist()
            finish, final = common.FINISH_REASONS[finish], bool(final)
            token_logprob, cum = out["step_floats"].reshape(-1).tolist()
            if prefix:
                piece, prefix = prefix + piece, ""
            if params.stream:
                sender.send(client_response([piece], [token_logprob], cum, finish, stream.prompt_tokens,
                                            stream.generated), flags=FINAL if final else 0)
            else:
                pieces.append(piece)
                logprobs.append(token_logprob)
                if final:
                    sender.send(client_response(["".join(pieces)], logprobs, cum, finish, stream.prompt_tokens,
                                                stream.generated), flags=FINAL)
            if final:
                stream.reason = finish or "length"
        if cancelled and not error_sent:
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                "request cancelled", pb_utils.TritonError.CANCELLED)), flags=FINAL)


@dataclasses.dataclass
class Stream:
    """What the metrics need of one relayed stream."""
    arrival: float
    first: float | None = None
    last: float | None = None
    prompt_tokens: int = 0
    generated: int = 0
    reason: str = "error"


def client_response(pieces, logprobs, cum, finish, prompt_tokens, generated) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[
        common.bytes_tensor("text_output", pieces),
        pb_utils.Tensor("output_log_probs", np.array([logprobs], np.float32)),
        common.scalar_tensor("cum_log_probs", cum, np.float32),
        common.bytes_tensor("finish_reason", [finish]),
        common.scalar_tensor("num_input_tokens", prompt_tokens, np.int32),
        common.scalar_tensor("num_output_tokens", generated, np.int32),
    ])
