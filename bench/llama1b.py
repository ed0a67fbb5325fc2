"""A 1B-class LLaMA for the peers benchmark (issue 27: a model where memory bandwidth rules): random weights in
Llama-3.2-1B's shape (SHAPE: hidden 2048, 16 layers, 32 query heads and 8 KV heads of 64, MLP 8192, tied
embeddings, RoPE theta 500000 without Llama 3's frequency scaling), with the vocabulary, tokenizer and chat template
of SmolLM2-135M-Instruct (49152 tokens), so that every server tokenizes the prompts the same way and the peers
benchmark's prompts are those of SmolLM2. Its greedy output is noise; the benchmark fixes the output lengths.

Made once under build/llama1b/ (make(); `python -m bench.llama1b [--check]`), each file kept while its stamp says
it was made with the same settings:
- hf/: a Hugging Face folder (LlamaForCausalLM, transformers' own initialisation, std 0.02, after
  torch.manual_seed(SEED), saved in bfloat16 safetensors) with SmolLM2's tokenizer files as transformers reads
  them from the project's SmolLM2 GGUF file (mstriton.pretrained.smollm2_gguf); stamp hf/bench_model.json;
- llama1b-q8_0.gguf and llama1b-bf16.gguf: that folder converted by llama.cpp's own convert_hf_to_gguf.py with
  --outtype q8_0 / bf16, from the llama.cpp tree llama-server is built from (bench.llamacpp.fetch_source, build/
  llamacpp) and that tree's gguf-py; stamps <file>.stamp.json.
--check loads the folder with transformers (one forward pass, finite logits) and serves the Q8_0 file with
llama-server (bench.llamacpp) for one chat request.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "llama1b"
NAME = "llama1b"
LABEL = "a random LLaMA in Llama-3.2-1B's shape with SmolLM2's vocabulary"
SEED = 0
# Llama-3.2-1B's shape; the vocabulary is SmolLM2's (its special token ids are set from SmolLM2's tokenizer)
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
             rope_theta=500000.0, tie_word_embeddings=True, initializer_range=0.02)
VOCAB_SIZE = 49152
GGUF_TYPES = ("q8_0", "bf16")


def _say(message: str) -> None:
    print(f"[llama1b] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class Files:
    hf_folder: Path
    ggufs: dict  # llama.cpp type ("q8_0", "bf16") -> the GGUF file

    def gguf(self, dtype: str) -> Path:
        return self.ggufs[dtype]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def hf_folder(build: Path = BUILD, progress=_say) -> Path:
    """build/hf: the random model as a Hugging Face folder, unless it holds one made with the same settings."""
    import torch
    import transformers

    from mstriton.pretrained import smollm2_gguf

    folder = build / "hf"
    source = smollm2_gguf()
    wanted = {"shape": SHAPE, "vocab_size": VOCAB_SIZE, "seed": SEED, "dtype": "bfloat16",
              "tokenizer_from": source.name, "tokenizer_bytes": source.stat().st_size,
              "transformers": transformers.__version__, "torch": torch.__version__}
    if _read_json(folder / "bench_model.json") == wanted and any(folder.glob("*.safetensors")):
        return folder
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    progress(f"making {folder}: SmolLM2's tokenizer from {source.name}")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"SmolLM2's tokenizer has {len(tokenizer)} tokens, not {VOCAB_SIZE}")
    config = LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE)
    progress(f"initialising LlamaForCausalLM ({SHAPE['num_hidden_layers']} layers of {SHAPE['hidden_size']}, "
             f"vocabulary {VOCAB_SIZE}; seed {SEED}, float32, about 4.3 GB; a minute or two)")
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    count = sum(p.numel() for p in model.parameters())
    progress(f"{count / 1e9:.3f} B parameters (embeddings tied) in {time.monotonic() - started:.0f} s; "
             "casting to bfloat16")
    model = model.to(torch.bfloat16)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    progress(f"saving bfloat16 safetensors to {staging}")
    model.save_pretrained(staging, safe_serialization=True)
    del model
    tokenizer.save_pretrained(staging)
    (staging / "bench_model.json").write_text(json.dumps(wanted))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    progress(f"{folder}: {folder_bytes(folder) / 1e9:.2f} GB in {time.monotonic() - started:.0f} s")
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _relay(proc: subprocess.Popen, progress, every: float = 15.0) -> list[str]:
    """The converter's output lines (tqdm's '\\r' updates too), shown as progress: its own log lines but one per
    layer, and its progress bar at most every `every` seconds; all of them returned."""
    lines, layer, shown = [], None, 0.0
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        if not line:
            continue
        lines.append(line)
        tensor = re.match(r"INFO:hf-to-gguf:blk\.(\d+)\.", line)
        if tensor:
            if tensor.group(1) != layer:
                layer = tensor.group(1)
                progress(f"  layer {layer}: {line.split(':', 2)[-1]}")
        elif "%" in line and "|" in line:  # tqdm's bar while writing
            if time.monotonic() - shown >= every:
                shown = time.monotonic()
                progress("  " + line.strip())
        elif line.startswith(("INFO:", "WARNING:", "ERROR:")) and "hf-to-gguf:" in line:
            progress("  " + line.split(":", 2)[-1].strip())
    return lines


def gguf_file(hf: Path, dtype: str, build: Path = BUILD, progress=_say) -> Path:
    """build/llama1b-DTYPE.gguf: `hf` by llama.cpp's convert_hf_to_gguf.py --outtype DTYPE, unless its stamp says
    it was made from the same folder by the same llama.cpp."""
    from bench import llamacpp

    out = build / f"{NAME}-{dtype}.gguf"
    stamp = out.with_name(out.name + ".stamp.json")
    wanted = {"hf": _read_json(hf / "bench_model.json"), "outtype": dtype,
              "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON_VERSION}
    if out.is_file() and _read_json(stamp) == wanted:
        return out
    tree = llamacpp.fetch_source(ROOT / "build" / "llamacpp", progress)
    partial = out.with_name(out.name + ".partial")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the tree's own gguf-py
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    command = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf.resolve()), "--outfile",
               str(partial.resolve()), "--outtype", dtype, "--model-name", f"{NAME} ({LABEL})"]
    started = time.monotonic()
    progress(f"llama.cpp's convert_hf_to_gguf.py: {hf.name} -> {out.name} (--outtype {dtype}; minutes)")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(tree),
                            env=env, stdin=subprocess.DEVNULL)
    lines = _relay(proc, progress)
    if proc.wait() != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {dtype} failed ({proc.returncode}):\n"
                           + "\n".join(lines[-20:]))
    partial.replace(out)
    stamp.write_text(json.dumps(wanted))
    progress(f"{out}: {out.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s")
    return out


def make(build: Path = BUILD, progress=_say, types=GGUF_TYPES) -> Files:
    """The Hugging Face folder and the GGUF files of `types`, each made once (module docstring)."""
    build.mkdir(parents=True, exist_ok=True)
    hf = hf_folder(build, progress)
    return Files(hf, {dtype: gguf_file(hf, dtype, build, progress) for dtype in types})


# ---- the checks ---------------------------------------------------------------------------------------------------

def check_transformers(hf: Path, progress=_say) -> None:
    """transformers loads the folder, in bfloat16, and its logits for one chat prompt are finite."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("transformers: logits not finite")
    count = sum(p.numel() for p in model.parameters())
    progress(f"transformers: {type(model).__name__}, {count / 1e9:.3f} B parameters, {model.dtype}; "
             f"{ids.shape[1]} prompt tokens -> logits {tuple(logits.shape)}, finite, greedy next token "
             f"{tokenizer.decode([int(logits[0, -1].argmax())])!r}")


