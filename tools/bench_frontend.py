#!/usr/bin/env python3
"""Frontend benchmark (`make bench-frontend`, also run by `make bench`): aiperf against our OpenAI frontend and
against llama.cpp's llama-server, on SmolLM2-135M-Instruct, and what our frontend costs over gRPC.

    python tools/bench_frontend.py [--concurrency 1,4,16,64] [--requests N] [--systems ...] [--quick] [--out STEM]
    python tools/bench_frontend.py --render benchmarks/frontend_aiperf.json [--out STEM]   (report only)

The systems, the runs and the report: bench/frontend.py.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import frontend, report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default=",".join(map(str, frontend.CONCURRENCIES)))
    parser.add_argument("--requests", type=int, default=16, help="requests per point, at least")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests per point = max(--requests, this x concurrency)")
    parser.add_argument("--systems", default=",".join(frontend.SYSTEMS), help=f"any of {','.join(frontend.SYSTEMS)}")
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=16,
                        help="sequences decoded at once: our converted max batch, llama-server's --parallel")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="aiperf's --random-seed (the prompts)")
    parser.add_argument("--point-timeout", type=float, default=900, help="seconds one aiperf run may take")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: concurrency 1, 4 requests, 16 output tokens, ours only; writes "
                             "build/bench_frontend/quick.* unless --out is given")
    parser.add_argument("--prepare-only", action="store_true", help="make the model files and the aiperf "
                        "environment, then stop")
    parser.add_argument("--out", default=None, help="output path stem (default benchmarks/frontend_aiperf)")
    parser.add_argument("--render", metavar="JSON", help="write the report again from a run's JSON, run nothing")
    args = parser.parse_args(argv)
    if args.render:
        return report.render_again(frontend.write_report, args.render, args.out, frontend.say)
    # SIGTERM (a supervisor, `kill`) ends the run through the finally blocks that stop the servers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.concurrency, args.requests, args.requests_per_client, args.output_tokens = "1", 4, 1, 16
        if args.systems == parser.get_default("systems"):
            args.systems = "ours-v1,ours-grpc,ours-v1-thin"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.systems = args.systems.split(",")
    unknown = set(args.systems) - set(frontend.SYSTEMS)
    if unknown:
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from {frontend.SYSTEMS}")
    out = Path(args.out) if args.out else (frontend.BUILD / "quick" if args.quick
                                           else ROOT / "benchmarks" / "frontend_aiperf")
    return frontend.run(args, out)


if __name__ == "__main__":
    sys.exit(main())
