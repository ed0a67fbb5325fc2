"""The engine alone on SmolLM2-135M-Instruct, by weight format, against the machine's floors and transformers
(tools/bench_engine.py, `make bench-engine`).

For every --weights format (float32 on MindSpore's MatMul; bfloat16, int8, Q8_0, Q4_0 and Q4_1 on the CPU
kernels; Q4_1 and the Q8_0 head are the GGUF file's own blocks, Q4_0 and the others are converted from them):
- one decode step at batch 1 and 16 with 128 tokens cached, against its floor: the bytes the step must read (the
  weights in that format, the embedding table only where it is the LM head, plus the KV cache in use) over the read
  bandwidth measured in the same run;
- the prefill of one 512-token prompt, in GFLOP/s against the float32 FMA peak measured in the same run, and
  against transformers (PyTorch CPU, float32, same threads) on the same prompt and the same file.
Each time is the median of --repeats calls after warm-up. Prints the table and saves benchmarks/engine.md, .json
and .png.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GLOG_v", "3")

from bench.timing import median_time

FORMATS = ["float32", "bfloat16", "int8", "Q8_0", "Q4_0", "Q4_1"]
BATCHES = [1, 16]
CACHED = 128        # tokens in each sequence's cache during the decode steps
CACHE_BUCKET = 256  # the decode graphs' cache length
PROMPT = 512


def log(message: str) -> None:
    print(f"[bench-engine {time.strftime('%H:%M:%S')}] {message}", flush=True)


def decode_step_time(graphs, batch: int, repeats: int) -> float:
    from mstriton.engine.engine import Engine

    from mstriton.engine.engine import settle_heap

    engine = Engine(graphs, max_slots=batch)
    sequences, _ = engine.prefill_prompts([[1] * CACHED] * batch)
    settle_heap()  # as the served decode model does after its warm-up
    tokens = [5] * batch

    def step():  # a step appends to the cache: keep its length at CACHED + 1 so every step reads the same
        engine.decode(tokens)
        for sequence in sequences:
            sequence.computed = CACHED
            del sequence.tokens[CACHED:]

    seconds = median_time(step, 3, repeats)
    for sequence in sequences:
        engine.release(sequence)
    return seconds


def kv_bytes(config, batch: int) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (CACHED + 1) * 4 * batch


def prefill_flops(config, n_matrix_params: int, tokens: int) -> float:
    """2 flops per weight and token (the LM head once, at the last token), plus causal attention's two products."""
    c = config
    attention = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * tokens * (tokens + 1) / 2
    head = 2 * c.hidden_size * c.vocab_size
    return 2 * tokens * (n_matrix_params - c.hidden_size * c.vocab_size) + head + attention


