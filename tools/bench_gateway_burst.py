#!/usr/bin/env python3
"""The inference gateway's gauges under a burst (`make bench-gateway`, issue 30): vllm:num_requests_waiting,
vllm:num_requests_running and vllm:kv_cache_usage_perc read from one replica's frontend while a burst of streamed
completions queues and drains. What it measures and how: bench/gateway_burst.py.

    python tools/bench_gateway_burst.py [--repository model_repository] [--model smollm2] [--burst N]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gateway_burst  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--burst", type=int, default=0, help="requests sent at once (default: slots + half the queue)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between two reads of /metrics")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gateway_burst"), help="output path stem")
    args = parser.parse_args(argv)
    return gateway_burst.run(args, "python tools/bench_gateway_burst.py " + shlex.join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
