#!/usr/bin/env python3
"""Ours against llama.cpp and vLLM CPU through one OpenAI streaming client (`make bench-peers`, issue 27), with the
machine's floors measured in the same run: on SmolLM2-135M-Instruct's Q4_1 GGUF file (--model smollm2, the
default), or on a random LLaMA in Llama-3.2-1B's shape with SmolLM2's vocabulary (--model llama1b,
`make bench-peers-1b`: its Q8_0 GGUF file for ours and llama.cpp, its BF16 file for llama.cpp, its bfloat16 Hugging
Face folder for vLLM; 64 output tokens by default; made once in build/llama1b by bench/llama1b.py).

    python tools/bench_peers.py [--systems ours-q4_1,ours-q4_1-int8,llamacpp-q4_1[,vllm]] [--concurrency 1,4,16[,64]]
                                [--requests N] [--out STEM]
    python tools/bench_peers.py --model llama1b [--systems ours-q8_0,ours-q8_0-int8,llamacpp-q8_0,llamacpp-bf16[,vllm]]
                                [--concurrency 1,4,16] [--output-tokens 64] [--out STEM]
    python tools/bench_peers.py --render benchmarks/peers.json [--out STEM]   (report only)

vLLM is left out unless --systems names it (`vllm`: its start takes 7-14 minutes on 2 cores). The systems, the
bodies and the report: bench/peers.py.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import peers, report  # noqa: E402


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(peers.MODELS), default=peers.SMOLLM2.name,
                        help="what every system serves: smollm2 (SmolLM2-135M-Instruct, default) or llama1b (random "
                             "weights in Llama-3.2-1B's shape, SmolLM2's vocabulary)")
    parser.add_argument("--systems", default=None,
                        help="smollm2: any of " + ",".join(peers.SMOLLM2.systems) + "; llama1b: any of "
                             + ",".join(peers.LLAMA1B.systems) + " (default: all but vllm)")
    parser.add_argument("--concurrency", default=",".join(map(str, peers.CONCURRENCIES)),
                        help="closed-loop clients per point, e.g. 1,4,16,64")
    parser.add_argument("--requests", type=int, default=16, help="requests per point, at least")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests per point = max(--requests, this x concurrency)")
    parser.add_argument("--prompt-tokens", type=int, default=peers.PROMPT_TOKENS,
                        help="tokens of each chat prompt after SmolLM2's chat template")
    parser.add_argument("--output-tokens", type=int, default=None,
                        help="tokens each request makes (default: smollm2 128, llama1b 64)")
    parser.add_argument("--max-seq-len", type=int, default=peers.MAX_SEQ_LEN,
                        help="our converted max_seq_len, llama-server's context per slot, vLLM's max-model-len")
    parser.add_argument("--seed", type=int, default=0, help="the prompts' seed")
    parser.add_argument("--start-timeout", type=float, default=1200, help="seconds our server may take to start")
    parser.add_argument("--out", default=None,
                        help="output path stem (default benchmarks/peers; for llama1b benchmarks/peers_llama1b)")
    parser.add_argument("--render", metavar="JSON", help="write the report again from a run's JSON, run nothing")
    args = parser.parse_args(argv)
    if args.render:
        return report.render_again(peers.write_report, args.render, args.out, peers.say)
    # SIGTERM (a supervisor, `kill`) ends the run through the finally blocks that stop the servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model = peers.MODELS[args.model]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.systems = args.systems.split(",") if args.systems else list(model.default_systems)
    unknown = set(args.systems) - set(model.systems)
    if unknown:
        parser.error(f"--systems: unknown for --model {model.name}: {sorted(unknown)}; choose from "
                     f"{list(model.systems)}")
    if args.output_tokens is None:
        args.output_tokens = model.output_tokens
    out = Path(args.out) if args.out else ROOT / "benchmarks" / model.stem
    command = shlex.join(["python", "tools/bench_peers.py", *argv])
    return peers.run(args, out, command)


if __name__ == "__main__":
    sys.exit(main())