def transformers_prefill(gguf: Path, prompt: list[int], repeats: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        # logits_to_keep=1: the LM head at the last position only, as our prefill computes it
        return median_time(lambda: model(ids, logits_to_keep=1), 2, repeats)


def run(args) -> None:
    """args: tools/bench_engine.py's options."""

    from mstriton import kernels
    from mstriton.kernels import activations
    from bench import report
    from mstriton.engine.graphs import EngineGraphs, export_engine
    from mstriton.pretrained import smollm2_gguf
    from mstriton.sources import read_source

    gguf = smollm2_gguf()
    log(f"reading {gguf.name}")
    source = read_source(gguf, progress=lambda _: None)
    config = source.config
    threads = kernels.threads()
    log(f"kernels: {kernels.isa()}, {threads} threads; measuring the floors")
    bandwidth, peak, int8_peak = kernels.read_bandwidth(1 << 30, reps=5), kernels.fma_peak(), kernels.int8_peak()
    log(f"read bandwidth {bandwidth:.1f} GB/s, float32 FMA peak {peak:.0f} GFLOP/s, int8 multiply-add peak "
        f"{int8_peak:.0f} GMAC/s ({activations.int8_isa()})")
    n_params = int(sum(np.prod(w.shape) for n, w in source.weights.items() if n != "embed_tokens" and w.ndim == 2))
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, config.vocab_size - 100, PROMPT)]
    log(f"transformers prefill of {PROMPT} tokens")
    hf_prefill = transformers_prefill(gguf, prompt, max(3, args.repeats // 4), threads)
    log(f"transformers: {hf_prefill * 1e3:.0f} ms")

    rows = []
    with tempfile.TemporaryDirectory(prefix="mstriton-bench-engine-") as tmp:
        for fmt in args.formats:
            out = Path(tmp) / fmt
            log(f"{fmt}: exporting")
            export_engine(config, source.weights, out, dtype="float32", device="CPU", max_batch_size=max(BATCHES),
                          max_seq_len=1024, batches=BATCHES, seqs=[CACHE_BUCKET], prefill_chunk=0,
                          weights_format=fmt, blocks=source.blocks, block_types=source.block_types,
                          interleave_blocks=activations.activations() == "int8", progress=lambda _: None)
            graphs = EngineGraphs(out)
            weight_bytes = graphs.weight_bytes_per_step()
            row = {"format": fmt, "weight_mb": weight_bytes / 1e6}
            # The products' compute at 16 rows: one multiply-add per weight and row, at the int8 dot products' peak
            # where they run (int8 activations, block formats), else at the FMA peak.
            int8_products = activations.activations() == "int8" and fmt in activations.INT8_FORMATS
            row["compute_floor_b16_ms"] = 16 * n_params / ((int8_peak if int8_products else peak / 2) * 1e9) * 1e3
            for batch in BATCHES:
                seconds = decode_step_time(graphs, batch, args.repeats)
                floor = (weight_bytes + kv_bytes(config, batch)) / (bandwidth * 1e9)
                row[f"decode_b{batch}_ms"], row[f"floor_b{batch}_ms"] = seconds * 1e3, floor * 1e3
                log(f"{fmt}: decode batch {batch}: {seconds * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms "
                    f"({seconds / floor:.2f}x)")
            tokens = np.array([prompt], np.int32)
            seconds = median_time(lambda: graphs.prefill(tokens, np.array([PROMPT], np.int32)), 1,
                                  max(3, args.repeats // 4))
            flops = prefill_flops(config, n_params, PROMPT)
            row.update(prefill_ms=seconds * 1e3, prefill_gflops=flops / seconds / 1e9,
                       transformers_prefill_ms=hf_prefill * 1e3)
            log(f"{fmt}: prefill {PROMPT}: {seconds * 1e3:.0f} ms, {flops / seconds / 1e9:.0f} GFLOP/s "
                f"({flops / seconds / 1e9 / peak:.2f} of peak); transformers {hf_prefill * 1e3:.0f} ms")
            rows.append(row)
            del graphs

    result = {"date": datetime.date.today().isoformat(), "machine": report.machine_description(),
              "kernels": {"isa": kernels.isa(), "threads": threads, "activations": activations.activations()},
              "read_gb_s": bandwidth, "int8_isa": activations.int8_isa(), "int8_peak_gmacs": int8_peak,
              "fma_peak_gflops": peak, "cached_tokens": CACHED, "prompt_tokens": PROMPT, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render(result)
    print(text)
    report.write_atomically(out, text)
    report.write_atomically(out.with_suffix(".json"), json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    log(f"saved {out}, {out.with_suffix('.json').name}, {out.with_suffix('.png').name}")


def render(r: dict) -> str:
    peak, bw = r["fma_peak_gflops"], r["read_gb_s"]
    lines = [f"# Engine alone: SmolLM2-135M-Instruct by weight format ({r['date']})", "",
             f"Machine: {r['machine']}. Kernels: {r['kernels']['isa']}, {r['kernels']['threads']} threads, "
             f"{r['kernels'].get('activations', 'float32')} activations (MSTRITON_KERNEL_ACTIVATIONS).",
             f"Floors measured in the same run: read bandwidth {bw:.1f} GB/s (1 GiB buffer), float32 FMA peak "
             f"{peak:.0f} GFLOP/s" + (f", int8 multiply-add peak {r['int8_peak_gmacs']:.0f} GMAC/s "
                                      f"({r['int8_isa']} dot products)" if "int8_peak_gmacs" in r else "") + ".", "",
             f"Decode: one step with {r['cached_tokens']} tokens cached per sequence; floor = (weight bytes + KV "
             f"cache in use) / read bandwidth. Prefill: one {r['prompt_tokens']}-token prompt; transformers is "
             "PyTorch CPU float32 on the same file and prompt. b16 compute floor: the products' multiply-adds of 16 "
             "rows at the peak of the dot products that run them (int8 for the block formats with int8 "
             "activations, else float32 FMAs).", "",
             "| weights | MB read per step | decode b1 ms | floor b1 ms | b1 / floor | decode b16 ms | b16 / b1 "
             "| b16 compute floor ms | prefill ms | GFLOP/s | of peak | transformers prefill ms "
             "| ours / transformers |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        compute = row.get("compute_floor_b16_ms")
        lines.append(
            f"| {row['format']} | {row['weight_mb']:.0f} | {row['decode_b1_ms']:.2f} | {row['floor_b1_ms']:.2f} "
            f"| {row['decode_b1_ms'] / row['floor_b1_ms']:.2f} | {row['decode_b16_ms']:.2f} "
            f"| {row['decode_b16_ms'] / row['decode_b1_ms']:.2f} | {f'{compute:.2f}' if compute else '-'} "
            f"| {row['prefill_ms']:.0f} "
            f"| {row['prefill_gflops']:.0f} | {row['prefill_gflops'] / peak:.2f} "
            f"| {row['transformers_prefill_ms']:.0f} | {row['prefill_ms'] / row['transformers_prefill_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["format"] for row in r["rows"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(names))
    left.bar(x - 0.2, [row["decode_b1_ms"] for row in r["rows"]], 0.4, label="decode batch 1")
    left.bar(x + 0.2, [row["floor_b1_ms"] for row in r["rows"]], 0.4, label="floor (bytes / bandwidth)")
    left.set_xticks(x, names)
    left.set_ylabel("ms per step")
    left.legend()
    right.bar(x, [row["prefill_gflops"] for row in r["rows"]], 0.5, label="ours")
    right.axhline(r["fma_peak_gflops"] / 2, color="k", ls="--", label="half the FMA peak")
    right.set_xticks(x, names)
    right.set_ylabel(f"GFLOP/s, {r['prompt_tokens']}-token prefill")
    right.legend()
    fig.suptitle(f"SmolLM2-135M engine alone, {r['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

