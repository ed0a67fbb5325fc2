"""Our server measured the way its users measure it: perf_analyzer --streaming against the decoupled front
model over gRPC, its requests' send and response times read from --profile-export-file (genai-perf computes its
figures from the same export, but cannot run here: see tools/bench_serving.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .timing import RequestTiming

PERF_ANALYZER = Path(sys.prefix) / "bin" / "perf_analyzer"


def input_data(prompts: list[str], output_tokens: int, stream_interval: int = 1) -> dict:
    """perf_analyzer's --input-data: one entry per prompt, used in turn; min_tokens = max_tokens, so that every
    request streams exactly `output_tokens` tokens (no early end-of-sequence)."""
    extra = {"stream_interval": [stream_interval]} if stream_interval > 1 else {}
    return {"data": [{"text_input": [p], "max_tokens": [output_tokens], "min_tokens": [output_tokens],
                      "stream": [True], **extra} for p in prompts]}


def tokens_per_response(output_tokens: int, stream_interval: int) -> list[int]:
    """How the server groups a stream of exactly `output_tokens` tokens: the first alone, then stream_interval
    at a time, the rest in the last response."""
    counts, left = [1], output_tokens - 1
    while left > 0:
        counts.append(min(stream_interval, left))
        left -= counts[-1]
    return counts


def timings_from_profile(profile: dict, output_tokens: int, stream_interval: int = 1) -> list[RequestTiming]:
    """Every request of every experiment: send time and each token's arrival (nanoseconds -> seconds). perf_analyzer
    2.43 records when each response came, not what it held: with stream_interval > 1 every token of a response
    gets that response's time. A request with another number of responses than expected keeps one time per
    response, so the caller's count check refuses it."""
    grouping = tokens_per_response(output_tokens, stream_interval)
    timings = []
    for experiment in profile["experiments"]:
        for request in experiment["requests"]:
            times = [t / 1e9 for t in request["response_timestamps"]]
            if len(times) == len(grouping):
                times = [t for t, count in zip(times, grouping) for _ in range(count)]
            timings.append(RequestTiming(start=request["timestamp"] / 1e9, token_times=times))
    return timings


class ServerDied(RuntimeError):
    """The server exited while perf_analyzer was driving it."""


def run_perf_analyzer(grpc_url: str, model: str, prompts: list[str], output_tokens: int, concurrency: int,
                      workdir: Path, requests_per_window: int, stream_interval: int = 1, server=None,
                      timeout: float = 1800) -> tuple[list[RequestTiming], str]:
    """Count windows of `requests_per_window` (at least 2: a one-request window has an infinite latency
    deviation, which perf_analyzer calls unstable) requests at `concurrency`, three at least, stability check all
    but off (-s 999: on a shared CPU the check only decides how long to run; we report percentiles of every
    request). Returns the timings and perf_analyzer's own summary text.

    `server` (a subprocess.Popen): stop perf_analyzer and raise ServerDied as soon as it exits. perf_analyzer's
    gRPC streams wait on forever when the server dies under them (seen: tritonserver killed by a SIGSEGV in
    the python backend at 16 streams, and the benchmark hung until stopped by hand)."""
    workdir.mkdir(parents=True, exist_ok=True)
    data, export = workdir / "input.json", workdir / "profile.json"
    data.write_text(json.dumps(input_data(prompts, output_tokens, stream_interval)))
    export.unlink(missing_ok=True)  # perf_analyzer refuses an existing export file
    command = streaming_command(grpc_url, model, data, concurrency, 6,
                                 ["--measurement-mode", "count_windows",
                                  "--measurement-request-count", str(requests_per_window),
                                  "--profile-export-file", str(export)])
    result = run_watching(command, server, timeout)
    if result.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    timings = timings_from_profile(json.loads(export.read_text()), output_tokens, stream_interval)
    short = [t for t in timings if len(t.token_times) != output_tokens]
    if short:
        raise RuntimeError(f"{len(short)} of {len(timings)} requests streamed other than {output_tokens} tokens")
    return timings, result.stdout


def stream_for_windows(grpc_url: str, model: str, data: Path, concurrency: int, window_ms: int, trials: int,
                       server=None, timeout: float = 1800) -> subprocess.CompletedProcess:
    """perf_analyzer streaming the requests of `data` (an --input-data file) at `concurrency` for `trials`
    windows of `window_ms`, the stability check off; the figures are the caller's to read from the server (its
    token counter, /proc). Stops, as run_perf_analyzer does, when `server` exits (ServerDied)."""
    command = streaming_command(grpc_url, model, data, concurrency, trials,
                                 ["--measurement-mode", "time_windows", "--measurement-interval", str(window_ms)])
    return run_watching(command, server, timeout)


def streaming_command(grpc_url: str, model: str, data: Path, concurrency: int, trials: int,
                       measurement: list[str]) -> list[str]:
    """perf_analyzer streaming `data` over gRPC at `concurrency`, the stability check all but off (-s 999)."""
    return [str(PERF_ANALYZER), "-m", model, "-i", "grpc", "--streaming", "-u", grpc_url,
            "--input-data", str(data), "--concurrency-range", str(concurrency),
            "--stability-percentage", "999", "--max-trials", str(trials), *measurement]


def run_watching(command: list[str], server, timeout: float) -> subprocess.CompletedProcess:
    """`command` to its end, unless `server` exits first (ServerDied) or `timeout` seconds pass (RuntimeError)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    process.wait(1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if server is not None and server.poll() is not None:
                    raise ServerDied(f"the server exited with status {server.returncode} under perf_analyzer")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"perf_analyzer ran over {timeout:.0f} s")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
