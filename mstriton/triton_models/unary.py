"""NAME_unary (not decoupled): one response per request, for KServe v2 /infer, HTTP /generate and gRPC ModelInfer.
Runs the NAME front model through BLS with stream=false: the same path as streaming, joined there.

execute() never waits for a generation. tritonserver 2.51 gives a non-decoupled instance its next batch only once
execute() has returned; when it returned the batch's answers, every request waited for the slowest of its batch
and the next batch for all of them (KServe /infer and /generate at p50 21 s against 4.5 s for streams in the same
soak). Since 24.06 a non-decoupled Python model may answer through the request's response sender instead (one
response, with the final flag): execute() reads each request's inputs, starts its generation as a coroutine on
the backend's event loop (see front.py for why not threads) and returns None at once.

Cancellation: a cancelled gRPC ModelInfer cancels its request in tritonserver 2.51, and the response sender's
is_cancelled() turns true. The BLS call into NAME cannot be cancelled in this version, so one thread asks every
running generation's is_cancelled() every `cancel_check_seconds` (a parameter, 0.05 s by default;
serving/cancel_watch.py) and on a yes the model sends NAME the explicit stop (`stop` true with the BLS
request's id): the decode model frees the slot at its next step. An HTTP client (/infer, /generate) that hangs up
gives no sign: tritonserver 2.51 cancels an HTTP request when it finds the connection closed, but it stops
reading a connection while its request runs (libevhtp's request pause), so it finds out only when it writes the
answer (tests/test_unary.py shows both). Behind the frontend, whose doors cancel their gRPC streams on a hang-up,
tritonserver's HTTP port is not the public door.

A method's unary entry (NAME_METHOD_unary) is this model calling the method's front model (its `front_model`
parameter) instead of NAME.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from ..serving.cancel_poll import CANCEL_CHECK_SECONDS
from ..serving.cancel_watch import CancelWatch
from ..serving.requests import parse_request
from ..serving.shutdown import exit_watchdog, stacks_on_request
from . import common

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# The backend's async_exec() runs its blocking call in the event loop's default executor, and a decoupled call
# returns only with its first response: for NAME with stream=false, at the end of the generation. The default
# executor has min(32, CPUs + 4) threads (6 on 2 cores), so at most 6 generations ran at once and the other unary
# requests waited for one of them to end (and so did a stop). The loop's default executor is this one instead,
# sized above the decode model's slots and queue places (a request beyond them is refused at once).
BLS_CALLS = ThreadPoolExecutor(max_workers=512, thread_name_prefix="mstriton-bls-call")


class TritonPythonModel:
    def initialize(self, args):
        stacks_on_request()  # kill -USR1: every thread's stack in the log
        config = common.model_config(args)
        self.llm = common.parameter(config, "llm_name")
        self.name = args["model_name"]
        # the front model it runs: NAME, or a method's NAME_METHOD (whose preprocess makes the request)
        self.front = common.parameter(config, "front_model") or self.llm
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        # seconds between two is_cancelled() of a generation (each a round trip to the server); 0: never asked
        self.cancel_check = float(common.parameter(config, "cancel_check_seconds", str(CANCEL_CHECK_SECONDS)))
        self.watch = CancelWatch(self.cancel_check, self.client_cancelled, ask=common.FINISHED_STREAMS.is_cancelled) \
            if self.cancel_check > 0 else None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.running: set[str] = set()  # request ids of the generations not ended yet
        self.tasks = common.RequestTasks()  # generations and stops

    async def execute(self, requests):
        if self.loop is None:  # the backend's event loop, the same at every call
            self.loop = asyncio.get_running_loop()
            self.loop.set_default_executor(BLS_CALLS)  # see BLS_CALLS
        for request in requests:
            sender = request.get_response_sender()
            try:
                call = self.bls_request(request)
            except Exception as exc:  # noqa: BLE001 - this request's error, never the whole batch's
                sender.send(common.error_response(exc), flags=FINAL)
                continue
            self.start(self.complete(call, sender))
        return None

    def start(self, coroutine) -> None:
        self.tasks.start(coroutine)

    def bls_request(self, request) -> "pb_utils.InferenceRequest":
        """The request to NAME, built now: a request's tensors are freed when execute() returns."""
        parameters = common.request_parameters(request)
        # The front model checks the same; checked here too, a refused request (a 10 MB prompt) is answered
        # before its inputs are copied into a BLS request and through tritonserver again. (A method's request is
        # made by its preprocess, in the front model.)
        if self.front == self.llm:
            parse_request(lambda name: common.get(request, name), parameters)
        inputs = [pb_utils.Tensor(name, np.array(value, copy=True)) for name in self.input_names
                  if name != "stream" and (value := common.get(request, name)) is not None]
        inputs.append(pb_utils.Tensor("stream", np.array([[False]])))
        # An id of our own: NAME's explicit stop finds the generation by it (a client's id need not be unique).
        return pb_utils.InferenceRequest(model_name=self.front, requested_output_names=self.output_names,
                                         inputs=inputs, parameters=parameters,
                                         request_id=f"{self.name}-{uuid.uuid4().hex}")

    async def complete(self, call, sender) -> None:
        key = call.request_id()
        self.running.add(key)
        if self.watch is not None:
            self.watch.watch(key, sender.is_cancelled)
        result = error = None
        try:
            async for response in common.stream_responses(call):  # read to its end, whatever happens
                if response.has_error():
                    error = error or response.error()
                elif response.output_tensors():
                    result = response
        except Exception as exc:  # noqa: BLE001 - the request must get an answer, never hang
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
        finally:
            self.running.discard(key)
        try:
            cancelled = await self.loop.run_in_executor(common.RESPONSE_WAITERS, self.finish, key, sender)
            if cancelled:
                response = common.failed_response("request cancelled", pb_utils.TritonError.CANCELLED)
            elif error is not None:
                response = pb_utils.InferenceResponse(output_tensors=[], error=common.with_code_restored(error))
            elif result is None:
                response = common.failed_response("the generation ended without output",
                                                  pb_utils.TritonError.INTERNAL)
            else:
                response = pb_utils.InferenceResponse(output_tensors=result.output_tensors())
            sender.send(response, flags=FINAL)
        except Exception as exc:  # noqa: BLE001 - the client is gone, or the server is stopping
            pb_utils.Logger.log_warn(f"{key}: the answer was not sent: {type(exc).__name__}: {exc}")

    def finish(self, key: str, sender) -> bool:
        """In a worker thread, before the final response: the watch forgets the generation (whether its client
        cancelled), then the finished stream iterators are let go (serving/finished_streams.py; never while the
        watch asks the same sender)."""
        cancelled = self.watch.forget(key) if self.watch is not None else False
        common.FINISHED_STREAMS.is_cancelled(sender.is_cancelled)
        return cancelled

    def client_cancelled(self, key: str) -> None:
        """From the watch's thread: the client of generation `key` cancelled."""
        self.loop.call_soon_threadsafe(self.start, self.stop(key))

    async def stop(self, key: str) -> None:
        """NAME's explicit stop of the generation `key`, sent again every cancel_check seconds until NAME has found
        it (it may not have started it yet) or the generation has ended."""
        while key in self.running:
            call = pb_utils.InferenceRequest(model_name=self.front, requested_output_names=["finish_reason"],
                                             inputs=[pb_utils.Tensor("stop", np.array([[True]]))], request_id=key)
            found = False
            try:
                async for response in common.stream_responses(call):
                    if not response.has_error() and response.output_tensors():
                        reason = common.outputs_by_name(response).get("finish_reason")
                        found = found or (reason is not None and reason.reshape(-1)[0] == b"cancelled")
            except Exception as exc:  # noqa: BLE001 - the generation's own end is reported by complete()
                pb_utils.Logger.log_warn(f"{key}: the stop was not sent: {type(exc).__name__}: {exc}")
                return
            if found:
                return
            await asyncio.sleep(self.cancel_check)

    def finalize(self):
        exit_watchdog(self.name)  # first: finalize() itself may be what never ends
        if self.watch is not None:
            self.watch.close()
