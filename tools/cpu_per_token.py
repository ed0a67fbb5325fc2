#!/usr/bin/env python3
"""CPU time per generated token in each process of the served path, at one concurrency: where a token's cost
goes (tritonserver, the front model, decode, prefill, ...). Serves a converted repository, drives NAME with
perf_analyzer --streaming for about 30 s, and divides each process's CPU time (/proc/PID/stat) by the tokens
the server's own counter (mstriton_generation_tokens_total) says it generated.

    python tools/cpu_per_token.py --repository build/bench/repo_demo --name demo --tokenizer \
        build/demo_model/tokenizer.model [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mstriton.bench.triton_run import PERF_ANALYZER, input_data  # noqa: E402
from mstriton.bench.workload import make_prompts  # noqa: E402
from mstriton.server_process import metric_value, running_server  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def served_processes(server_pid: int) -> dict[str, int]:
    """tritonserver and every Python-backend stub, by the model it runs."""
    found = {"tritonserver": server_pid}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(b"triton_python_backend_stub"):
            model = re.search(rb"/([^/]+)/\d+/model\.py", argv[1])
            if model:
                found[model.group(1).decode()] = int(proc.name)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed response")
    args = parser.parse_args(argv)
    with running_server(args.repository, Path("/tmp") / f"cpu_per_token_{args.name}.log") as server:
        data = Path("/tmp") / f"cpu_per_token_{args.name}.json"
        prompts = make_prompts(args.tokenizer, 4 * args.concurrency, args.prompt_tokens, seed=1)
        data.write_text(json.dumps(input_data(prompts, args.output_tokens, args.stream_interval)))
        processes = served_processes(server.process.pid)
        before = {name: cpu_seconds(pid) for name, pid in processes.items()}
        tokens_before = metric_value(server.metrics(), "mstriton_generation_tokens_total", model=args.name)
        started = time.monotonic()
        # Two 15 s windows; on a shared CPU perf_analyzer may call them unstable, which does not matter here:
        # the figures come from the server's token counter and /proc, not from perf_analyzer.
        subprocess.run([str(PERF_ANALYZER), "-m", args.name, "-i", "grpc", "--streaming", "-u", server.grpc,
                        "--input-data", str(data), "--concurrency-range", str(args.concurrency),
                        "--measurement-mode", "time_windows", "--measurement-interval", "15000",
                        "--stability-percentage", "999", "--max-trials", "2"], capture_output=True)
        seconds = time.monotonic() - started
        after = {name: cpu_seconds(pid) for name, pid in processes.items()}
        tokens = metric_value(server.metrics(), "mstriton_generation_tokens_total", model=args.name) - tokens_before
    if tokens <= 0:
        raise SystemExit("no tokens were generated; see the server log")
    print(f"{tokens:.0f} tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s) at concurrency "
          f"{args.concurrency}")
    print("| process | CPU per token (us) |\n|---|---:|")
    costs = {name: (after[name] - before[name]) / tokens * 1e6 for name in processes}
    for name, cost in sorted(costs.items(), key=lambda item: -item[1]):
        print(f"| {name} | {cost:.0f} |")
    print(f"| total | {sum(costs.values()):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
