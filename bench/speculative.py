"""Speculative decoding by n-gram lookup (tools/bench_speculative.py, `make bench-speculative`; issue 29), in one run:

- served: SmolLM2 as `make run` serves it (python -m mstriton.serve; Q4_1 blocks, int8 activations), its decode
  model converted with speculation on (`speculative: ngram`), the prefix cache off. Speculation off is the same
  server with each request's `speculative: false`: A and B alternate in one process, A B then B A;
- input-grounded: each request carries a text of about TEXT_TOKENS tokens (paragraphs of this project's own docs)
  and asks for it rewritten, greedy, at c = 1: output tokens/s with speculation against without (target >= 2x);
- free chat: the prompts of bench-peers (words of the demo corpus, 128 tokens), 128 output tokens each (min_tokens),
  greedy, at c = 1, 4, 16 (target >= 0.95x);
- llama.cpp's llama-server on the same GGUF file with its own n-gram speculation (LLAMACPP_NGRAM) and without,
  through the same streaming chat client: the input-grounded point, and free chat at each concurrency.

The machine's floors (read bandwidth, FMA and int8 peaks) are measured first, in the same run (bench.peers.floors).
The decode model's drafted and accepted token counters (vllm:spec_decode_*) are read from the metrics port around
each point. Writes STEM.md, STEM.json and STEM.png (default benchmarks/speculative).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench import frontend, peers, report
from bench.kv_cache import set_decode_parameters

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "bench_speculative"
TEXT_TOKENS = 500
GROUNDED_OUTPUT = 700   # the rewrite ends by itself before this
FREE_OUTPUT = 128
ROUNDS = 2
INSTRUCTION = ("Rewrite the following text. Keep every sentence, with the same words in the same order; change "
               "nothing.\n\n")
# llama-server's n-gram speculation without a draft model (this llama.cpp's --spec-type; no per-request control).
# Its defaults (12-token lookups, 48-token drafts) were slower than none on a rewrite of this kind; 4 and 16 were
# the best of the settings tried here (1.37x its plain generation rate, 58% of drafts accepted).
LLAMACPP_NGRAM = ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4", "--spec-ngram-simple-size-m", "16"]
SPEC_COUNTERS = ("vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total")


def say(message: str) -> None:
    print(f"[bench-speculative {time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


STARTED = time.monotonic()


def doc_texts(count_tokens, count: int, tokens: int = TEXT_TOKENS) -> list[str]:
    """`count` texts of about `tokens` tokens each: prose paragraphs of this project's docs (no code, no tables,
    no lists), in file order, each text from consecutive paragraphs."""
    paragraphs = []
    for path in sorted((ROOT / "docs").glob("*.md")):
        inside_code = False
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            if block.count("```") % 2:
                inside_code = not inside_code
                continue
            text = " ".join(block.split())
            if inside_code or not text or text[0] in "#|-*>`0123456789" or len(text) < 200:
                continue
            paragraphs.append(text)
    texts, current = [], []
    for paragraph in paragraphs:
        if count_tokens("\n\n".join(current + [paragraph])) > tokens * 1.2:
            continue  # it would overshoot: the next one may fit
        current.append(paragraph)
        if count_tokens("\n\n".join(current)) >= tokens * 0.9:
            texts.append("\n\n".join(current))
            current = []
            if len(texts) == count:
                break
    if len(texts) < count:
        raise RuntimeError(f"docs/ gave {len(texts)} texts of {tokens} tokens, {count} wanted")
    return texts


def grounded_bodies(texts: list[str], speculative: bool | None) -> list[dict]:
    bodies = []
    for text in texts:
        body = peers.base_body(INSTRUCTION + text, GROUNDED_OUTPUT)
        if speculative is not None:  # ours; llama-server gets the plain body
            body["speculative"] = speculative
        bodies.append(body)
    return bodies


def free_bodies(contents: list[str], kind: str, speculative: bool | None = None) -> list[dict]:
    bodies = [{**peers.base_body(c, FREE_OUTPUT), **peers.SYSTEM_FIELDS[kind](FREE_OUTPUT)} for c in contents]
    if speculative is not None:
        for body in bodies:
            body["speculative"] = speculative
    return bodies


def spec_counters(metrics_port: int) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = []
    for name in SPEC_COUNTERS:
        values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.eE+-]+)$", text,
                                                           re.M)]
        found.append(sum(values))
    return found[0], found[1]


def point(results: dict, system: str, key: str, value: dict, counters=None) -> None:
    if counters is not None:
        drafted, accepted = counters
        value["drafted_tokens"], value["accepted_tokens"] = drafted, accepted
        value["acceptance"] = accepted / drafted if drafted else None
    results["points"].setdefault(system, {}).setdefault(key, []).append(value)
    extra = f", drafted {counters[0]:.0f}, accepted {counters[1]:.0f}" if counters else ""
    say(f"{system} {key}: {value['output_tokens_per_s']:.1f} output tok/s, ITL p50 {value['itl_p50_ms']:.1f} ms, "
        f"TTFT p50 {value['ttft_p50_ms']:.0f} ms{extra}")
    report.write_atomically(BUILD / "results.json", json.dumps(results, indent=1))


def served(repository: Path, texts: list[str], contents: list[str], concurrencies: list[int], requests: int,
           results: dict) -> None:
    from bench.harness.servers import ServeProcess

    log = BUILD / "serve.log"
    say(f"starting python -m mstriton.serve on {repository} (log {log}; it compiles its graphs first: minutes)")
    server = ServeProcess(repository, log)
    try:
        server.wait_ready(timeout=1800)
        port, metrics = server.ports.frontend, server.ports.metrics

        def measured(system, key, bodies, warm, c, output):
            before = spec_counters(metrics)
            value = peers.measure(port, bodies, warm, c, output)
            after = spec_counters(metrics)
            point(results, system, key, value, (after[0] - before[0], after[1] - before[1]))

        for round_ in range(ROUNDS):
            for on in (True, False) if round_ % 2 == 0 else (False, True):
                system = "mstriton-ngram" if on else "mstriton"
                measured(system, "grounded c=1", grounded_bodies(texts[1:], on), grounded_bodies(texts[:1], on), 1,
                         GROUNDED_OUTPUT)
        for c in concurrencies:
            n = max(requests, 3 * c)
            for round_ in range(ROUNDS):
                for on in (True, False) if round_ % 2 == 0 else (False, True):
                    system = "mstriton-ngram" if on else "mstriton"
                    measured(system, f"free c={c}", free_bodies(contents[:n], "ours", on),
                             free_bodies(contents[-max(2, c):], "ours", on), c, FREE_OUTPUT)
    finally:
        say(f"server stopped ({server.stop()})")


def llamacpp_points(gguf: Path, texts: list[str], contents: list[str], concurrencies: list[int], requests: int,
                    max_seq_len: int, results: dict) -> None:
    import shlex
    import subprocess

    from bench import aiperf, llamacpp

    binary = llamacpp.build_server(ROOT / "build" / "llamacpp", say)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    results["versions"]["llama.cpp"] = " ".join((version.stdout + version.stderr).split("\n")[0].split()) + \
        f" (vendored in llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION})"
    slots = max(concurrencies)
    for system, extra in (("llamacpp-ngram", LLAMACPP_NGRAM), ("llamacpp", [])):
        with llamacpp.LlamaCppServer(binary, gguf, parallel=slots, ctx_per_slot=max_seq_len, threads=peers.cores(),
                                     log_path=BUILD / f"{system}.log", extra_args=extra) as server:
            results["commands"][system] = shlex.join(map(aiperf.shown_path, server.command(server.port)))
            say(f"{system}: llama-server ready at {server.url}")
            no_cache = peers.SYSTEM_FIELDS["llamacpp"](0)
            no_cache.pop("ignore_eos")  # the rewrite ends by itself, as ours does
            grounded = [{**b, **no_cache} for b in grounded_bodies(texts, None)]
            point(results, system, "grounded c=1", peers.measure(server.port, grounded[1:], grounded[:1], 1,
                                                                 GROUNDED_OUTPUT))
            for c in concurrencies:
                n = max(requests, 3 * c)
                point(results, system, f"free c={c}", peers.measure(
                    server.port, free_bodies(contents[:n], "llamacpp"), free_bodies(contents[-max(2, c):], "llamacpp"),
                    c, FREE_OUTPUT))


def mean_rate(results: dict, system: str, key: str) -> float | None:
    rounds = results["points"].get(system, {}).get(key, [])
    return float(np.mean([r["output_tokens_per_s"] for r in rounds])) if rounds else None


def markdown(results: dict) -> str:
    f = results["floors"]
    keys = list(results["points"].get("mstriton", {}))
    lines = ["# Speculative decoding by n-gram lookup (SmolLM2, greedy)", "",
             f"{results['date']} on {results['machine']}. One run: `{results['command']}`.", "",
             f"Floors measured in the same run: read bandwidth {max(f['read_bandwidth_gbs'].values()):.1f} GB/s, "
             f"float32 FMA peak {f['fma_peak_gflops']} GFLOP/s, int8 peak {f['int8_peak_gmacs']} G multiply-adds/s "
             f"({f['int8_isa']}), decode floor {f['decode_floor_ms']} ms a token at one stream.", "",
             f"`grounded`: a text of about {TEXT_TOKENS} tokens (this project's docs) rewritten word for word, "
             f"{len(results['texts'])} texts, one at a time. `free`: bench-peers' prompts, {FREE_OUTPUT} output tokens "
             "each. Ours with and without speculation alternate in one server (A B, then B A; the prefix cache off); "
             "output tokens/s, the mean of the rounds, and the ratio of the means.", "",
             "The ratio is of whole requests' output tokens/s (the prompt's prefill included); the ITL ratio is "
             "of the inter-token latency's medians (decode alone, several tokens per step where drafts held).", "",
             "| point | mstriton | mstriton-ngram | ratio (target) | ITL p50 ratio | accepted / drafted | llamacpp | "
             "llamacpp-ngram | ngram: ours / llama.cpp |", "|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        plain, spec = mean_rate(results, "mstriton", key), mean_rate(results, "mstriton-ngram", key)
        lc, lc_spec = mean_rate(results, "llamacpp", key), mean_rate(results, "llamacpp-ngram", key)
        rounds = results["points"].get("mstriton-ngram", {}).get(key, [])
        drafted = sum(r.get("drafted_tokens") or 0 for r in rounds)
        accepted = sum(r.get("accepted_tokens") or 0 for r in rounds)
        target = "2" if key.startswith("grounded") else "0.95"
        fmt = lambda v: f"{v:.1f}" if v is not None else "not run"  # noqa: E731
        itl = [np.mean([r["itl_p50_ms"] for r in results["points"][s][key]]) for s in ("mstriton", "mstriton-ngram")]
        drafts = f"{accepted:.0f} / {drafted:.0f} ({accepted / drafted:.0%})" if drafted else "none drafted"
        versus = f"{spec / lc_spec:.2f}x" if lc_spec else "not run"
        lines.append(f"| {key} | {fmt(plain)} | {fmt(spec)} | **{spec / plain:.2f}x** ({target}) | "
                     f"{itl[0] / itl[1]:.2f}x | {drafts} | {fmt(lc)} | {fmt(lc_spec)} | {versus} |")
    lines += ["", "Per round (output tok/s):", "", "| system | point | rounds |", "|---|---|---|"]
    for system, points in results["points"].items():
        for key, rounds in points.items():
            rates = " / ".join(format(r["output_tokens_per_s"], ".1f") for r in rounds)
            lines.append(f"| {system} | {key} | {rates} |")
    lines += ["", "Commands:", ""] + [f"- {s}: `{c}`" for s, c in results["commands"].items()] + [""]
    if results.get("versions"):
        lines += ["Versions: " + "; ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    if results.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["points"].get("mstriton", {}))
    systems = [s for s in ("mstriton", "mstriton-ngram", "llamacpp", "llamacpp-ngram") if s in results["points"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(systems), 1)
    for k, system in enumerate(systems):
        values = [mean_rate(results, system, key) or 0.0 for key in keys]
        ax.bar(np.arange(len(keys)) + (k - (len(systems) - 1) / 2) * width, values, width, label=system)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("output tokens/s")
    ax.set_title("SmolLM2, n-gram speculation on and off")
    ax.legend(fontsize=8)
    return report.save_figure(fig, path)


def run(args, command: str) -> int:
    gguf, results = peers.smollm2_run(BUILD, say, command, commands={}, versions={})
    slots = max(16, max(args.concurrency))
    repository = frontend.model_repository(gguf, slots, args.max_seq_len, weights="Q4_1",
                                           repository=BUILD / "repo")
    set_decode_parameters(repository, "smollm2", ["speculative=ngram", "enable_prefix_caching=false",
                                                  f"num_speculative_tokens={args.tokens}",
                                                  f"speculative_max_rows={args.max_rows}"])
    tokenizer_dir = repository / "smollm2_tokenizer" / "1"
    tokenizer, count_chat = peers.chat_counter(tokenizer_dir)
    texts = doc_texts(lambda text: len(tokenizer.encode(text)), args.texts + 1)
    results["texts"] = [t[:80] + "..." for t in texts]
    results["settings"] = {"num_speculative_tokens": args.tokens, "speculative_max_rows": args.max_rows}
    contents, _ = peers.make_contents(tokenizer_dir, max(args.requests, 3 * max(args.concurrency)) + 16,
                                      prompt_tokens=peers.PROMPT_TOKENS)
    served(repository, texts, contents, args.concurrency, args.requests, results)
    if not args.no_llamacpp:
        try:
            llamacpp_points(gguf, texts, contents, args.concurrency, args.requests, args.max_seq_len, results)
        except Exception as exc:  # noqa: BLE001 - the peer did not build or start: the table says so
            results["notes"].append(f"llama.cpp: {type(exc).__name__}: {str(exc)[:300]}")
    report.save_run(results, args.out, markdown, plot)
    return 0


if __name__ == "__main__":  # pragma: no cover - tools/bench_speculative.py is the entry point
    raise SystemExit("run tools/bench_speculative.py")
