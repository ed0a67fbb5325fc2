#!/usr/bin/env python3
"""Train the demo model (a small LLaMA, with MindSpore on the CPU) and save it as a Hugging Face folder.

    python tools/make_demo_model.py --out DIR [--steps N] [--seed S] [--if-stale]

The model learns the project's own documentation by heart (see mstriton/demo/corpus.py), so that greedy
continuation of a sentence's first words gives back the words that follow them. DIR receives config.json,
model.safetensors, tokenizer.model, tokenizer_config.json, corpus.txt and training.json; it is replaced only
once the whole folder is written. Convert it with tools/convert.py --checkpoint DIR.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only; our own progress lines say what happens


def main(argv: list[str] | None = None) -> int:
    from mstriton.demo.train import TrainSettings

    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps (default: {defaults.epochs:g} passes over the corpus's sentences; "
                             "fewer steps memorize less)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the initial weights and batches")
    parser.add_argument("--if-stale", action="store_true",
                        help="do nothing if OUT already holds a model trained with these settings on the current "
                             "corpus (the corpus changes when the project's documentation does)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")

    from mstriton.demo.train import build_demo_model, is_current

    settings = TrainSettings(steps=args.steps, seed=args.seed)
    if args.if_stale and is_current(args.out, settings):
        print(f"{args.out} is up to date: trained with these settings on the current corpus", flush=True)
        return 0
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[demo model {time.monotonic() - started:6.1f}s] {message}", flush=True)

    build_demo_model(args.out, settings, progress=progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
