"""One gRPC streaming client (tritonclient) for every benchmark and the soak: a request to a decoupled model
(the front model NAME, the ensemble NAME_pipeline), and what came back: the text, when each response arrived and
how many output tokens it brought, the prompt's token count and finish reason the server reported, the error.

Arrival times are stamped in tritonclient's callback thread (parsing waits for the caller's thread), on
`clock` (time.perf_counter by default; CLOCK_MONOTONIC on Linux, as time.monotonic).
"""

from __future__ import annotations

import dataclasses
import queue
import time
from typing import Callable

import numpy as np

# the numpy type of each Triton datatype the servers' inputs use
NUMPY_TYPES = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32}


def scalar(datatype: str, value) -> np.ndarray:
    """A [1, 1] input tensor of one value of a Triton datatype (text is encoded as UTF-8 for BYTES)."""
    if datatype == "BYTES" and isinstance(value, str):
        value = value.encode("utf-8")
    return np.array([[value]], dtype=NUMPY_TYPES[datatype])


def infer_inputs(arrays: dict) -> list:
    """tritonclient gRPC InferInputs of `arrays`: name -> numpy array (its datatype from its dtype, BYTES for
    object arrays), or (array, datatype)."""
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


def token_times(responses) -> list[float]:
    """One arrival time per output token, from a stream's responses (arrival time, num_output_tokens so far):
    a response that brings k new tokens gives its time to each of them."""
    times, seen = [], 0
    for arrival, total in responses:
        times += [arrival] * max(total - seen, 0)
        seen = max(seen, total)
    return times


def first(result, name: str):
    """The first element of output `name` of a response, or None when the response does not carry it."""
    array = result.as_numpy(name)
    return None if array is None or not array.size else array.reshape(-1)[0]


@dataclasses.dataclass
class Generation:
    """One streamed request: when it was sent, and each response that carried outputs with its arrival and the
    number of output tokens so far (the server's num_output_tokens, else one per response)."""
    start: float
    responses: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    pieces: list[str] = dataclasses.field(default_factory=list)   # text_output of each response
    prompt_tokens: int = 0          # num_input_tokens, as the server counted them
    finish_reason: str = ""
    error: str | None = None        # the error the server answered with
    final: bool = False             # the final response came
    cancelled: bool = False         # the client cancelled it (cancel_after)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def arrivals(self) -> list[float]:
        return [arrival for arrival, _ in self.responses]

    @property
    def token_times(self) -> list[float]:
        return token_times(self.responses)

    @property
    def ttft(self) -> float:
        return self.responses[0][0] - self.start

    @property
    def end(self) -> float:
        return self.responses[-1][0]


class StreamTimeout(TimeoutError):
    """No response came in time: the request is left running on the server (the stream is cancelled on close)."""


class GrpcStream:
    """One tritonclient gRPC stream; requests on it one at a time. A context manager (closed at the end)."""

    def __init__(self, url: str, response_timeout: float = 300.0, clock: Callable[[], float] = time.perf_counter):
        import tritonclient.grpc as grpcclient

        self.response_timeout, self.clock = response_timeout, clock
        self.client = grpcclient.InferenceServerClient(url)
        self.queue: queue.Queue = queue.Queue()
        self.unfinished = False  # a request sent on the stream has not had its final response
        # the callback only stamps the arrival: parsing waits for the caller's thread
        self.client.start_stream(callback=lambda result, error: self.queue.put((self.clock(), result, error)))

    def __enter__(self) -> "GrpcStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, model: str, arrays: dict, request_id: str = "", timeout: float | None = None,
                 on_first: Callable[[float], None] | None = None, cancel_after: int | None = None,
                 start: float | None = None) -> Generation:
        """Send one request (`arrays`, as infer_inputs takes them) and read its responses until the final one
        or an error (then in `.error`). Waits at most `response_timeout` s for each response and, with
        `timeout`, until `start` (default: now) + timeout for the whole request: StreamTimeout after that.
        `on_first(arrival)` is called at the first response with outputs; `cancel_after=n` stops reading after
        n such responses (`.cancelled`: the stream must be closed, which cancels the request)."""
        inputs = infer_inputs(arrays)
        generation = Generation(self.clock() if start is None else start)
        deadline = None if timeout is None else generation.start + timeout
        self.unfinished = True
        self.client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
        while True:
            wait = self.response_timeout if deadline is None else \
                min(self.response_timeout, max(deadline - self.clock(), 0.01))
            try:
                arrival, result, error = self.queue.get(timeout=wait)
            except queue.Empty:
                raise StreamTimeout(f"{request_id or model}: no response within "
                                    f"{wait if deadline is None else timeout:g} s") from None
            if error is not None:
                # Our models send every error as the request's final response. Closing the stream with a cancel
                # now would cancel a stream whose request has ended, which left tritonserver 2.51 holding the
                # model (docs/limits.md): the soak's SIGTERM then waited out the exit timeout and exited 1.
                generation.error, self.unfinished = str(error), False
                return generation
            response = result.get_response()
            if response.outputs:  # not the empty final response
                text = first(result, "text_output")
                if text is not None:
                    generation.pieces.append(text.decode("utf-8", errors="replace"))
                count = first(result, "num_output_tokens")
                generation.responses.append((arrival, int(count) if count is not None else
                                             len(generation.responses) + 1))
                if len(generation.responses) == 1 and on_first is not None:
                    on_first(arrival)
                tokens = first(result, "num_input_tokens")
                generation.prompt_tokens = int(tokens) if tokens is not None else generation.prompt_tokens
                finish = first(result, "finish_reason")
                generation.finish_reason = (finish.decode() if finish is not None else "") or generation.finish_reason
            final = response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                generation.final, self.unfinished = True, False
                return generation
            if cancel_after is not None and len(generation.responses) >= cancel_after:
                generation.cancelled = True
                return generation

    def close(self) -> None:
        """Stop the stream (cancelling a request that has not ended: a plain stop would wait for its end) and
        close the client."""
        try:
            self.client.stop_stream(cancel_requests=self.unfinished)
        finally:
            self.client.close()


def stream_once(url: str, model: str, arrays: dict, **options) -> Generation:
    """One request on a stream of its own (GrpcStream.generate's options), the stream closed after."""
    with GrpcStream(url, **{k: options.pop(k) for k in ("response_timeout", "clock") if k in options}) as stream:
        return stream.generate(model, arrays, **options)
