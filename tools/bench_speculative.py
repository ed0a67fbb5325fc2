#!/usr/bin/env python3
"""Speculative decoding by n-gram lookup (`make bench-speculative`, issue 29): output tokens/s with and without it
on SmolLM2, rewriting a text the prompt carries (c = 1) and in free chat (c = 1, 4, 16), beside llama.cpp's
llama-server with and without its own n-gram speculation, and the machine's floors measured in the same run. What
it measures and how: bench/speculative.py.

    python tools/bench_speculative.py [--concurrency 1,4,16] [--requests 12] [--texts 4] [--no-llamacpp]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import speculative  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop clients per free-chat point")
    parser.add_argument("--requests", type=int, default=12, help="free-chat requests per point, at least (3 per client)")
    parser.add_argument("--texts", type=int, default=4, help="texts rewritten per grounded round (one more warms up)")
    parser.add_argument("--tokens", type=int, default=8, help="the decode model's num_speculative_tokens")
    parser.add_argument("--max-rows", type=int, default=12, help="the decode model's speculative_max_rows")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="tokens per sequence (both servers)")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave llama-server out")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "speculative"), help="output path stem")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return speculative.run(args, "python tools/bench_speculative.py " + shlex.join(argv))


if __name__ == "__main__":
    raise SystemExit(main())
