"""Structured output's cost (tools/bench_structured.py, `make bench-structured`; issue 28), in one run:

- served: SmolLM2 as `make run` serves it (python -m mstriton.serve, int8 activations), the same streaming chat
  client as bench-peers (bench.peers.measure), every request exactly OUTPUT_TOKENS tokens, greedy, at each
  concurrency: with no constraint (`none`, min_tokens holding the length), and with every request under a JSON
  schema (`json_schema`: a long list of objects, so that max_tokens ends each answer while the grammar still
  constrains every token). The two alternate in one server, A B then B A, with the decode model's prefix cache
  off (the same prompts run in both); the ratio is json_schema / none, per round and on the rounds' sums;
- the mask alone: llguidance's mask for 1 and 16 rows at every position of a schema's answer, over SmolLM2's
  vocabulary (GrammarMasks.allowed: the fill and the bitmask applied as the sampler gets it), in CPU microseconds
  per row;
- compiling: a grammar's first compile against the vocabulary (the vocabulary's own load timed apart), and a
  compiled one taken from the cache.

The machine's floors (read bandwidth, FMA and int8 peaks) are measured first, in the same run (bench.peers.floors).
Writes STEM.md, STEM.json and STEM.png (default benchmarks/structured).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bench import frontend, peers, report
from bench.kv_cache import set_decode_parameters

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "bench_structured"
OUTPUT_TOKENS = 128
ROUNDS = 2
ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                         "city": {"type": "string", "maxLength": 24},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                  "maxItems": 3}},
        "required": ["name", "age", "city", "tags"], "additionalProperties": False}
# Never finished within OUTPUT_TOKENS: every answer is cut by max_tokens, as the unconstrained ones are
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": ITEM, "minItems": 40}},
          "required": ["people"], "additionalProperties": False}
ANSWER = {"people": [{"name": f"Person {i}", "age": 20 + i, "city": "Paris", "tags": ["a", "bc"]}
                     for i in range(6)]}


def say(message: str) -> None:
    print(f"[bench-structured {time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


STARTED = time.monotonic()


def bodies(contents: list[str], constrained: bool) -> list[dict]:
    out = []
    for content in contents:
        body = peers.base_body(content, OUTPUT_TOKENS)
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "people", "schema": SCHEMA}}
        else:
            body["min_tokens"] = OUTPUT_TOKENS
        out.append(body)
    return out


def mask_costs(tokenizer_file: Path, vocab_size: int, end_ids: list[int]) -> dict:
    """CPU microseconds of the mask per row and position of ANSWER, for 1 and 16 rows; compile times."""
    from mstriton.engine.structured_output import GrammarCompiler, GrammarMasks, grammar_of, grammar_tokenizer
    from mstriton.tokenizer import load_tokenizer

    started = time.perf_counter()
    vocabulary = grammar_tokenizer(tokenizer_file, vocab_size, end_ids)
    load_s = time.perf_counter() - started
    compiler = GrammarCompiler(lambda: vocabulary)
    grammar = grammar_of({"json": SCHEMA})
    cold = []
    for i in range(5):  # five schemas never seen (their texts differ), then the first again from the cache
        schema = {**SCHEMA, "properties": {**SCHEMA["properties"], f"extra{i}": {"type": "integer"}}}
        started = time.perf_counter()
        compiler.matcher(grammar_of({"json": schema}))
        cold.append(time.perf_counter() - started)
    compiler.matcher(grammar)
    cached = []
    for _ in range(20):
        started = time.perf_counter()
        compiler.matcher(grammar)
        cached.append(time.perf_counter() - started)
    tokens = load_tokenizer(tokenizer_file.parent).encode(json.dumps(ANSWER), add_special_tokens=False)
    masks = GrammarMasks()
    out = {"vocabulary_load_ms": load_s * 1e3, "compile_cold_ms": [round(c * 1e3, 2) for c in cold],
           "compile_cached_ms": float(np.median(cached) * 1e3), "answer_tokens": len(tokens), "mask_us_per_row": {}}
    for rows in (1, 16):
        matchers = [compiler.matcher(grammar) for _ in range(rows)]
        cpu, wall = [], []
        for token in tokens:
            started, started_cpu = time.perf_counter(), time.process_time()
            masks.allowed(matchers, vocab_size)
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
            for m in matchers:
                m.consume_token(token)
        out["mask_us_per_row"][str(rows)] = {"cpu": float(np.mean(cpu) / rows * 1e6),
                                             "wall": float(np.mean(wall) / rows * 1e6),
                                             "cpu_p50": float(np.median(cpu) / rows * 1e6),
                                             "cpu_p90": float(np.percentile(cpu, 90) / rows * 1e6)}
    compiler.close()
    return out


def served(repository: Path, contents: list[str], concurrencies: list[int], requests: int, results: dict) -> None:
    from bench.harness.servers import ServeProcess

    log = BUILD / "serve.log"
    say(f"starting python -m mstriton.serve on {repository} (log {log}; it compiles its graphs first: minutes)")
    server = ServeProcess(repository, log, env={"MSTRITON_KERNEL_ACTIVATIONS": "int8"})
    try:
        server.wait_ready(timeout=1800)
        port = server.ports.frontend
        for c in concurrencies:
            n = max(requests, 3 * c)
            for round_ in range(ROUNDS):
                # A B, then B A: a drift of the machine over the point (a first round after the server's start ran
                # slower) weighs on both alike
                for kind in ("none", "json_schema") if round_ % 2 == 0 else ("json_schema", "none"):
                    chosen = bodies(contents[:n], kind == "json_schema")
                    warm = bodies(contents[-max(4, 2 * c):], kind == "json_schema")
                    value = peers.measure(port, chosen, warm, c, OUTPUT_TOKENS)
                    results["points"].setdefault(kind, {}).setdefault(str(c), []).append(value)
                    say(f"{kind}, c={c}, round {round_ + 1}: {value['output_tokens_per_s']:.1f} output tok/s, "
                        f"ITL p50 {value['itl_p50_ms']:.1f} ms, TTFT p50 {value['ttft_p50_ms']:.0f} ms, usage "
                        f"mismatches {value['usage_mismatches']}")
                    report.write_atomically(BUILD / "results.json", json.dumps(results, indent=1))
    finally:
        say(f"server stopped ({server.stop()})")


def ratio_rows(results: dict) -> list[str]:
    rows = []
    for c, rounds in results["points"].get("none", {}).items():
        schema = results["points"].get("json_schema", {}).get(c, [])
        per_round = [s["output_tokens_per_s"] / n["output_tokens_per_s"] for n, s in zip(rounds, schema)]
        total_none = sum(r["output_tokens_per_s"] for r in rounds)
        total_schema = sum(r["output_tokens_per_s"] for r in schema)
        itl = [s["itl_p50_ms"] - n["itl_p50_ms"] for n, s in zip(rounds, schema)]
        def joined(values, form):
            return " / ".join(format(v, form) for v in values)
        rows.append(f"| {c} | {joined([r['output_tokens_per_s'] for r in rounds], '.1f')} | "
                    f"{joined([r['output_tokens_per_s'] for r in schema], '.1f')} | {joined(per_round, '.3f')} | "
                    f"**{total_schema / total_none:.3f}** | {joined(itl, '+.2f')} |")
    return rows


def markdown(results: dict) -> str:
    f, m = results["floors"], results["mask"]
    lines = [f"# Structured output's cost (SmolLM2, {OUTPUT_TOKENS} output tokens, greedy)", "",
             f"{results['date']} on {results['machine']}. One run: `{results['command']}`.", "",
             f"Floors measured in the same run: read bandwidth {max(f['read_bandwidth_gbs'].values()):.1f} GB/s, "
             f"float32 FMA peak {f['fma_peak_gflops']} GFLOP/s, int8 peak {f['int8_peak_gmacs']} G multiply-adds/s "
             f"({f['int8_isa']}), decode floor {f['decode_floor_ms']} ms a token at one stream.", "",
             "## Served: every request under a JSON schema against none", "",
             "Output tok/s per round (none and json_schema alternate in one server, in the order A B, then B A, each "
             "after a warm-up of max(4, 2c) requests; the prefix cache off); the ratio is json_schema / none per round, and on the rounds' "
             "sums (target >= 0.9). The schema's answers are a list of at least "
             "40 objects, so max_tokens ends every answer while the grammar constrains every token; the "
             "unconstrained ones are held to the same length by min_tokens.", "",
             "| c | none tok/s | json_schema tok/s | ratio per round | ratio | ITL p50 added (ms) |",
             "|---|---|---|---|---|---|", *ratio_rows(results), "",
             "## The mask alone", "",
             f"llguidance's mask over SmolLM2's {results['vocab_size']} tokens at each of the {m['answer_tokens']} "
             "positions of a schema answer (fill and bitmask applied, as the sampler takes it), per row (llguidance "
             "builds its lexer lazily: the first positions cost the most, hence the p90):", "",
             "| rows at once | CPU us per row, mean | wall us per row, mean | CPU p50 | CPU p90 |", "|---|---|---|---|---|"]
    for rows, v in m["mask_us_per_row"].items():
        lines.append(f"| {rows} | {v['cpu']:.0f} | {v['wall']:.0f} | {v['cpu_p50']:.0f} | {v['cpu_p90']:.0f} |")
    lines += ["", "## Compiling", "",
              f"- the vocabulary, once per decode process: {m['vocabulary_load_ms']:.0f} ms",
              f"- a schema never seen (five): {', '.join(f'{x:.1f}' for x in m['compile_cold_ms'])} ms",
              f"- a schema from the cache (a copy of the compiled matcher): {m['compile_cached_ms']:.3f} ms", ""]
    if results.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = list(results["points"].get("none", {}))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for k, kind in enumerate(("none", "json_schema")):
        values = [np.mean([r["output_tokens_per_s"] for r in results["points"][kind][c]]) for c in concurrencies]
        ax.bar(np.arange(len(concurrencies)) + (k - 0.5) * width, values, width, label=kind)
    ax.set_xticks(range(len(concurrencies)), [f"c={c}" for c in concurrencies])
    ax.set_ylabel("output tokens/s (mean of rounds)")
    ax.set_title("SmolLM2, every request under a JSON schema or none")
    ax.legend()
    return report.save_figure(fig, path)


def run(args, command: str) -> int:
    from mstriton.repository import read_config

    gguf, results = peers.smollm2_run(BUILD, say, command)
    slots = max(16, max(args.concurrency))
    repository = frontend.model_repository(gguf, slots, 512, weights="Q4_1", repository=BUILD / "repo")
    # every request computes its prompt: with the prefix cache, whichever kind ran second found the prompts cached
    set_decode_parameters(repository, "smollm2", ["enable_prefix_caching=false"])
    tokenizer_model = repository / "smollm2_tokenizer"
    parameters = {k: v.string_value for k, v in read_config(tokenizer_model).parameters.items()}
    results["vocab_size"] = int(parameters["vocab_size"])
    say("timing the mask and the compiler")
    results["mask"] = mask_costs(tokenizer_model / "1" / parameters["tokenizer"], results["vocab_size"],
                                 [int(i) for i in parameters["end_ids"].split(",")])
    say(f"mask: {results['mask']['mask_us_per_row']}")
    contents, _ = peers.make_contents(tokenizer_model / "1", max(args.requests, 3 * max(args.concurrency)) + 32,
                                      prompt_tokens=peers.PROMPT_TOKENS)
    served(repository, contents, args.concurrency, args.requests, results)
    report.save_run(results, args.out, markdown, plot)
    return 0


if __name__ == "__main__":  # pragma: no cover - tools/bench_structured.py is the entry point
    raise SystemExit("run tools/bench_structured.py")
