"""Helpers every model adapter shares: reading config parameters, tensors in and out, error responses."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..params import ParameterError
# INVALID_REQUEST marks a refused request's message: KServe /infer would otherwise answer HTTP 500. The front and
# unary models give the code back by it (`with_code_restored`).
from ..serving.error_marks import INTERNAL_ERROR, INVALID_REQUEST, SERVER_BUSY
from ..serving.finished_streams import FINISHED_STREAMS
from ..serving.methods import MethodFailed


def freeze_loaded_objects() -> None:
    """At the end of a model's initialize(): everything loaded so far (MindSpore's and transformers' modules, the
    compiled graphs' Python side, the tokenizer) moves out of the garbage collector's reach. Full collections
    otherwise walk those millions of objects again and again while requests run: in a SmolLM2 decode loop,
    about 2% of a step's samples were the collector's, and freezing cut 0.2-0.5 ms off a 6-7 ms step."""
    gc.collect()
    gc.freeze()


def model_config(args) -> dict:
    return json.loads(args["model_config"])


def parameter(config: dict, key: str, default: str | None = None) -> str | None:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def version_dir(args) -> Path:
    return Path(args["model_repository"]) / args["model_version"]


def get(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def text(request, name: str) -> str:
    array = get(request, name)
    value = array.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def json_input(request, name: str):
    return json.loads(text(request, name))


def request_json(params, messages=None) -> str:
    """What the front model sends the pipeline's tokenizer step in `params_json`: the request's parameters and,
    for a chat, its messages (which the tokenizer renders through the chat template)."""
    fields = dataclasses.asdict(params)
    if messages is not None:
        fields["messages"] = messages
    return json.dumps(fields)


def read_request_json(request) -> tuple[dict, list | None]:
    """params_json as request_json wrote it -> (the GenerationParams fields, the messages or None)."""
    fields = json_input(request, "params_json")
    return fields, fields.pop("messages", None)


def request_parameters(request) -> dict:
    try:
        return json.loads(request.parameters() or "{}")
    except (ValueError, AttributeError):
        return {}


def bytes_tensor(name: str, values: list[str]) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([[v.encode("utf-8") for v in values]], dtype=np.object_))


def scalar_tensor(name: str, value, dtype) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([[value]], dtype=dtype))


# What a streamed response carries from the decode model to the front model besides its window of ids, packed
# into two numeric tensors and one string: there is a response per token (or per `stream_interval` tokens), and
# every tensor of a response costs its own shared-memory block and bookkeeping in each process it passes. (Seven
# separate tensors per token showed in profiles of the decode, tritonserver and front processes.)
# step_ints: these fields, then the ids of each new token's top_logprobs alternatives (num_top per token);
# step_floats: the cumulative log-probability, one log-probability per new token, then the alternatives' ones.
STEP_INTS = ("num_input_tokens", "num_output_tokens", "is_final", "num_new_tokens", "num_top")


def step_tensors(*, num_input_tokens: int, num_output_tokens: int, final: bool, logprobs: list[float],
                 cum_logprob: float, finish_reason: str,
                 tops: list[list[tuple[int, float]]] = ()) -> list["pb_utils.Tensor"]:
    """`tops`: for each new token, its alternatives as (id, log-probability); all of one length, or none."""
    num_top = len(tops[0]) if tops else 0
    top_ids = [t for top in tops for t, _ in top]
    top_logprobs = [lp for top in tops for _, lp in top]
    return [pb_utils.Tensor("step_ints", np.array(
                [[num_input_tokens, num_output_tokens, final, len(logprobs), num_top, *top_ids]], np.int32)),
            pb_utils.Tensor("step_floats", np.array([[cum_logprob, *logprobs, *top_logprobs]], np.float32)),
            bytes_tensor("finish_reason", [finish_reason])]


def read_step(outputs: dict[str, np.ndarray]) -> dict:
    """The fields step_tensors packed, by name (finish_reason decoded; `tops` as step_tensors took them)."""
    ints = outputs["step_ints"].reshape(-1).tolist()
    fields = dict(zip(STEP_INTS, ints))
    new, num_top = fields["num_new_tokens"], fields["num_top"]
    floats = outputs["step_floats"].reshape(-1).tolist()
    fields["cum_logprob"], fields["logprobs"] = floats[0], floats[1:1 + new]
    top_ids, top_logprobs = ints[len(STEP_INTS):], floats[1 + new:]
    fields["tops"] = [list(zip(top_ids[i * num_top:(i + 1) * num_top], top_logprobs[i * num_top:(i + 1) * num_top]))
                      for i in range(new)] if num_top else []
    fields["is_final"] = bool(fields["is_final"])
    fields["finish_reason"] = outputs["finish_reason"].reshape(-1)[0].decode("utf-8")
    return fields


# The decode model reports errors as data: a final response whose finish_reason is STEP_ERROR + the message.
# An error response from a decoupled step never left tritonserver 2.51's ensemble once its stream had begun (the
# caller's stream just never ended), so the front model turns this mark back into an error (UNAVAILABLE, or the
# code its message's mark names: INVALID_ARG for a refused request).
STEP_ERROR = "error: "

# The tokenizer step refuses a request as data too: its outputs carry the refusal under this key of params_json,
# and the decode model answers it with the STEP_ERROR response at once. When the ensemble's first step answered
# with an error instead, tritonserver 2.51's python backend lost that error on its way to the front model's BLS
# call in about 1 of 25 refused requests under concurrency: the call's response iterator ended with no response at
# all, and the client got "the generation ended before its last token" instead of its refusal (the same requests
# sent to the ensemble over gRPC always got theirs).
REFUSAL = "refusal"


def refusal_tensors(exc: Exception) -> list["pb_utils.Tensor"]:
    """The tokenizer step's outputs for a request it refuses (any input_ids: the decode model reads the refusal
    first)."""
    return [pb_utils.Tensor("input_ids", np.zeros((1, 1), np.int32)),
            pb_utils.Tensor("input_length", np.ones((1, 1), np.int32)),
            bytes_tensor("params_json", [json.dumps({REFUSAL: error_message(exc)})]),
            bytes_tensor("word_ids", ["{}"])]


class StepRefused(Exception):
    """A request the tokenizer step refused (REFUSAL): the decode model answers it with the message as data."""


def failed_response(message: str, code) -> "pb_utils.InferenceResponse":
    """A response that is only an error: `message`, with a pb_utils.TritonError code."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def error_response(exc: Exception) -> "pb_utils.InferenceResponse":
    if isinstance(exc, (ParameterError, ValueError)):
        return failed_response(error_message(exc), pb_utils.TritonError.INVALID_ARG)
    return failed_response(error_message(exc), pb_utils.TritonError.INTERNAL)


