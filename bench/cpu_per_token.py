"""CPU time per generated token in each process of the served path, against the engine alone, at one
concurrency (tools/cpu_per_token.py, `make bench-efficiency`): where a token's cost goes (tritonserver, the front model, the decode model, ...), and what the
served path costs over the engine's own work.

    python tools/cpu_per_token.py --repository build/bench/repo_smollm2_q4_1 --name smollm2 \
        --tokenizer build/bench/repo_smollm2_q4_1/smollm2_tokenizer/1 [--concurrency 16] [--out STEM]

Serves the converted repository, drives NAME with perf_analyzer --streaming for about 30 s, and divides each
process's CPU time (bench.harness.processes) by the tokens the server's own counter (mstriton_generation_tokens_total)
says it generated. Then, with the server stopped, the engine alone (the same scheduler and graphs in one
process, bench/engine_alone.py) runs the same prompts at the same concurrency; its process's CPU time
is divided by the tokens it generated in a window of the same length, taken from the middle of its run.
Prints a table and, with --out, saves it as STEM.md and STEM.json.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from bench.harness.processes import cpu_seconds, served_processes
from bench.harness.servers import metric_value, running_server
from bench.report import machine_description
from bench.triton_run import input_data, stream_for_windows
from bench.workload import make_prompts


def measure_served(args, prompts: list[str]) -> dict:
    """CPU seconds per process and tokens generated while perf_analyzer streams at args.concurrency."""
    with running_server(args.repository, Path("/tmp") / f"cpu_per_token_{args.name}.log") as server:
        data = Path("/tmp") / f"cpu_per_token_{args.name}.json"
        data.write_text(json.dumps(input_data(prompts, args.output_tokens, args.stream_interval)))
        warm = data.with_suffix(".warm.json")  # compile the batch shapes before measuring
        warm.write_text(json.dumps(input_data(prompts[:args.concurrency], 4)))
        # a short window of 4-token requests compiles the batch shapes before measuring
        stream_for_windows(server.grpc, args.name, warm, args.concurrency, 3000, 1, server.process)
        processes = served_processes(server.process.pid)
        before = {name: cpu_seconds(pid) for name, pid in processes.items()}
        tokens_before = metric_value(server.metrics(), "mstriton_generation_tokens_total", model=args.name)
        started = time.monotonic()
        # Two windows; on a shared CPU perf_analyzer may call them unstable, which does not matter here: the
        # figures come from the server's token counter and /proc, not from perf_analyzer.
        stream_for_windows(server.grpc, args.name, data, args.concurrency, args.window_ms, 2, server.process)
        seconds = time.monotonic() - started
        after = {name: cpu_seconds(pid) for name, pid in processes.items()}
        tokens = metric_value(server.metrics(), "mstriton_generation_tokens_total", model=args.name) - tokens_before
    if tokens <= 0:
        raise SystemExit("no tokens were generated; see the server log")
    return {"tokens": tokens, "seconds": seconds,
            "us_per_token": {name: (after[name] - before[name]) / tokens * 1e6 for name in processes}}


def measure_engine_alone(args, prompt_ids: list[list[int]]) -> dict:
    """The engine alone's CPU seconds per generated token on the same prompts, in a process of its own, over a
    steady window like the served side's: the closed loop runs, and the window starts once it has ramped up and
    ends before its last requests drain (counting whole requests instead would add the ramp and the tail, which
    the served side's windows do not see)."""
    from bench.engine_alone import EngineAloneProcess

    engine = EngineAloneProcess(args.repository, args.name, max_slots=args.concurrency)
    try:
        pid = next(iter(engine.pool._processes))  # the one worker process that holds the engine
        engine.run(prompt_ids[:args.concurrency], 4, args.concurrency)  # compile the batch shapes
        running = engine.start_run(prompt_ids, args.output_tokens, args.concurrency)
        time.sleep(args.ramp_s)
        # perf_counter is CLOCK_MONOTONIC on Linux: the child's token times are on the same clock
        started, before = time.perf_counter(), cpu_seconds(pid)
        time.sleep(2 * args.window_ms / 1e3)
        ended, cpu = time.perf_counter(), cpu_seconds(pid) - before
        timings = running.result()
    finally:
        engine.close()
    if max(t.token_times[-1] for t in timings) < ended:
        raise SystemExit("the engine alone's run ended inside the window; give it more prompts")
    tokens = sum(started <= moment < ended for t in timings for moment in t.token_times)
    return {"tokens": tokens, "seconds": ended - started, "us_per_token": cpu / tokens * 1e6}


def report(args, served: dict, engine: dict) -> str:
    costs = served["us_per_token"]
    served_total = sum(costs.values())
    served_rate, engine_rate = served["tokens"] / served["seconds"], engine["tokens"] / engine["seconds"]
    lines = [f"# CPU per generated token, served path against the engine alone, {datetime.date.today()}", "",
             f"`tools/cpu_per_token.py --name {args.name} --concurrency {args.concurrency} --prompt-tokens "
             f"{args.prompt_tokens} --output-tokens {args.output_tokens} --stream-interval {args.stream_interval}` "
             f"on {args.repository.name}. Machine: {machine_description()}. The served path streamed "
             f"{served['tokens']:.0f} tokens in {served['seconds']:.0f} s (perf_analyzer --streaming, gRPC); "
             f"then, with the server stopped, the engine alone {engine['tokens']} tokens in a window of "
             f"{engine['seconds']:.0f} s on the same prompts at the same concurrency (its closed loop running "
             f"{args.ramp_s:.0f} s before the window and on after it, as perf_analyzer's windows are).", "",
             "| process | CPU per generated token (us) |", "|---|---:|"]
    lines += [f"| {name} | {cost:.0f} |" for name, cost in sorted(costs.items(), key=lambda item: -item[1])]
    decode = costs[f"{args.name}_decode"]
    lines += [f"| **served path, total** | **{served_total:.0f}** |",
              # what the hops cost beside the engine's own process (which also sends each step's responses)
              f"| served path outside {args.name}_decode, per token of it | {(served_total - decode) / decode:.2f} |",
              f"| engine alone | {engine['us_per_token']:.0f} |",
              f"| **served / engine alone, CPU per token** | **{served_total / engine['us_per_token']:.2f}** |",
              f"| served tokens/s | {served_rate:.1f} |",
              f"| engine alone tokens/s | {engine_rate:.1f} |",
              f"| **serving efficiency (served / engine alone tokens/s)** | **{served_rate / engine_rate:.2f}** |"]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    """args: tools/cpu_per_token.py's options."""
    from mstriton.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    # enough distinct prompts that neither side runs out in its window (at c=1 a request is a few seconds)
    prompts = make_prompts(tokenizer, max(4 * args.concurrency, 64), args.prompt_tokens, seed=1)
    print(f"serving {args.name} at concurrency {args.concurrency}", flush=True)
    served = measure_served(args, prompts)
    print(f"the engine alone at concurrency {args.concurrency}", flush=True)
    engine = measure_engine_alone(args, [tokenizer.encode(p) for p in prompts])
    table = report(args, served, engine)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "served": served, "engine_alone": engine},
            indent=1))
    return 0

