#!/usr/bin/env python3
"""Merge the JSON results of several `make bench` runs (one benchmark split into parts) into one report: OUT.md,
OUT.json and the plots, as bench_serving.py writes them.

    python tools/bench_report.py --out benchmarks/serving_r100m RUN1.json RUN2.json [...]

Later runs win where two measured the same point. Each part was measured side by side within itself, so every
ratio in the report still comes from one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output path stem")
    parser.add_argument("runs", nargs="+", type=Path, help="results JSON files of bench_serving.py")
    args = parser.parse_args(argv)
    merged = report.Results.load(args.runs[0])
    for run in args.runs[1:]:
        merged.merge(report.Results.load(run))
    for path in report.write_report(merged, merged.concurrencies(), Path(args.out)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
