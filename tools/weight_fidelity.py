#!/usr/bin/env python3
"""How much each weight format changes SmolLM2-135M-Instruct's predictions, against float32 transformers.
Saves benchmarks/weight_fidelity.md and .json.

    python tools/weight_fidelity.py [--formats float32 Q4_1 ...] [--k-files Q4_K_M Q5_K_M Q6_K]
                                    [--out benchmarks/weight_fidelity.md]

--k-files adds rows for SmolLM2's file re-quantized by llama-quantize (built on first use from the vendored
llama.cpp: several minutes on 2 cores; the files are kept in build/kquants/).

What is compared: bench/weight_fidelity.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.weight_fidelity import FORMATS, K_FILES, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--k-files", nargs="*", default=list(K_FILES), choices=list(K_FILES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "weight_fidelity.md"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
