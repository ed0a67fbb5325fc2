#!/usr/bin/env python3
"""How much each weight format changes SmolLM2-135M-Instruct's predictions, against float32 transformers.
Saves benchmarks/weight_fidelity.md and .json.

    python tools/weight_fidelity.py [--formats float32 Q4_1 ...] [--out benchmarks/weight_fidelity.md]

What is compared: bench/weight_fidelity.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.weight_fidelity import FORMATS, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "weight_fidelity.md"))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
