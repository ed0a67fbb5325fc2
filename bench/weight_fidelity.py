"""How much each weight format changes SmolLM2-135M-Instruct's predictions, against float32 transformers
(tools/weight_fidelity.py).

For every --weights format the engine reads a held text (not in any training data of ours) teacher-forced, one
decode step per token, and is compared with transformers (PyTorch CPU, float32) on the same GGUF file: greedy
top-1 agreement (the share of positions where both pick the same next token), perplexity of the text under
each, and the largest logit difference. bfloat16 is also compared with transformers run in torch.bfloat16, the
precision the format stands for. Saves benchmarks/weight_fidelity.md and .json.

SmolLM2's file stores its layers as Q4_1 and its embeddings as Q8_0: the Q4_1 engine keeps those blocks (and
equals float32 up to rounding); the other formats are made from their dequantized values.

K-quant rows (Q4_K_M, Q5_K_M, Q6_K: the files people download): llama-quantize (bench/llamacpp.py,
build_quantize: the llama.cpp of the llama-cpp-python sdist llama-server is built from) makes each from SmolLM2's
file with --allow-requantize; that source is already Q4_1 / Q8_0, so these files quantize its dequantized values
again (a download made from the bfloat16 checkpoint would lose less). SmolLM2's rows are 576 wide, not a multiple
of the 256 values of a K-quant super-block, so llama-quantize stores only the 1536-wide ffn_down matrices as
K-quants and falls back to 32-value types for the rest (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0). Each file is
converted with --weights Q8_0 (its K-quant and Q8_0 blocks kept, its Q5_0 / Q5_1 matrices re-quantized to Q8_0)
and compared with the same float32 transformers reference as the other rows (the source file), and also with
transformers reading the K-quant file itself (the engine's own error on that file).
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

FORMATS = ["float32", "bfloat16", "int8", "Q8_0", "Q4_0", "Q4_1"]
# K-quant files made by llama-quantize from SmolLM2's file: the file type -> the --weights they are converted with
K_FILES = {"Q4_K_M": "Q8_0", "Q5_K_M": "Q8_0", "Q6_K": "Q8_0"}


def k_quant_file(kind: str, source: Path, folder: Path) -> Path:
    """SmolLM2's file re-quantized by llama-quantize as `kind` (Q4_K_M, ...), made once into `folder`."""
    import subprocess

    from bench import llamacpp

    out = folder / f"{source.stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if out.is_file():
        return out
    binary = llamacpp.build_quantize(progress=log)
    folder.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    done = subprocess.run([str(binary), "--allow-requantize", str(source), str(partial), kind, "2"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize {kind} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    partial.replace(out)
    return out
HELD_TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
             "father had taught him. From the gallery he could see the fishing boats returning to the harbour, "
             "their lanterns swinging with the swell. On clear nights the beam reached the far island, where a "
             "second keeper answered with three short flashes. Neither of them had ever met the other, yet each "
             "knew the rhythm of the other's lamp as well as his own heartbeat. When the storm of that winter cut "
             "the cable to the mainland, it was those flashes that told the village the island was still safe.")


def log(message: str) -> None:
    print(f"[weight-fidelity {time.strftime('%H:%M:%S')}] {message}", flush=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def engine_logits(graphs, ids: list[int]) -> np.ndarray:
    """Logits predicting ids[1:], teacher-forced: prefill of the first token, then one decode step per token."""
    from mstriton.engine.engine import Engine

    engine = Engine(graphs, max_slots=1)
    (sequence,), first = engine.prefill_prompts([ids[:1]])
    rows = [first[0]]
    for token in ids[1:-1]:
        rows.append(engine.decode([token])[0])
    engine.release(sequence)
    return np.stack(rows)


def compare(ours: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> dict:
    nll_ours = -log_softmax(ours.astype(np.float64))[np.arange(len(targets)), targets]
    nll_ref = -log_softmax(reference.astype(np.float64))[np.arange(len(targets)), targets]
    return {"top1_agreement": float((ours.argmax(-1) == reference.argmax(-1)).mean()),
            "perplexity": float(np.exp(nll_ours.mean())), "reference_perplexity": float(np.exp(nll_ref.mean())),
            "max_logit_diff": float(np.abs(ours - reference).max())}


def run(args) -> None:
    """args: tools/weight_fidelity.py's options."""

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench import report
    from mstriton.engine.graphs import EngineGraphs, export_engine
    from mstriton.pretrained import smollm2_gguf
    from mstriton.sources import read_source

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer(HELD_TEXT, add_special_tokens=False)["input_ids"]
    targets = np.array(ids[1:])
    log(f"held text: {len(ids)} tokens; transformers float32 and bfloat16")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0, :-1].numpy()
        reference_bf16 = model.to(torch.bfloat16)(torch.tensor([ids])).logits[0, :-1].float().numpy()
    source = read_source(gguf, progress=lambda _: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mstriton-fidelity-") as tmp:
        for fmt in args.formats:
            out = Path(tmp) / fmt
            export_engine(source.config, source.weights, out, dtype="float32", device="CPU", max_batch_size=1,
                          max_seq_len=256, batches=[1], seqs=[128], weights_format=fmt, blocks=source.blocks,
                          block_types=source.block_types, progress=lambda _: None)
            ours = engine_logits(EngineGraphs(out), ids)
            row = {"format": fmt, **compare(ours, reference, targets)}
            if fmt == "bfloat16":
                row["vs_torch_bfloat16"] = compare(ours, reference_bf16, targets)
            log(f"{fmt}: top-1 agreement {row['top1_agreement']:.3f}, perplexity {row['perplexity']:.3f} "
                f"(transformers float32 {row['reference_perplexity']:.3f}), max logit diff "
                f"{row['max_logit_diff']:.2e}")
            rows.append(row)
        for kind in getattr(args, "k_files", []):
            path = k_quant_file(kind, gguf, ROOT / "build" / "kquants")
            k_source = read_source(path, progress=lambda _: None)
            weights = K_FILES[kind]
            out = Path(tmp) / kind
            export_engine(k_source.config, k_source.weights, out, dtype="float32", device="CPU", max_batch_size=1,
                          max_seq_len=256, batches=[1], seqs=[128], weights_format=weights, blocks=k_source.blocks,
                          block_types=k_source.block_types, progress=lambda _: None)
            ours = engine_logits(EngineGraphs(out), ids)
            k_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
            with torch.no_grad():
                k_reference = k_model(torch.tensor([ids])).logits[0, :-1].numpy()
            counts: dict[str, int] = {}
            from gguf import GGUFReader
            for t in GGUFReader(str(path)).tensors:
                if len(t.shape) == 2:  # the matrices (norms are F32 vectors)
                    counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
            row = {"format": f"{kind} file, --weights {weights}", **compare(ours, reference, targets),
                   "vs_transformers_on_the_file": compare(ours, k_reference, targets),
                   "file_types": dict(sorted(counts.items())), "file_mb": round(path.stat().st_size / 1e6, 1)}
            log(f"{row['format']}: top-1 agreement {row['top1_agreement']:.3f}, perplexity {row['perplexity']:.3f}; "
                f"against transformers on the file: max logit diff "
                f"{row['vs_transformers_on_the_file']['max_logit_diff']:.2e}; types {row['file_types']}")
            rows.append(row)
    torch_bf16 = compare(reference_bf16, reference, targets)
    result = {"date": datetime.date.today().isoformat(), "tokens": len(ids), "rows": rows,
              "torch_bfloat16_vs_float32": torch_bf16}
    lines = [f"# Weight formats against float32 transformers: SmolLM2-135M-Instruct ({result['date']})", "",
             f"A held text of {len(ids)} tokens, teacher-forced through the engine (one decode step per token); "
             "the reference is transformers (PyTorch CPU, float32) on the same GGUF file.", "",
             "| weights | top-1 agreement | perplexity | float32 transformers' perplexity | max logit difference |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['format']} | {row['top1_agreement']:.3f} | {row['perplexity']:.3f} "
                     f"| {row['reference_perplexity']:.3f} | {row['max_logit_diff']:.2e} |")
    lines.append(f"| (transformers in torch.bfloat16) | {torch_bf16['top1_agreement']:.3f} "
                 f"| {torch_bf16['perplexity']:.3f} | {torch_bf16['reference_perplexity']:.3f} "
                 f"| {torch_bf16['max_logit_diff']:.2e} |")
    for row in rows:
        if "vs_torch_bfloat16" in row:
            v = row["vs_torch_bfloat16"]
            lines += ["", f"Our bfloat16 engine (bfloat16 weights, float32 activations) against transformers in "
                          f"torch.bfloat16: top-1 agreement {v['top1_agreement']:.3f}, max logit difference "
                          f"{v['max_logit_diff']:.2e}."]
    k_rows = [row for row in rows if "vs_transformers_on_the_file" in row]
    if k_rows:
        lines += ["", "The K-quant files (llama-quantize --allow-requantize from SmolLM2's Q4_1 / Q8_0 file: its "
                      "values quantized again) against transformers reading each file itself, and what they store "
                      "(matrices by type: SmolLM2's 576-wide rows are not whole 256-value super-blocks, so only "
                      "ffn_down is a K-quant; llama-quantize falls back to 32-value types for the rest):", "",
                  "| file | top-1 agreement | max logit difference | matrices by type | MB |", "|---|---|---|---|---|"]
        for row in k_rows:
            v = row["vs_transformers_on_the_file"]
            kinds = ", ".join(f"{n} {t}" for t, n in row["file_types"].items())
            lines.append(f"| {row['format']} | {v['top1_agreement']:.3f} | {v['max_logit_diff']:.2e} | {kinds} "
                         f"| {row['file_mb']} |")
    out = Path(args.out)
    text = "\n".join(lines) + "\n"
    print(text)
    report.write_atomically(out, text)
    report.write_atomically(out.with_suffix(".json"), json.dumps(result, indent=1))

