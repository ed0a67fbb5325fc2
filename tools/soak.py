#!/usr/bin/env python3
"""`make soak`: serve an LLM with `python -m mstriton.serve` and drive it through every door for --minutes.

    python tools/soak.py [--minutes 20] [--repository model_repository] [--model smollm2] [--out benchmarks/soak]

Mixed load through every door (greedy, sampled, invalid, cancelled and disconnected requests, at the decode pool's
concurrency, 4x over it and in bursts over its queue; bench/soak.py says which and how). Writes OUT.md and
OUT.json, prints a progress line every 30 s, and exits 1 if any request went unanswered or any greedy answer
differed from its solo run.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="smollm2", help="the LLM of the repository to drive (default smollm2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/soak"), help="writes OUT.md and OUT.json")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120, help="seconds a request may take to get its answer")
    args = parser.parse_args()
    # SIGTERM, and SIGINT even when started in the background with it ignored, stop the server on the way out
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("soak: terminated"))
    if not (args.repository / f"{args.model}_decode" / "config.pbtxt").exists():
        hint = " (run `make smollm2` first)" if args.model == "smollm2" else ""
        sys.exit(f"soak: {args.repository}/{args.model}_decode is missing{hint}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