def check_llamacpp(gguf: Path, progress=_say) -> None:
    """llama-server (bench.llamacpp) serves the file and answers one chat request of 16 tokens."""
    from bench import llamacpp
    from bench.harness.processes import cores

    binary = llamacpp.build_server(ROOT / "build" / "llamacpp", progress)
    with llamacpp.LlamaCppServer(binary, gguf, parallel=1, ctx_per_slot=512, threads=cores(),
                                 log_path=gguf.with_name(gguf.name + ".server.log")) as server:
        started = time.monotonic()
        answer = server.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16,
            "temperature": 0.0, "ignore_eos": True}, timeout=300)
        usage = answer.get("usage", {})
        progress(f"llama-server on {gguf.name}: {usage.get('prompt_tokens')} prompt tokens, "
                 f"{usage.get('completion_tokens')} completion tokens in {time.monotonic() - started:.1f} s: "
                 f"{answer['choices'][0]['message']['content'][:80]!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default=str(BUILD), help="where the files go (default build/llama1b)")
    parser.add_argument("--check", action="store_true",
                        help="then load the folder with transformers and serve the Q8_0 file with llama-server")
    args = parser.parse_args(argv)
    files = make(Path(args.build))
    _say(f"{files.hf_folder}: {folder_bytes(files.hf_folder) / 1e6:.0f} MB")
    for dtype, path in files.ggufs.items():
        _say(f"{path}: {path.stat().st_size / 1e6:.0f} MB")
    if args.check:
        check_transformers(files.hf_folder)
        check_llamacpp(files.gguf("q8_0"))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
