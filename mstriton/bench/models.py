"""The two models the serving benchmark runs: the demo model (trained by `make demo`) and a random LLaMA of
about 100M parameters that shares the demo model's tokenizer, saved as Hugging Face folders so that every
system under test (our converter, transformers, llama.cpp's converter) reads the same weights."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

# ~100M parameters: 16 layers of 6.3M (grouped-query attention, 4 KV heads) plus two 1500 x 768 embeddings.
RANDOM_100M = dict(vocab_size=1500, hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        for name in f.keys():
            count = 1
            for dim in f.get_slice(name).get_shape():
                count *= int(dim)
            total += count
    return total


def random_llama(folder: Path, tokenizer_dir: Path, seed: int = 0, progress=print) -> Path:
    """Save a randomly initialised LLaMA (transformers' own init) with the tokenizer of `tokenizer_dir`,
    unless `folder` already holds one made with the same settings."""
    stamp = folder / "bench_model.json"
    # the tokenizer too: the demo model's is retrained with its corpus, and prompts are cut with the model's own
    wanted = {"settings": RANDOM_100M, "seed": seed,
              "tokenizer_sha256": hashlib.sha256((tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    progress(f"writing a random ~100M-parameter LLaMA to {folder}")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**RANDOM_100M)).eval()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, staging / name)
    (staging / "bench_model.json").write_text(json.dumps(wanted))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