def error_message(exc: Exception) -> str:
    """`exc`'s message, marked INVALID_REQUEST when it refuses the request, INTERNAL_ERROR when a method's function
    failed (so the code can be restored by it: a BLS call's error arrives without its code)."""
    if isinstance(exc, (ParameterError, ValueError)):
        return INVALID_REQUEST + str(exc)
    return INTERNAL_ERROR + str(exc) if isinstance(exc, MethodFailed) else str(exc)


def with_code_restored(error: "pb_utils.TritonError") -> "pb_utils.TritonError":
    """The error of a BLS call, with its code back by the mark its message carries: INVALID_ARG for a refused
    request (HTTP 400), UNAVAILABLE for "server busy" (HTTP 503: KServe /infer answered it with 500), INTERNAL for a
    method's failed function (HTTP 500: arriving without a code, HTTP answered it with 400)."""
    message = error.message()
    for mark, code in ((INVALID_REQUEST, pb_utils.TritonError.INVALID_ARG),
                       (SERVER_BUSY, pb_utils.TritonError.UNAVAILABLE),
                       (INTERNAL_ERROR, pb_utils.TritonError.INTERNAL)):
        if mark in message and error.code() != code:
            return pb_utils.TritonError(message, code)
    return error


def outputs_by_name(response) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def drop_metrics(model) -> None:
    """Let go of `model.metrics` (its MetricFamily objects) under `model.metrics_lock`; from finalize(), while the
    stub can still reach the server. Left to the stub's teardown, tritonserver 2.51's stub freed them after its
    own Stub object, and each metric's goodbye message then went through a new, empty one: the stub died of SIGSEGV
    (in Metric::SaveToSharedMemory, from Stub::~Stub) at every exit of the front models."""
    with model.metrics_lock:
        model.metrics = None


# Seconds after a request's task ends before the garbage collector runs (once for all the tasks ending meanwhile).
COLLECT_AFTER_SECONDS = 1.0


class RequestTasks:
    """The tasks of a decoupled async model's requests (a task must be referenced until it ends), and a garbage
    collection soon after they end, so that what a request leaves in reference cycles (its response sender among
    it) is freed while the server runs rather than whenever an allocation next triggers the collector; the heap
    frozen at initialize() (freeze_loaded_objects) is not walked. (It was written against the front model that a
    soak's SIGTERM could not unload, on the guess that a sender held in a cycle kept the model; the cause was a
    client cancelling gRPC streams after their final response: docs/limits.md.)"""

    def __init__(self):
        self.tasks: set[asyncio.Task] = set()
        self._collect_scheduled = False

    def start(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def running(self) -> list[asyncio.Task]:
        return [t for t in self.tasks if not t.done()]

    def _ended(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not self._collect_scheduled:
            self._collect_scheduled = True
            asyncio.get_running_loop().call_later(COLLECT_AFTER_SECONDS, self._collect)

    def _collect(self) -> None:
        self._collect_scheduled = False
        gc.collect()


# One waiting thread per open stream; idle ones cost nothing. Sized above any sensible concurrency so that a
# stream never waits for another stream's wait to end.
RESPONSE_WAITERS = ThreadPoolExecutor(max_workers=512, thread_name_prefix="mstriton-bls-wait")


def is_cancelled_releasing(is_cancelled):
    """`is_cancelled` that also drops the finished stream iterators it is safe to drop (serving/finished_streams.py)."""
    return FINISHED_STREAMS.releasing(is_cancelled)


async def release_finished_streams(is_cancelled) -> bool:
    """FINISHED_STREAMS.is_cancelled from a worker thread (a round trip to the server): call it before the
    request's final response, so that a stream's own iterator is dropped before the request ends."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(RESPONSE_WAITERS, FINISHED_STREAMS.is_cancelled, is_cancelled)


async def stream_responses(infer_request):
    """The responses of a decoupled BLS call, as an async generator read to its end.

    The request is sent from the event loop's thread; only the wait for each next response (the backend's
    iterator is blocking) runs in a worker thread, so streams never block each other and no two threads
    talk to the server at once. The finished iterator goes to FINISHED_STREAMS, never simply dropped.
    """
    iterator = await infer_request.async_exec(decoupled=True)
    loop = asyncio.get_running_loop()
    while True:
        response = await loop.run_in_executor(RESPONSE_WAITERS, next, iterator, None)
        if response is None:
            FINISHED_STREAMS.hold(iterator)
            return
        yield response
