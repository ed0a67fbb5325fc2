#!/usr/bin/env python3
"""The pipeline's two shapes side by side (`make bench-shapes`, issue 31): disaggregated (prefill and sampler models,
the KV handed over in shared memory) against colocated (prefill inside the decode model) on SmolLM2, chat at
c = 1, 4, 16, 64 and long prompts beside streams, with the machine's floors measured in the same run. What it
measures and how: bench/shapes.py.

    python tools/bench_shapes.py [--concurrency 1,4,16,64] [--requests 16] [--rounds 1]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import shapes  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16,64", help="closed-loop clients per chat point")
    parser.add_argument("--requests", type=int, default=16, help="requests per point, at least (2 per client)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; the shapes' order alternates")
    parser.add_argument("--slots", type=int, default=64, help="the converted models' max_batch_size (decode slots)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "shapes"), help="output path stem")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return shapes.run(args, "python tools/bench_shapes.py " + shlex.join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
