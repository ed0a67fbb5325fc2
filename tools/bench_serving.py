#!/usr/bin/env python3
"""Serving benchmark (`make bench`): mstriton under tritonserver against the engine alone, transformers and
llama.cpp, on the same weights and prompts, in one run.

    python tools/bench_serving.py [--models demo,r100m,smollm2] [--shapes 128,1024] [--concurrency 1,4,16,64]
                                  [--systems ...] [--out STEM]
    python tools/bench_serving.py --report-from RUN1.json [RUN2.json ...] --out STEM   (report only)

The models, systems and report: bench/serving.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import serving  # noqa: E402
from bench.workload import CONCURRENCIES, SHAPES  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,r100m", help=f"any of {','.join(serving.MODELS)}")
    parser.add_argument("--shapes", default=",".join(str(s.prompt_tokens) for s in SHAPES),
                        help="prompt lengths of the shapes to run (128, 1024)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)))
    parser.add_argument("--systems", default=None,
                        help=f"any of {','.join(serving.ALL_SYSTEMS)}; default: each model's own list "
                             f"({'; '.join(f'{m}: ' + ','.join(s) for m, s in serving.DEFAULT_SYSTEMS.items())})")
    parser.add_argument("--hf-sequential-max", type=int, default=4,
                        help="highest concurrency at which transformers runs one request at a time")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "serving"), help="output path stem")
    parser.add_argument("--report-from", nargs="+", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write the report of these results files of earlier runs, merged "
                             "(a later file wins where two measured the same point)")
    args = parser.parse_args(argv)
    if args.report_from:
        return serving.report_from(args.report_from, Path(args.out))
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    shapes = [s for s in SHAPES if str(s.prompt_tokens) in args.shapes.split(",")]
    if not shapes:
        parser.error(f"--shapes: none of {args.shapes} is one of {[s.prompt_tokens for s in SHAPES]}")
    names = args.models.split(",")
    if set(names) - set(serving.MODELS):
        parser.error(f"--models: unknown {sorted(set(names) - set(serving.MODELS))}; choose from "
                     f"{list(serving.MODELS)}")
    chosen = args.systems.split(",") if args.systems else None
    if chosen and set(chosen) - set(serving.ALL_SYSTEMS):
        parser.error(f"--systems: unknown {sorted(set(chosen) - set(serving.ALL_SYSTEMS))}; choose from "
                     f"{serving.ALL_SYSTEMS}")
    return serving.run(names, shapes, concurrencies, chosen, args.hf_sequential_max, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
