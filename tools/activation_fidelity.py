#!/usr/bin/env python3
"""int8 activations beside float32 activations and beside llama.cpp (llama-perplexity) on the same GGUF file and
text, under llama-perplexity's chunked protocol (issue 27). Saves benchmarks/activation_fidelity.md and .json.

    python tools/activation_fidelity.py [--n-ctx N] [--out benchmarks/activation_fidelity.md]

Builds llama-perplexity on first use (bench/llamacpp.py, build_perplexity: several minutes on 2 cores). The
protocol and what is compared: bench/activation_fidelity.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.activation_fidelity import MIN_CHUNKS, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-ctx", type=int, default=0,
                        help=f"tokens per chunk (default: the text's tokens // {MIN_CHUNKS}, the largest giving "
                             f"{MIN_CHUNKS} chunks)")
    parser.add_argument("--text", nargs="+", metavar="FILE",
                        help="text files to score, joined by blank lines (default: bench.weight_fidelity.HELD_TEXT, "
                             "116 tokens: a quick check; a few thousand tokens make the perplexities comparable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "activation_fidelity.md"))
    parser.add_argument("--llamacpp-cache-dir", default=str(ROOT / "build" / "llamacpp"),
                        help="where llama.cpp is built (bench/llamacpp.py's cache folder)")
    parser.add_argument("--llamacpp-log", help="also save llama-perplexity's output here")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
