#!/usr/bin/env python3
"""CPU time per generated token in each process of the served path, against the engine alone, at one
concurrency: where a token's cost goes (tritonserver, the front model, the decode model, ...), and what the
served path costs over the engine's own work.

    python tools/cpu_per_token.py --repository build/bench/repo_smollm2_q4_1 --name smollm2 \
        --tokenizer build/bench/repo_smollm2_q4_1/smollm2_tokenizer/1 [--concurrency 16] [--out STEM]

How it is measured: bench/cpu_per_token.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.cpu_per_token import run  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer file or folder for the prompts")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed response")
    parser.add_argument("--window-ms", type=int, default=15000, help="each of perf_analyzer's two windows")
    parser.add_argument("--ramp-s", type=float, default=10.0,
                        help="seconds the engine alone's closed loop runs before its window starts")
    parser.add_argument("--out", type=Path, help="save the table as OUT.md and the figures as OUT.json")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
