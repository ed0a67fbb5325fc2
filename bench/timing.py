"""What every benchmarked system reports per request, and the figures computed from it.

Each system under test (tritonserver through perf_analyzer, the engine alone, transformers, llama.cpp) gives one
RequestTiming per request: when it was sent and when each output token arrived, on one clock. The same
function turns them into the table's figures, so no system is measured by a different formula. The clients that
send the requests run in bench.harness.loops.closed_loop.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np


class PeerUnavailable(RuntimeError):
    """A system that cannot be built or run here; the message says why, and the report prints it."""


@dataclasses.dataclass
class RequestTiming:
    start: float                # seconds: when the request was sent
    token_times: list[float]    # seconds, same clock: when each output token arrived (a batch of tokens that
                                # arrive together, as from a non-streaming peer, repeat the same time)
    prompt_tokens: int = 0
    completion_tokens: int | None = None   # the server's own count (an OpenAI stream's usage), where it gave one
    content_chunks: int | None = None      # streamed chunks with text (an OpenAI stream), where counted


@dataclasses.dataclass
class PointResult:
    """One (system, concurrency) point of a workload."""
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def summarize(timings: list[RequestTiming]) -> PointResult:
    """Throughput over the span from the first send to the last token; time to first token per request;
    inter-token latency over every gap between consecutive tokens of a request."""
    timings = [t for t in timings if t.token_times]
    if not timings:
        raise ValueError("no request produced a token")
    begin = min(t.start for t in timings)
    end = max(t.token_times[-1] for t in timings)
    seconds = max(end - begin, 1e-9)
    tokens = sum(len(t.token_times) for t in timings)
    ttft = np.array([t.token_times[0] - t.start for t in timings]) * 1e3
    gaps = np.concatenate([np.diff(t.token_times) for t in timings]) * 1e3 if tokens > len(timings) \
        else np.zeros(1)
    return PointResult(requests=len(timings), output_tokens=tokens, seconds=seconds,
                       tokens_per_s=tokens / seconds, requests_per_s=len(timings) / seconds,
                       ttft_p50_ms=float(np.percentile(ttft, 50)), ttft_p99_ms=float(np.percentile(ttft, 99)),
                       itl_p50_ms=float(np.percentile(gaps, 50)), itl_p99_ms=float(np.percentile(gaps, 99)))


def median_time(fn, warmup: int, repeats: int) -> float:
    """Seconds of one call of fn: the median of `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
