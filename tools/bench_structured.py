#!/usr/bin/env python3
"""Structured output's cost (`make bench-structured`, issue 28): tokens/s with every request under a JSON schema
against none at each concurrency, the mask's CPU cost per token, grammar compile times cold and cached, beside the
machine's floors measured in the same run. What it measures and how: bench/structured.py.

    python tools/bench_structured.py [--concurrency 1,16] [--requests 16] [--out benchmarks/structured]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import structured  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16", help="closed-loop clients per point")
    parser.add_argument("--requests", type=int, default=16, help="requests per point, at least (3 per client)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "structured"), help="output path stem")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return structured.run(args, "python tools/bench_structured.py " + shlex.join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
