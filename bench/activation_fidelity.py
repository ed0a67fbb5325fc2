"""Fidelity of int8 activations (issue 27) beside float32 activations and beside llama.cpp, on the same GGUF file
(SmolLM2-135M-Instruct Q4_1, its embedding/LM head Q8_0) and the same text (weight_fidelity.HELD_TEXT), under
one protocol both sides follow exactly: llama.cpp's `llama-perplexity` (tools/activation_fidelity.py).

The protocol (llama-perplexity's, tools/perplexity/perplexity.cpp in the vendored llama.cpp):

- the text is tokenized once, with a BOS token in front only if the GGUF says so (tokenizer.ggml.add_bos_token;
  SmolLM2's file says false), and cut into n_chunk = len(tokens) // n_ctx chunks of n_ctx consecutive tokens
  (the rest is dropped);
- each chunk is evaluated from its own start, with an empty cache (its first token replaced by BOS if the file
  adds BOS);
- in each chunk, the logits at positions first = n_ctx // 2 .. n_ctx - 2 predict the tokens at first + 1 ..
  n_ctx - 1, and only those are scored: n_ctx - n_ctx // 2 - 1 tokens per chunk;
- perplexity = exp(mean negative log-likelihood over all scored tokens), and its +/- is llama.cpp's
  (perplexity times the standard error of the mean negative log-likelihood).

llama.cpp: `llama-perplexity -m FILE -f TEXT -c n_ctx -b n_ctx -t 2 -tb 2 --kl-divergence-base LOGITS`, built
from the same vendored source and cmake configuration as our llama-server peer (bench/llamacpp.py,
build_perplexity). -b n_ctx makes its batch exactly one chunk (one sequence per llama_decode; with the default
batch of 2048 it would pack 2048 // n_ctx chunks side by side as separate sequences). Its PPL is the "Final
estimate" it prints; --kl-divergence-base only makes it also save, for every scored position, the log-probabilities
of the whole vocabulary (as 16-bit steps over the 16 nats below the top logit), from which its top-1 token is read
(and its token ids, checked equal to ours). A second, diagnostic run adds -ctk f32 -ctv f32 -fa off (a float32
KV cache and no flash attention, closer to our attention): how far llama.cpp moves by itself.

Ours: the engine (the file's own Q4_1/Q8_0 blocks, --weights Q4_1) with teacher forcing token by token: each
chunk's first token is prefilled alone, every later token goes through a decode step (a product of one row, where
int8 activations apply: products of Q8_0/Q4_0/Q4_1 weights of at most 32 rows, mstriton/kernels/activations.py),
once with float32 activations and once with int8. Top-1 agreement is the share of scored positions where two
paths pick the same most likely next token.

Saves benchmarks/activation_fidelity.md and .json.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GLOG_v", "3")

MIN_CHUNKS = 4
THREADS = 2
MAX_N_CTX = 128  # the engine is exported with one KV length bucket of 128 tokens
# llama-perplexity runs: its defaults (KV cache float16, flash attention auto), and a diagnostic one whose
# attention is closer to ours (float32 KV cache, no flash attention): how much llama.cpp moves by itself
LLAMACPP_RUNS = {"llamacpp": (), "llamacpp-f32kv": ("-ctk", "f32", "-ctv", "f32", "-fa", "off")}


def log(message: str) -> None:
    print(f"[activation-fidelity {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The protocol

def make_chunks(tokens: list[int], n_ctx: int, add_bos: bool, bos_id: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: len(tokens) // n_ctx runs of n_ctx tokens, the first replaced by BOS if the
    file adds BOS (`tokens` already has the BOS its tokenizer puts in front)."""
    chunks = []
    for i in range(len(tokens) // n_ctx):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            chunk[0] = bos_id
        chunks.append(chunk)
    return chunks


def scored_positions(n_ctx: int) -> range:
    """Positions whose logits are scored: each predicts the token after it."""
    return range(n_ctx // 2, n_ctx - 1)


def summary(nll: np.ndarray) -> dict:
    """Perplexity and llama.cpp's +/- (perplexity times the standard error of the mean NLL)."""
    mean = float(nll.mean())
    ppl = float(np.exp(mean))
    var = float((nll ** 2).mean() - mean ** 2)
    err = float(np.sqrt(var / (len(nll) - 1))) * ppl if var > 0 and len(nll) > 1 else float("nan")
    return {"perplexity": ppl, "perplexity_error": err, "mean_nll": mean}


def gguf_bos(gguf: Path) -> tuple[bool | None, int | None]:
    """The file's tokenizer.ggml.add_bos_token (None if absent) and tokenizer.ggml.bos_token_id."""
    import gguf as gguf_py

    fields = gguf_py.GGUFReader(gguf).fields

    def value(key):
        field = fields.get(key)
        return None if field is None or not field.data else field.parts[field.data[0]][0].item()

    add = value("tokenizer.ggml.add_bos_token")
    bos = value("tokenizer.ggml.bos_token_id")
    return (None if add is None else bool(add)), (None if bos is None else int(bos))


# ---------------------------------------------------------------------------------------------------------------
# Ours

def ours(graphs, chunks: list[list[int]], mode: str) -> dict:
    """NLL and top-1 token at every scored position, chunk after chunk, with `mode` activations."""
    from mstriton.kernels import activations

    from .weight_fidelity import engine_logits, log_softmax

    activations.set_activations(mode)
    try:
        nll, top, margin = [], [], []  # margin: the top logit minus the second
        for chunk in chunks:
            logits = engine_logits(graphs, chunk)  # row j predicts chunk[j + 1]
            rows = list(scored_positions(len(chunk)))
            logp = log_softmax(logits[rows].astype(np.float64))
            nll.append(-logp[np.arange(len(rows)), [chunk[j + 1] for j in rows]])
            top.append(logits[rows].argmax(-1))
            best2 = np.sort(logits[rows], -1)[:, -2:]
            margin.append(best2[:, 1] - best2[:, 0])
    finally:
        activations.set_activations("float32")
    return {"nll": np.concatenate(nll), "top1": np.concatenate(top), "margin": np.concatenate(margin)}


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp

def read_logits_file(path: Path) -> dict:
    """llama-perplexity's --kl-divergence-base file: "_logits_", n_ctx, n_vocab, n_chunk (int32), the tokens
    (n_chunk * n_ctx int32), then for each scored position n_vocab + 4 (rounded up to even) uint16: two float32
    (scale, min_log_prob) and log p = scale * q + min_log_prob per token (q = 0: 16 nats or more below the top)."""
    data = path.read_bytes()
    if data[:8] != b"_logits_":
        raise ValueError(f"{path} is no llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(data, np.int32, 3, 8))
    offset = 8 + 12
    tokens = np.frombuffer(data, np.int32, n_chunk * n_ctx, offset)
    offset += tokens.nbytes
    nv = 2 * ((n_vocab + 1) // 2) + 4
    per_chunk = n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(data, np.uint16, n_chunk * per_chunk * nv, offset).reshape(n_chunk * per_chunk, nv)
    head = rows[:, :4].copy().view(np.float32)  # [rows, 2]: scale, min_log_prob
    q = rows[:, 4:4 + n_vocab]
    targets = tokens.reshape(n_chunk, n_ctx)[:, n_ctx // 2 + 1:].reshape(-1)
    logp_target = head[:, 0].astype(np.float64) * q[np.arange(len(q)), targets] + head[:, 1]
    return {"n_ctx": n_ctx, "n_vocab": n_vocab, "n_chunk": n_chunk, "tokens": tokens.tolist(),
            "top1": q.argmax(-1), "nll": -logp_target}


def run_llamacpp(binary: Path, gguf: Path, text: str, n_ctx: int, workdir: Path, extra_args: tuple = (),
                 tag: str = "llamacpp") -> dict:
    """llama-perplexity on `text` (written to a file as it is) under the protocol, with `extra_args` after ours;
    its printed final estimate, its per-position top-1 tokens and NLLs (from the logits file), its token ids,
    and its output (also in workdir/<tag>.log)."""
    text_path, logits_path, log_path = workdir / "text.txt", workdir / f"{tag}.logits", workdir / f"{tag}.log"
    text_path.write_text(text)
    cmd = [str(binary), "-m", str(gguf), "-f", str(text_path), "-c", str(n_ctx), "-b", str(n_ctx),
           "-t", str(THREADS), "-tb", str(THREADS), "--kl-divergence-base", str(logits_path), *extra_args]
    log("$ " + " ".join(cmd))
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    output = done.stdout + done.stderr
    log_path.write_text(output)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", output)
    if done.returncode != 0 or m is None:
        raise RuntimeError(f"llama-perplexity failed (exit {done.returncode}):\n"
                           + "\n".join(output.splitlines()[-25:]))
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", output)
    system = re.search(r"system_info: (.*)", output)
    saved = read_logits_file(logits_path)
    log(f"llama.cpp: PPL {m.group(1)} +/- {m.group(2)} in {time.monotonic() - began:.1f} s")
    return {"command": cmd, "output": output, "perplexity": float(m.group(1)), "perplexity_error": float(m.group(2)),
            "chunks_line": chunks.group(0) if chunks else None, "system_info": system.group(1) if system else None,
            **saved}


# ---------------------------------------------------------------------------------------------------------------
# The run

def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def run(args) -> None:
    """args: tools/activation_fidelity.py's options (n_ctx, out, llamacpp_cache_dir)."""
    from transformers import AutoTokenizer

    from bench import llamacpp, report
    from bench.harness import processes
    from bench.weight_fidelity import HELD_TEXT
    from mstriton.engine.graphs import EngineGraphs, export_engine
    from mstriton.kernels import activations
    from mstriton.pretrained import smollm2_gguf
    from mstriton.sources import read_source

    gguf = smollm2_gguf()
    add_bos, bos_id = gguf_bos(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text_files = [Path(f) for f in (args.text or [])]
    text = "\n\n".join(f.read_text() for f in text_files) if text_files else HELD_TEXT
    text_name = ", ".join(str(f) for f in text_files) if text_files else "bench.weight_fidelity.HELD_TEXT"
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos:
        tokens = [bos_id] + tokens
    n_ctx = args.n_ctx or min(MAX_N_CTX, len(tokens) // MIN_CHUNKS)
    if not 4 <= n_ctx <= MAX_N_CTX or len(tokens) < 2 * n_ctx:
        raise SystemExit(f"n_ctx {n_ctx}: needs 4 <= n_ctx <= {MAX_N_CTX} and at least two chunks of the "
                         f"{len(tokens)} tokens")
    chunks = make_chunks(tokens, n_ctx, bool(add_bos), bos_id)
    per_chunk = len(scored_positions(n_ctx))
    log(f"{gguf.name}: add_bos_token={add_bos}; held text {len(tokens)} tokens; n_ctx {n_ctx}: {len(chunks)} "
        f"chunks, {per_chunk} scored each ({len(chunks) * per_chunk} in all)")

    binary = llamacpp.build_perplexity(Path(args.llamacpp_cache_dir), progress=log)
    with tempfile.TemporaryDirectory(prefix="mstriton-actfid-") as tmp:
        peers, token_note = {}, None
        for tag, extra in LLAMACPP_RUNS.items():
            peers[tag] = run_llamacpp(binary, gguf, text, n_ctx, Path(tmp), extra, tag)
            scored = peers[tag]["tokens"]
            if scored != tokens[:len(chunks) * n_ctx]:
                # Its tokenizer splits some texts (markdown, code) unlike transformers': score the token ids it
                # scored, on both sides, so the rows stay comparable.
                if token_note is None:
                    differing = sum(a != b for a, b in zip(scored, tokens)) + abs(len(scored) - len(tokens[:len(scored)]))
                    token_note = (f"llama.cpp tokenizes this text unlike transformers ({differing} of the first "
                                  f"{len(scored)} token ids differ): both sides score llama.cpp's token ids")
                    log(token_note)
                    tokens = scored + tokens[len(scored):]
                    chunks = make_chunks(scored, n_ctx, False, bos_id)
                elif scored != tokens[:len(chunks) * n_ctx]:
                    raise AssertionError("llama.cpp's runs scored different tokens")
            if peers[tag]["n_chunk"] != len(chunks) or peers[tag]["n_ctx"] != n_ctx:
                raise AssertionError(f"llama.cpp ran {peers[tag]['n_chunk']} chunks of {peers[tag]['n_ctx']}")

        log("exporting the engine (--weights Q4_1: the file's own Q4_1/Q8_0 blocks)")
        source = read_source(gguf, progress=lambda _: None)
        out = Path(tmp) / "engine"
        export_engine(source.config, source.weights, out, dtype="float32", device="CPU", max_batch_size=1,
                      max_seq_len=256, batches=[1], seqs=[MAX_N_CTX], weights_format="Q4_1",
                      blocks=source.blocks, block_types=source.block_types, progress=lambda _: None)
        graphs = EngineGraphs(out)
        results = {}
        for mode in activations.MODES:
            began = time.monotonic()
            results[mode] = ours(graphs, chunks, mode)
            s = summary(results[mode]["nll"])
            log(f"ours, {mode} activations: PPL {s['perplexity']:.4f} +/- {s['perplexity_error']:.4f} in "
                f"{time.monotonic() - began:.1f} s")
        int8_isa = activations.int8_isa()

    f32, theirs = results["float32"], peers["llamacpp"]
    rows = []
    for name, path, res in (("ours, float32 activations", "ours-float32", f32),
                            ("ours, int8 activations", "ours-int8", results["int8"]),
                            ("llama.cpp (same file)", "llamacpp", theirs),
                            ("llama.cpp, float32 KV cache, flash attention off", "llamacpp-f32kv",
                             peers["llamacpp-f32kv"])):
        ppl = ({"perplexity": res["perplexity"], "perplexity_error": res["perplexity_error"],
                "mean_nll": float(np.mean(res["nll"]))} if "perplexity" in res else summary(res["nll"]))
        differ = np.flatnonzero(res["top1"] != f32["top1"])
        row = {"name": name, "path": path, **ppl,
               "perplexity_from_scored_nll": float(np.exp(np.mean(res["nll"]))),
               "top1_agreement_with_ours_float32": agreement(res["top1"], f32["top1"]),
               "top1_agreement_with_llamacpp": agreement(res["top1"], theirs["top1"]),
               "mean_abs_nll_diff_from_ours_float32": float(np.abs(res["nll"] - f32["nll"]).mean()),
               "n_ctx": n_ctx, "chunks": len(chunks), "tokens_scored": int(len(res["nll"])),
               "positions_differing_from_ours_float32": differ.tolist(),
               "ours_float32_top_margin_there": [round(float(f32["margin"][i]), 4) for i in differ],
               "scored_top1": np.asarray(res["top1"]).tolist(),
               "scored_nll": [round(float(v), 5) for v in res["nll"]]}
        if "command" in res:
            row["command"] = " ".join(Path(c).name if c.startswith("/") else c for c in res["command"])
        rows.append(row)
    result = {"date": datetime.date.today().isoformat(), "gguf": gguf.name, "add_bos_token": add_bos,
              "text": text_name, "token_note": token_note, "text_tokens": len(tokens), "n_ctx": n_ctx, "chunks": len(chunks), "scored_per_chunk": per_chunk,
              "cpu": processes.cpu_model(), "machine": report.machine_description(), "int8_isa": int8_isa,
              "ours_float32_top_margin": [round(float(v), 4) for v in f32["margin"]],
              "llamacpp_version": llamacpp.LLAMA_CPP_PYTHON_VERSION, "llamacpp_chunks_line": theirs["chunks_line"],
              "llamacpp_system_info": theirs["system_info"], "rows": rows}
    text = render(result)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report.write_atomically(out, text)
    report.write_atomically(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    log(f"saved {out} and {out.with_suffix('.json')}")
    if args.llamacpp_log:
        Path(args.llamacpp_log).write_text(theirs["output"])


def render(result: dict) -> str:
    n_ctx, chunks, per = result["n_ctx"], result["chunks"], result["scored_per_chunk"]
    rows = {row["path"]: row for row in result["rows"]}
    bos = {True: "a BOS token at each chunk's start", False: "no BOS token (the file's tokenizer.ggml.add_bos_token "
           "is false)", None: "no BOS token (the file has no tokenizer.ggml.add_bos_token)"}[result["add_bos_token"]]
    lines = [f"# int8 activations beside float32 and llama.cpp: SmolLM2-135M-Instruct Q4_1 ({result['date']})", "",
             f"Machine: {result['machine']}. File: {result['gguf']} (layers Q4_1, embedding and LM head Q8_0). "
             f"Text: {result.get('text', 'bench.weight_fidelity.HELD_TEXT')}, {result['text_tokens']} tokens. Made by "
             "`python tools/activation_fidelity.py` (bench/activation_fidelity.py)."
             + (f" {result['token_note']}." if result.get("token_note") else ""), "",
             f"Protocol (llama-perplexity's, followed exactly on both sides): the tokenized text cut into {chunks} "
             f"chunks of n_ctx = {n_ctx} consecutive tokens, {bos}; each chunk evaluated from its own start with an empty cache; the logits at "
             f"positions {n_ctx // 2}..{n_ctx - 2} of each chunk score the next token ({per} per chunk, "
             f"{chunks * per} in all); perplexity = exp(mean negative log-likelihood of the scored tokens), "
             "+/- as llama.cpp prints it (perplexity times the standard error of the mean).", "",
             f"llama.cpp: `{rows['llamacpp']['command']}` (llama.cpp vendored in llama-cpp-python "
             f"{result['llamacpp_version']}, built as our llama-server peer: this CPU's instruction sets without "
             "AMX), its printed final estimate. -b n_ctx keeps its batch to one chunk; each chunk is one batch of "
             "n_ctx tokens, whose Q4_1 and Q8_0 products quantize the activations to 8 bits (Q8_1/Q8_0 blocks of "
             "32); its KV cache is float16 and flash attention is on auto (its defaults). Its top-1 tokens and "
             "per-token NLLs come from the log-probabilities --kl-divergence-base saves; its token ids equal ours. "
             "The last row, a diagnostic, adds `-ctk f32 -ctv f32 -fa off`.", "",
             "Ours: the engine on the same file (--weights Q4_1: its own Q4_1 and Q8_0 blocks), teacher-forced: "
             "each chunk's first token prefilled alone, every later token (all the scored ones) one decode step, "
             "where int8 activations apply (products of Q8_0/Q4_0/Q4_1 weights with at most 32 rows; int8 dot "
             f"products: {result['int8_isa']}); the KV cache float32.", "",
             "| path | perplexity | top-1 agreement with ours, float32 | top-1 agreement with llama.cpp "
             "| mean abs NLL difference from ours, float32 | n_ctx | chunks | tokens scored |",
             "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | {row['perplexity']:.4f} +/- {row['perplexity_error']:.4f} "
                     f"| {row['top1_agreement_with_ours_float32']:.3f} | {row['top1_agreement_with_llamacpp']:.3f} "
                     f"| {row['mean_abs_nll_diff_from_ours_float32']:.4f} | {row['n_ctx']} | {row['chunks']} "
                     f"| {row['tokens_scored']} |")
    margins = result["ours_float32_top_margin"]
    lines += ["", f"Top-1 agreement counts positions out of {chunks * per}: one position is "
                  f"{1 / (chunks * per):.4f}. The NLL differences are per scored token, paired; llama.cpp's come "
                  "from its saved log-probabilities (16-bit steps of at most 16/65535 nat). Where a row's top-1 "
                  "differs from ours with float32 activations, the gap between our float32 path's two best logits "
                  f"(median over all scored positions: {float(np.median(margins)):.2f}; the positions are in the "
                  ".json):", ""]
    for row in result["rows"][1:]:
        gaps = np.asarray(row["ours_float32_top_margin_there"], dtype=float)
        where = (f"{len(gaps)} positions, gap median {np.median(gaps):.3f}, largest {gaps.max():.3f}"
                 if len(gaps) else "none")
        lines.append(f"- {row['name']}: {where}")
    return "\n".join(lines) + "\n"
