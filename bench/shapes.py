"""The two shapes of the pipeline side by side (tools/bench_shapes.py, `make bench-shapes`; issue 31):

- disaggregated: tokenizer -> NAME_prefill -> NAME_sampler -> NAME_decode, prompts prefilled in a process of their
  own under Triton's dynamic batcher and handed to decode through the shared KV pool;
- colocated: tokenizer -> NAME_decode, prompts prefilled in chunks between decode steps.

SmolLM2 as `make run` serves it (Q4_1 blocks, int8 activations; python -m mstriton.serve, the OpenAI frontend), the
same conversion but for --shape. Each shape gets a server of its own, one after the other (never both at once on
this machine's cores); with --rounds 2 the order is A B then B A. Points, all through the same streaming chat client
(closed loop, greedy, `min_tokens` so every request makes its full output):
- chat c = 1, 4, 16, 64: bench-peers' prompts (128 tokens), 128 output tokens: output tokens/s, TTFT, ITL;
- long prompts beside streams, c = 4 and 16: one request in four carries a prompt of LONG_TOKENS tokens; the ITL
  of the short requests' every gap between two tokens (p50, p99, max): what a long prompt costs the others.
The machine's floors (read bandwidth, FMA and int8 peaks) are measured first, in the same run (bench.peers.floors).
Writes STEM.md, STEM.json and STEM.png (default benchmarks/shapes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bench import aiperf, frontend, peers, report
from bench.harness.loops import closed_loop

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "bench_shapes"
SHAPES = ("disaggregated", "colocated")
OUTPUT = 128
LONG_TOKENS = 1024
LONG_EVERY = 4  # one request in this many carries a long prompt in the "long" points
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[bench-shapes {time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


def bodies(contents: list[str]) -> list[dict]:
    return [{**peers.base_body(c, OUTPUT), **peers.SYSTEM_FIELDS["ours"](OUTPUT)} for c in contents]


def gaps_ms(timings) -> np.ndarray:
    """Every gap between two consecutive tokens of the given requests, in ms."""
    gaps = [np.diff(t.token_times) for t in timings if len(t.token_times) > 1]
    return np.concatenate(gaps) * 1e3 if gaps else np.zeros(1)


def measure(port: int, load: list[dict], warmup: list[dict], concurrency: int, long_prompt: set[int]) -> dict:
    """A closed-loop point: the figures of all requests, and the token gaps of the short ones."""
    send = lambda _i, body: frontend.stream_chat(port, body)  # noqa: E731
    closed_loop(warmup, concurrency, send)
    timings = closed_loop(load, concurrency, send)
    value = aiperf.figures_of_timings(timings)
    short = [t for i, t in enumerate(timings) if i not in long_prompt]
    gaps = gaps_ms(short)
    value.update(gap_p50_ms=float(np.percentile(gaps, 50)), gap_p99_ms=float(np.percentile(gaps, 99)),
                 gap_max_ms=float(gaps.max()),
                 short_ttft_p50_ms=float(np.percentile([(t.token_times[0] - t.start) * 1e3 for t in short], 50)),
                 incomplete=sum(t.completion_tokens != OUTPUT for t in timings))
    return value


def serve_points(shape: str, repository: Path, contents: list[str], long_contents: list[str],
                 concurrencies: list[int], requests: int, results: dict, round_: int) -> None:
    from bench.harness.servers import ServeProcess

    log = BUILD / f"serve-{shape}.log"
    say(f"{shape}: starting python -m mstriton.serve on {repository} (log {log})")
    server = ServeProcess(repository, log)
    try:
        started = time.monotonic()
        server.wait_ready(timeout=1800)
        results["ready_seconds"].setdefault(shape, []).append(round(time.monotonic() - started, 1))
        port = server.ports.frontend

        def record(key: str, value: dict) -> None:
            value["round"] = round_
            results["points"].setdefault(shape, {}).setdefault(key, []).append(value)
            say(f"{shape} {key}: {value['output_tokens_per_s']:.1f} output tok/s, TTFT p50 {value['ttft_p50_ms']:.0f}"
                f" ms, ITL p50 {value['itl_p50_ms']:.1f} ms, gap p99 {value['gap_p99_ms']:.1f} ms")
            report.write_atomically(BUILD / "results.json", json.dumps(results, indent=1))

        for c in concurrencies:
            n = max(requests, 2 * c)
            record(f"chat c={c}", measure(port, bodies(contents[:n]), bodies(contents[-c:]), c, set()))
        for c in (4, 16):
            n = max(requests, 3 * c)
            mixed = [long_contents[i // LONG_EVERY % len(long_contents)] if i % LONG_EVERY == 0 else contents[i]
                     for i in range(n)]
            record(f"long c={c}", measure(port, bodies(mixed), bodies(contents[-c:]), c,
                                          {i for i in range(n) if i % LONG_EVERY == 0}))
    finally:
        say(f"{shape}: server stopped ({server.stop()})")


def mean(results: dict, shape: str, key: str, field: str) -> float | None:
    rounds = results["points"].get(shape, {}).get(key, [])
    return float(np.mean([r[field] for r in rounds])) if rounds else None


def markdown(results: dict) -> str:
    f = results["floors"]
    keys = list(results["points"].get(SHAPES[0], {}))
    lines = ["# The pipeline's two shapes: disaggregated and colocated (SmolLM2 Q4_1, greedy)", "",
             f"{results['date']} on {results['machine']}. One run: `{results['command']}`.", "",
             f"Floors measured in the same run: read bandwidth {max(f['read_bandwidth_gbs'].values()):.1f} GB/s, "
             f"float32 FMA peak {f['fma_peak_gflops']} GFLOP/s, int8 peak {f['int8_peak_gmacs']} G multiply-adds/s "
             f"({f['int8_isa']}), decode floor {f['decode_floor_ms']} ms a token at one stream.", "",
             f"`chat`: {peers.PROMPT_TOKENS}-token prompts, {OUTPUT} output tokens each. `long`: the same, but one "
             f"request in {LONG_EVERY} carries a prompt of about {LONG_TOKENS} tokens; its gap columns are every gap "
             "between two tokens of the short requests. Means of the rounds; the ratio is disaggregated / colocated "
             "(above 1: the disaggregated shape is faster for throughput, slower for latencies).", "",
             "Server ready after (s): " + "; ".join(f"{s} {v}" for s, v in results["ready_seconds"].items()), "",
             "| point | shape | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | gap p99 ms | gap max ms |",
             "|---|---|---|---|---|---|---|---|"]
    fields = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "gap_p99_ms", "gap_max_ms")
    for key in keys:
        for shape in SHAPES:
            values = [mean(results, shape, key, field) for field in fields]
            cells = [f"{v:.1f}" if v is not None else "not run" for v in values]
            lines.append(f"| {key} | {shape} | " + " | ".join(cells) + " |")
        ratios = []
        for field in fields:
            a, b = mean(results, SHAPES[0], key, field), mean(results, SHAPES[1], key, field)
            ratios.append(f"{a / b:.2f}x" if a and b else "-")
        lines.append(f"| {key} | **ratio** | " + " | ".join(ratios) + " |")
    lines += ["", "Per round (output tok/s):", "", "| shape | point | rounds |", "|---|---|---|"]
    for shape, points in results["points"].items():
        for key, rounds in points.items():
            lines.append(f"| {shape} | {key} | " + " / ".join(format(r["output_tokens_per_s"], ".1f") for r in rounds)
                         + " |")
    if results.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["points"].get(SHAPES[0], {}))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (field, label) in zip(axes, (("output_tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "TTFT p50 ms"),
                                         ("gap_p99_ms", "token gap p99 ms"))):
        for k, shape in enumerate(SHAPES):
            values = [mean(results, shape, key, field) or 0.0 for key in keys]
            ax.bar(np.arange(len(keys)) + (k - 0.5) * 0.4, values, 0.4, label=shape)
        ax.set_xticks(range(len(keys)), keys, rotation=30, fontsize=8)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2: disaggregated vs colocated pipeline")
    fig.tight_layout()
    return report.save_figure(fig, path)


def run(args, command: str) -> int:
    gguf, results = peers.smollm2_run(BUILD, say, command, ready_seconds={})
    repositories = {shape: frontend.model_repository(gguf, args.slots, args.max_seq_len, weights="Q4_1",
                                                     repository=BUILD / f"repo-{shape}", shape=shape)
                    for shape in SHAPES}
    tokenizer_dir = repositories[SHAPES[0]] / "smollm2_tokenizer" / "1"
    need = max(args.requests, 3 * max(args.concurrency)) + max(args.concurrency)
    contents, _ = peers.make_contents(tokenizer_dir, need, prompt_tokens=peers.PROMPT_TOKENS)
    long_contents, lengths = peers.make_contents(tokenizer_dir, 8, prompt_tokens=LONG_TOKENS, seed=7)
    results["long_prompt_tokens"] = lengths
    for round_ in range(args.rounds):
        for shape in SHAPES if round_ % 2 == 0 else SHAPES[::-1]:
            serve_points(shape, repositories[shape], contents, long_contents, args.concurrency, args.requests,
                         results, round_)
    report.save_run(results, args.out, markdown, plot)
    return 0


if __name__ == "__main__":  # pragma: no cover - tools/bench_shapes.py is the entry point
    raise SystemExit("run tools/bench_shapes.py")
