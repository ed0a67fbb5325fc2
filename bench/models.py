"""The models the serving benchmark runs: the demo model (trained by `make demo`) and a random LLaMA of about
100M parameters that shares the demo model's tokenizer, saved as Hugging Face folders so that every system under
test (our converter, transformers, llama.cpp's converter) reads the same weights; and SmolLM2-135M-Instruct, which
ships as one GGUF file (Q4_1 matrices, Q8_0 embeddings): our converter and llama.cpp read that file, and
transformers and llama.cpp's f32/f16 files get it as a float32 Hugging Face folder that transformers makes
from it (BenchModel says which system reads what)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

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


# ---- a model that ships as one GGUF file (SmolLM2) ----------------------------------------------------------------

@dataclasses.dataclass
class BenchModel:
    """One model of the benchmark, as each system reads it.

    checkpoint: what our converter reads (a Hugging Face folder, or the .gguf file itself);
    tokenizer: the folder of the tokenizer prompts are cut with, the one our converted models serve with;
    max_positions: the model's max_position_embeddings;
    gguf, gguf_type: the model's own GGUF file and its llama.cpp type ("q4_1"), None for a Hugging Face folder;
    hf_folder(): the float32 Hugging Face folder that transformers loads and llama.cpp's converter reads (for a
    GGUF model, made from the file on first call: it loads torch and transformers)."""
    name: str
    checkpoint: Path
    tokenizer: Path
    max_positions: int
    make_hf_folder: Callable[[], Path] = dataclasses.field(repr=False)
    gguf: Path | None = None
    gguf_type: str | None = None
    _hf_folder: Path | None = dataclasses.field(default=None, repr=False)

    def hf_folder(self) -> Path:
        if self._hf_folder is None:
            self._hf_folder = self.make_hf_folder()
        return self._hf_folder


def hf_model(name: str, folder: Path) -> BenchModel:
    """A Hugging Face folder with its own tokenizer (tokenizer.json or tokenizer.model): every system reads it."""
    config = json.loads((folder / "config.json").read_text())
    return BenchModel(name, folder, folder, int(config["max_position_embeddings"]), lambda: folder)


# llama.cpp's enum llama_ftype (general.file_type): the type most of a file's matrices are stored in
LLAMA_FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 32: "bf16"}


def gguf_metadata(gguf: Path) -> dict:
    from mstriton.model.gguf import open_reader, read_metadata

    return read_metadata(open_reader(gguf))


def write_if_changed(path: Path, content: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != content:
        path.write_text(content, encoding="utf-8")


def gguf_tokenizer_folder(metadata: dict, folder: Path) -> Path:
    """The tokenizer files our converter writes for a GGUF file (tokenizer.json, tokenizer_config.json,
    generation_config.json, rebuilt from the file's metadata by model/gguf_tokenizer.py), in `folder`."""
    from mstriton.model.gguf_tokenizer import tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    for file_name, content in tokenizer_files(metadata).items():
        write_if_changed(folder / file_name, content)
    return folder


def gguf_model(name: str, gguf: Path, build: Path, progress=print) -> BenchModel:
    """A model that ships as one GGUF file: our converter reads the file (at any --weights), prompts are cut with
    the tokenizer it writes, llama.cpp serves the file as it is, and the float32 Hugging Face folder of the other
    systems is made from it by transformers (hf_folder_from_gguf, on first use)."""
    from mstriton.model.gguf import hf_config

    metadata = gguf_metadata(gguf)
    tokenizer = gguf_tokenizer_folder(metadata, build / f"{name}_tokenizer")
    file_type = LLAMA_FILE_TYPES.get(int(metadata.get("general.file_type", -1)))
    return BenchModel(name, gguf, tokenizer, int(hf_config(metadata)["max_position_embeddings"]),
                      lambda: hf_folder_from_gguf(gguf, build / f"{name}_hf", progress), gguf=gguf,
                      gguf_type=file_type)


def smollm2(build: Path, progress=print) -> BenchModel:
    """SmolLM2-135M-Instruct, the GGUF file of mstriton.pretrained (Q4_1 matrices, Q8_0 embeddings)."""
    from mstriton.pretrained import smollm2_gguf

    return gguf_model("smollm2", smollm2_gguf(), build, progress)


def hf_folder_from_gguf(gguf: Path, folder: Path, progress=print) -> Path:
    """The model of a GGUF file as a float32 Hugging Face folder, unless `folder` already holds one made from the
    same file by the same transformers: transformers dequantizes the file (from_pretrained(gguf_file=...)), its
    state dict goes into a fresh LlamaForCausalLM of the same config (a plain model, nothing of the GGUF loading
    left on it), which is saved with save_pretrained beside the tokenizer transformers reads from the file."""
    import transformers

    stamp = folder / "bench_model.json"
    wanted = {"gguf": str(gguf.resolve()), "bytes": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns,
              "transformers": transformers.__version__}
    if stamp.exists() and (folder / "model.safetensors").is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    progress(f"writing {gguf.name} as a float32 Hugging Face folder {folder} (transformers dequantizes it)")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config).eval()
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{gguf.name}: transformers' model does not fit a LlamaForCausalLM of its config "
                           f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        if not torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"{gguf.name}: the fresh LlamaForCausalLM does not give transformers' logits")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    (staging / "bench_model.json").write_text(json.dumps(wanted))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
