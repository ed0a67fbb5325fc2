#!/usr/bin/env python3
"""Ours against llama.cpp and vLLM CPU through one OpenAI streaming client (`make bench-peers`, issue 27), on
SmolLM2-135M-Instruct's Q4_1 GGUF file, with the machine's floors measured in the same run.

    python tools/bench_peers.py [--systems ours-q4_1,ours-q4_1-int8,llamacpp-q4_1[,vllm]] [--concurrency 1,4,16[,64]]
                                [--requests N] [--out STEM]
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
    parser.add_argument("--systems", default=",".join(peers.DEFAULT_SYSTEMS),
                        help=f"any of {','.join(peers.SYSTEMS)} (default: all but vllm)")
    parser.add_argument("--concurrency", default=",".join(map(str, peers.CONCURRENCIES)),
                        help="closed-loop clients per point, e.g. 1,4,16,64")
    parser.add_argument("--requests", type=int, default=16, help="requests per point, at least")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests per point = max(--requests, this x concurrency)")
    parser.add_argument("--prompt-tokens", type=int, default=peers.PROMPT_TOKENS,
                        help="tokens of each chat prompt after SmolLM2's chat template")
    parser.add_argument("--output-tokens", type=int, default=peers.OUTPUT_TOKENS)
    parser.add_argument("--max-seq-len", type=int, default=peers.MAX_SEQ_LEN,
                        help="our converted max_seq_len, llama-server's context per slot, vLLM's max-model-len")
    parser.add_argument("--seed", type=int, default=0, help="the prompts' seed")
    parser.add_argument("--start-timeout", type=float, default=1200, help="seconds our server may take to start")
    parser.add_argument("--out", default=None, help="output path stem (default benchmarks/peers)")
    parser.add_argument("--render", metavar="JSON", help="write the report again from a run's JSON, run nothing")
    args = parser.parse_args(argv)
    if args.render:
        return report.render_again(peers.write_report, args.render, args.out, peers.say)
    # SIGTERM (a supervisor, `kill`) ends the run through the finally blocks that stop the servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.systems = args.systems.split(",")
    unknown = set(args.systems) - set(peers.SYSTEMS)
    if unknown:
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from {list(peers.SYSTEMS)}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "peers"
    command = shlex.join(["python", "tools/bench_peers.py", *argv])
    return peers.run(args, out, command)


if __name__ == "__main__":
    sys.exit(main())
