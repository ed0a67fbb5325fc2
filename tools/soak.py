#!/usr/bin/env python3
"""`make soak`: serve an LLM with `python -m mstriton.serve` and drive it through every door for --minutes.

    python tools/soak.py [--minutes 20] [--repository model_repository] [--model smollm2] [--out benchmarks/soak]

Mixed load (the doors are mstriton/bench/soak.py's DOORS: tritonclient gRPC streaming, Triton HTTP generate and
generate_stream, KServe v2 /infer, OpenAI chat and completions streamed and not, TGI /generate_stream, MindSpore
Serving /models/NAME/generate): greedy and sampled requests, invalid ones (expect 4xx / INVALID_ARG), cancelled
ones (a gRPC stream cancelled after its first token), disconnected ones (an SSE client closing its socket after
the first event), in cycles of a phase at the decode pool's concurrency (its max_batch_size), one at 4x that,
and a burst of more requests than its slots and queue hold (expect 503 / UNAVAILABLE "server busy"). Every
client targets 127.0.0.1, every request has a timeout and every loop a count and a time bound.

Reports requests by door and outcome; `unanswered` counts requests that got neither a final answer nor an error
within --timeout; every greedy answer under load is compared with the solo answer of the same door and prompt
taken at the start; the RSS of tritonserver, each model process and the frontend after warm-up and at the end;
p50/p99 of time to first token and total time per door. Writes OUT.md and OUT.json, prints a progress line every
30 s, and exits 1 if any request went unanswered or any greedy answer differed from its solo run.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mstriton.bench.scenarios import word_stream  # noqa: E402
from mstriton.bench.soak import (DOORS, OUTCOMES, Ports, Result, markdown, pool_size, rss_by_process,  # noqa: E402
                                 send, summary)
from mstriton.bench.timing import run_clients  # noqa: E402
from mstriton.server_process import free_port, python_environment, terminate, wait_until_healthy  # noqa: E402

GREEDY_PROMPTS = [" ".join(word_stream(seed, 12)) for seed in (1, 2, 3)]
# request kinds of the mixed load and their weights (cancel and disconnect fall back to greedy on doors without)
KINDS = {"greedy": 4, "sampled": 3, "invalid": 1, "cancel": 1, "disconnect": 1}
MAX_REQUESTS_PER_CLIENT = 10_000  # a bound on each client loop, beside its time
BUSY_PAUSE = 1.0  # seconds a client waits after a "server busy" answer


class Load:
    """The results so far, shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.results: list[Result] = []
        self.started = time.monotonic()
        self.phase = "warm-up"
        self.memory: list[tuple[float, dict]] = []  # (seconds into the load, RSS by process), every 30 s

    def add(self, result: Result) -> None:
        with self.lock:
            self.results.append(result)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {o: n for o in OUTCOMES if (n := sum(r.outcome == o for r in self.results))}


def start_server(repository: Path, log: Path) -> tuple[subprocess.Popen, Ports]:
    ports = Ports(http=free_port(), grpc=free_port(), metrics=free_port(), frontend=free_port())
    command = [sys.executable, "-m", "mstriton.serve", "--model-repository", str(repository),
               "--http-port", str(ports.http), "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
               "--frontend-port", str(ports.frontend), "--admin-key", secrets.token_urlsafe(24)]
    process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                               env=python_environment())
    tail = lambda: log.read_text(errors="replace")[-3000:]  # noqa: E731
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{ports.http}/v2/health/ready", "tritonserver", tail, 900)
        wait_until_healthy(process, f"http://127.0.0.1:{ports.frontend}/health", "the frontend", tail, 120)
    except BaseException:
        terminate(process, timeout=90)
        raise
    return process, ports


