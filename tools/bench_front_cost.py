#!/usr/bin/env python3
"""What the front model costs per token: the same greedy stream through NAME and through NAME_pipeline,
interleaved, one request at a time, against a running tritonserver. Prints a table and saves it to
benchmarks/front_cost.md.

    python tools/bench_front_cost.py [--url localhost:8001] [--name demo] [--prompt TEXT] [--tokens 64]

The measurement: bench/front_cost.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.front_cost import run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--name", default="demo")
    parser.add_argument("--prompt", default="Triton Inference Server")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "front_cost.md"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
