#!/usr/bin/env python3
"""Time to first token and inter-token latency from a perf_analyzer profile export.

    python client_examples/ttft_itl.py profile.json

perf_analyzer --streaming --profile-export-file writes, for every concurrency (or request rate) it measured,
`experiments[].requests[]` with the send time `timestamp` and the arrival time of each streamed response
`response_timestamps` (nanoseconds; one response per generated token with the decoupled model). From them:

    time to first token (TTFT) = response_timestamps[0] - timestamp
    inter-token latency (ITL)  = response_timestamps[i] - response_timestamps[i-1]   (all gaps of all requests)

By default only the requests sent during the last 3 measurement windows are counted, the ones perf_analyzer
reports on (the earlier windows are its warm-up and stabilization); --windows 0 counts every request.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measured_requests(experiment: dict, windows: int) -> list[dict]:
    requests = [r for r in experiment.get("requests", []) if r.get("response_timestamps")]
    boundaries = experiment.get("window_boundaries") or []
    if windows > 0 and len(boundaries) > windows + 1:
        start = boundaries[-windows - 1]
        requests = [r for r in requests if r["timestamp"] >= start]
    return requests


def summarize(experiment: dict, windows: int = 3) -> dict:
    requests = measured_requests(experiment, windows)
    ttft, itl = [], []
    tokens = 0
    for request in requests:
        times = request["response_timestamps"]
        ttft.append((times[0] - request["timestamp"]) / 1e6)
        itl += [(later - earlier) / 1e6 for earlier, later in zip(times, times[1:])]
        tokens += len(times)
    span = (max(r["response_timestamps"][-1] for r in requests) - min(r["timestamp"] for r in requests)) / 1e9 \
        if requests else 0.0
    setting = experiment.get("experiment", {})
    return {
        "mode": setting.get("mode", "?"), "value": setting.get("value", "?"), "requests": len(requests),
        "tokens_per_request": tokens / len(requests) if requests else 0.0,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99),
        "tokens_per_s": tokens / span if span > 0 else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="the file given to perf_analyzer --profile-export-file")
    parser.add_argument("--windows", type=int, default=3,
                        help="count the requests of the last N measurement windows, 0 for all (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per experiment instead")
    args = parser.parse_args()

    with open(args.profile, encoding="utf-8") as f:
        profile = json.load(f)
    rows = [summarize(experiment, args.windows) for experiment in profile.get("experiments", [])]
    if not rows:
        print(f"{args.profile}: no experiments", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = (f"{rows[0]['mode']:>12} {'requests':>8} {'tokens/req':>10} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} "
              f"{'ITL p50 ms':>10} {'ITL p99 ms':>10} {'tokens/s':>9}")
    print(header)
    for row in rows:
        print(f"{row['value']:>12} {row['requests']:>8} {row['tokens_per_request']:>10.1f} "
              f"{row['ttft_p50_ms']:>11.2f} {row['ttft_p99_ms']:>11.2f} {row['itl_p50_ms']:>10.2f} "
              f"{row['itl_p99_ms']:>10.2f} {row['tokens_per_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
