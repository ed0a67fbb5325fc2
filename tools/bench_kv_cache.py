#!/usr/bin/env python3
"""KV-cache and scheduling benchmark (`make bench-kv-cache`): four scenarios against a served model, through the
real tritonserver, over tritonclient gRPC streaming to the decoupled front model NAME (one response per token),
prompts sent as text.

    python tools/bench_kv_cache.py --repository build/bench/repo_kv_baseline --model smollm2 \
        [--scenarios shared-prefix,multi-turn,long-prompts,capacity] [--out benchmarks/kv_cache] \
        [--server-pythonpath DIR] [--merge]
    python tools/bench_kv_cache.py --report-from benchmarks/kv_cache.json --out benchmarks/kv_cache   (report only)

The scenarios, the server and the report: bench/kv_cache.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.kv_cache import DEFAULT_GAUGES, RUNNING_GAUGE, SCENARIOS, main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--repository", type=Path, help="converted Triton model repository (required unless --report-from)")
    p.add_argument("--report-from", type=Path, metavar="JSON", help="measure nothing: write STEM.md from this JSON")
    p.add_argument("--model", default="smollm2", help="the LLM's name in it (the front model)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"any of {','.join(SCENARIOS)}")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "kv_cache", help="output stem (.md, .json)")
    p.add_argument("--merge", action="store_true", help="keep the other scenarios of an existing STEM.json")
    p.add_argument("--server-pythonpath", type=Path,
                   help="a folder holding an mstriton package for the server's model processes to import")
    p.add_argument("--log", type=Path, help="tritonserver's log (default: build/bench/tritonserver_kv_cache.log)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--decode-parameter", action="append", default=[], metavar="KEY=VALUE",
                   help="set a parameter of MODEL_decode/config.pbtxt before the server starts (repeatable), "
                        "e.g. kv_cache_bytes=1509949440")
    p.add_argument("--min-available-gib", type=float, default=2.0,
                   help="stop the server when the machine's available memory falls below this (default %(default)s)")
    g = p.add_argument_group("shared-prefix")
    g.add_argument("--system-tokens", type=int, default=1000)
    g.add_argument("--question-tokens", type=int, default=50)
    g.add_argument("--prefix-requests", type=int, default=48)
    g.add_argument("--concurrency", type=int, default=16)
    g.add_argument("--prefix-output-tokens", type=int, default=16)
    g = p.add_argument_group("multi-turn")
    g.add_argument("--turns", type=int, default=8)
    g.add_argument("--conversations", type=int, default=3)
    g.add_argument("--user-tokens", type=int, default=40)
    g.add_argument("--turn-output-tokens", type=int, default=16)
    g = p.add_argument_group("long-prompts")
    g.add_argument("--streams", type=int, default=16)
    g.add_argument("--stream-output-tokens", type=int, default=256)
    g.add_argument("--short-tokens", type=int, default=32)
    g.add_argument("--long-count", type=int, default=4)
    g.add_argument("--long-tokens", type=int, default=900)
    g.add_argument("--long-output-tokens", type=int, default=8)
    g.add_argument("--long-interval", type=float, default=1.0)
    g = p.add_argument_group("capacity")
    g.add_argument("--capacity-requests", type=int, default=64)
    g.add_argument("--capacity-prompt-tokens", type=int, default=128)
    g.add_argument("--capacity-output-tokens", type=int, default=128)
    g.add_argument("--sample-interval", type=float, default=0.2)
    g.add_argument("--metrics-model", help="the model label of the gauges (default: MODEL_decode)")
    g.add_argument("--running-gauge", default=RUNNING_GAUGE, help="the gauge of sequences running")
    g.add_argument("--gauges", default=",".join(DEFAULT_GAUGES),
                   help="gauges to report (every other gauge of the model found is reported too)")
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"--scenarios: unknown {sorted(unknown)}; choose from {list(SCENARIOS)}")
    args.gauges = [g.strip() for g in args.gauges.split(",") if g.strip()]
    if not args.repository and not args.report_from:
        p.error("--repository is required")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args(), sys.argv[1:]))
