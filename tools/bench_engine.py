#!/usr/bin/env python3
"""The engine alone on SmolLM2-135M-Instruct, by weight format, against the machine's floors and transformers
(`make bench-engine`). Prints the table and saves benchmarks/engine.md, .json and .png.

    python tools/bench_engine.py [--formats float32 Q4_1 ...] [--repeats 20] [--out benchmarks/engine.md]

What is measured: bench/engine.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine import FORMATS, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "engine.md"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
