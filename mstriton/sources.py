"""What a checkpoint gives the converter: the config, the weights in the network's layout, the tokenizer files
the served models load, the chat template, and the ids that end a generation.

A checkpoint is
- a folder: config.json, weights (*.safetensors, sharded or not, or one MindSpore *.ckpt) and a tokenizer:
  tokenizer.json (Hugging Face `tokenizers`; preferred when both are there, as transformers prefers its fast
  tokenizer) or tokenizer.model (sentencepiece), with tokenizer_config.json / generation_config.json /
  chat_template.jinja when the folder has them;
- or one .gguf file: config, tensors and tokenizer all come from it (``model/gguf.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from .config import LlamaConfig
from .model.weights import WeightError, load_checkpoint, to_canonical, to_network_layout
from .tokenizer import NAMED_TEMPLATES, SENTENCEPIECE_MODEL, TOKENIZER_JSON, ChatTemplate, \
    SentencePieceTokenizer, TemplateError, TokenizerError, load_tokenizer
from .tokenizer.hf_tokenizer import TOKENIZER_CONFIG, chat_template_of, read_json

GENERATION_CONFIG = "generation_config.json"
# Hugging Face tokenizer files copied beside tokenizer.json when a folder has them.
HF_TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", GENERATION_CONFIG)
# --template: "none" (text_input as it is; messages through the model's own chat template) or a named template
# that replaces the model's (see tokenizer/chat.py); a path to a .jinja file is accepted too.
TEMPLATE_CHOICES = ("none", *NAMED_TEMPLATES)


@dataclasses.dataclass
class Source:
    config: LlamaConfig
    weights: dict[str, np.ndarray]       # the network's layout (model/weights.py)
    tokenizer_files: dict[str, bytes]    # file name -> content, written into the tokenizer and front models
    tokenizer_entry: str                 # the file of tokenizer_files the models load
    chat_template: str | None            # what requests with `messages` are rendered with
    end_ids: list[int]                   # a generation ends at any of these
    # Hugging Face name -> the GGUF file's own Q8_0/Q4_0/Q4_1 bytes of that matrix (model/gguf.py), {} otherwise
    blocks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    block_types: dict[str, str] = dataclasses.field(default_factory=dict)   # their GGUF types


def sentencepiece_tokenizer_config() -> dict:
    """What transformers' AutoTokenizer needs beside tokenizer.model (genai-perf loads the folder with it)."""
    return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}


def _ids(value) -> list[int]:
    """An eos_token_id field: an int, a list of ints, or absent."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def end_ids_of(*fields, tokenizer_eos: int | None = None) -> list[int]:
    """Every end id, in order of appearance: generation_config.json's eos_token_id (what transformers' generate
    stops at; Llama 3 lists several), config.json's (LlamaConfig.eos_token_ids), then the tokenizer's eos."""
    ids: list[int] = []
    for value in (*fields, tokenizer_eos):
        ids += [i for i in _ids(value) if i not in ids]
    return ids


def resolve_chat_template(template: str, model_template: str | None, special_tokens: dict) -> str | None:
    """The chat template to serve: the one --template names (or a .jinja file), else the model's own."""
    if template == "none":
        source = model_template
    elif template in NAMED_TEMPLATES:
        source = NAMED_TEMPLATES[template]
    else:
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"--template {template}: no such file")
        source = path.read_text(encoding="utf-8")
    if source is not None:
        try:
            ChatTemplate(source, special_tokens)
        except TemplateError as exc:
            raise ValueError(f"--template {template}: {exc}") from exc
    return source


def _source(config: LlamaConfig, weights: dict, files: dict[str, bytes], entry: str, tokenizer, generation: dict,
            template: str) -> Source:
    return Source(config=config, weights=weights, tokenizer_files=files, tokenizer_entry=entry,
                  chat_template=resolve_chat_template(template, tokenizer.chat_template, tokenizer.special_tokens),
                  end_ids=end_ids_of(generation.get("eos_token_id"), list(config.eos_token_ids),
                                     tokenizer_eos=tokenizer.eos_id))


def folder_source(folder: Path, template: str) -> Source:
    config, weights = load_checkpoint(folder)
    generation = read_json(folder / GENERATION_CONFIG)
    if (folder / TOKENIZER_JSON).is_file():
        tokenizer = load_tokenizer(folder)
        files = {n: (folder / n).read_bytes() for n in HF_TOKENIZER_FILES if (folder / n).is_file()}
        entry = TOKENIZER_JSON
    elif (folder / SENTENCEPIECE_MODEL).is_file():
        tokenizer_config = read_json(folder / TOKENIZER_CONFIG) or sentencepiece_tokenizer_config()
        tokenizer = SentencePieceTokenizer(folder / SENTENCEPIECE_MODEL,
                                           chat_template=chat_template_of(folder, tokenizer_config))
        files = {SENTENCEPIECE_MODEL: (folder / SENTENCEPIECE_MODEL).read_bytes(),
                 TOKENIZER_CONFIG: json.dumps(tokenizer_config, indent=1).encode()}
        entry = SENTENCEPIECE_MODEL
    else:
        raise FileNotFoundError(f"{folder} has no tokenizer: {TOKENIZER_JSON} (Hugging Face tokenizers) or "
                                f"{SENTENCEPIECE_MODEL} (sentencepiece) is required")
    return _source(config, weights, files, entry, tokenizer, generation, template)


def gguf_source(path: Path, template: str, progress: Callable[[str], None]) -> Source:
    import tempfile

    from .model.gguf import read_gguf

    model = read_gguf(path, progress=progress)
    config = LlamaConfig.from_hf_dict(model.config)
    weights = to_network_layout(config, to_canonical(config, model.tensors, str(path)))
    files = {name: text.encode("utf-8") for name, text in model.tokenizer_files.items()}
    with tempfile.TemporaryDirectory() as scratch:  # the tokenizer as the served models will load it
        for name, content in files.items():
            (Path(scratch) / name).write_bytes(content)
        tokenizer = load_tokenizer(scratch)
    generation = json.loads(model.tokenizer_files.get(GENERATION_CONFIG, "{}"))
    source = _source(config, weights, files, TOKENIZER_JSON, tokenizer, generation, template)
    source.blocks = {name: model.blocks[name] for name in model.blocks}
    source.block_types = {name: model.tensor_types[name] for name in model.blocks}
    return source


def read_source(checkpoint: str | Path, template: str = "none", progress: Callable[[str], None] = print) -> Source:
    checkpoint = Path(checkpoint)
    if checkpoint.is_file() and checkpoint.suffix == ".gguf":
        return gguf_source(checkpoint, template, progress)
    if checkpoint.is_dir():
        return folder_source(checkpoint, template)
    if checkpoint.exists():
        raise WeightError(f"{checkpoint} is neither a checkpoint folder nor a .gguf file")
    raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")


__all__ = ["Source", "TEMPLATE_CHOICES", "TokenizerError", "read_source", "sentencepiece_tokenizer_config"]