def client_loop(load: Load, ports: Ports, args, seed: int, until: float, references: dict) -> None:
    rng = random.Random(seed)
    for count in range(MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= until:
            return
        door = rng.choice(list(DOORS))
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        prompt = rng.choice(GREEDY_PROMPTS) if kind == "greedy" else " ".join(word_stream(seed * 100_000 + count, 12))
        result = send(ports, args.model, door, kind, prompt, args.max_tokens, args.timeout, seed=count,
                      reference=references.get((door, prompt)) if kind == "greedy" else None)
        load.add(result)
        if result.outcome == "busy":
            time.sleep(BUSY_PAUSE)  # a client told to retry later waits, as Retry-After asks


def run_phase(load: Load, ports: Ports, args, name: str, clients: int, seconds: float, references) -> None:
    load.phase = f"{name} ({clients} clients)"
    until = time.monotonic() + seconds
    errors: list[BaseException] = []
    seeds = list(range(len(load.results) + 1, 10**9, 7919)[:clients])

    def client() -> None:
        try:
            client_loop(load, ports, args, seeds.pop(), until, references)
        except BaseException as exc:  # noqa: BLE001 - a bug of this script: raised after the phase
            errors.append(exc)

    run_clients(client, clients, errors)


def burst(load: Load, ports: Ports, args, size: int) -> None:
    """`size` requests at once, all through the doors in turn, one each."""
    load.phase = f"burst ({size} at once)"
    doors = list(DOORS)
    jobs = iter(range(size))
    lock = threading.Lock()

    def client() -> None:
        with lock:
            index = next(jobs)
        prompt = " ".join(word_stream(10**7 + index, 12))
        load.add(send(ports, args.model, doors[index % len(doors)], "sampled", prompt, args.max_tokens,
                      args.timeout, seed=index))

    run_clients(client, size, [])


def progress(load: Load, stop: threading.Event, serve_pid: int) -> None:
    """A line every 30 s, and a sample of every process's RSS (whether memory is flat after warm-up)."""
    while not stop.wait(30):
        memory = rss_by_process(serve_pid)
        load.memory.append((time.monotonic() - load.started, memory))
        print(f"soak: {time.monotonic() - load.started:5.0f} s, {load.phase}: {len(load.results)} requests "
              f"{load.counts()}; RSS MiB " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="smollm2", help="the LLM of the repository to drive (default smollm2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/soak"), help="writes OUT.md and OUT.json")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120, help="seconds a request may take to get its answer")
    args = parser.parse_args()
    # SIGTERM, and SIGINT even when started in the background with it ignored, stop the server on the way out
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("soak: terminated"))
    if not (args.repository / f"{args.model}_decode" / "config.pbtxt").exists():
        hint = " (run `make smollm2` first)" if args.model == "smollm2" else ""
        sys.exit(f"soak: {args.repository}/{args.model}_decode is missing{hint}")
    slots, waiting = pool_size(args.repository, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = Path("build") / f"{args.out.name}.server.log"  # beside the other build outputs, not the report
    log.parent.mkdir(exist_ok=True)
    print(f"soak: serving {args.repository} (log {log}); {args.model}: {slots} decode slots, {waiting} queue places",
          flush=True)
    process, ports = start_server(args.repository, log)
    load = Load()
    stop = threading.Event()
    try:
        # solo greedy answers, one per door and prompt, one at a time: the references, and the warm-up
        references = {}
        for door in DOORS:
            for prompt in GREEDY_PROMPTS:
                solo = send(ports, args.model, door, "greedy", prompt, args.max_tokens, args.timeout)
                if solo.outcome != "ok":
                    raise RuntimeError(f"solo greedy request on {door} failed: {solo.outcome} {solo.message}")
                references[(door, prompt)] = solo.text
        memory_start = rss_by_process(process.pid)
        print("soak: warmed up; RSS MiB " + ", ".join(f"{k} {v:.0f}" for k, v in memory_start.items()), flush=True)
        load.started = time.monotonic()
        threading.Thread(target=progress, args=(load, stop, process.pid), daemon=True).start()
        deadline = load.started + args.minutes * 60
        cycle = min(150.0, args.minutes * 60)  # seconds: at the pool's concurrency, 4x over, then a burst
        while time.monotonic() < deadline - 5:
            left = deadline - time.monotonic()
            run_phase(load, ports, args, "at capacity", slots, min(cycle * 0.45, left / 2), references)
            run_phase(load, ports, args, "4x over", 4 * slots, min(cycle * 0.45, max(deadline - time.monotonic(), 1)),
                      references)
            burst(load, ports, args, slots + waiting + 2 * slots)
        time.sleep(5)  # let cancelled and disconnected requests leave their slots
        memory_end = rss_by_process(process.pid)
    finally:
        stop.set()
        code = terminate(process, timeout=90)
        print(f"soak: server stopped (exit status {code})", flush=True)
    report = summary(load.results, memory_start, memory_end,
                     dict(model=args.model, repository=str(args.repository), minutes=args.minutes, slots=slots,
                          queue=waiting, max_tokens=args.max_tokens, timeout_s=args.timeout, server_exit=code),
                     load.memory)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text, flush=True)
    failed = report["unanswered"] or report["greedy"]["mismatched"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
