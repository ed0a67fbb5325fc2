"""The weights an engine stores, by the format chosen at conversion (``--weights``).

- float32: the network's float32 matrices [in, out], multiplied by MindSpore's MatMul: the reference path, and
  the one exported for Ascend and GPU.
- bfloat16, int8, Q8_0, Q4_0, Q4_1: every weight matrix packed for the CPU kernels (``kernels/formats.py``),
  [out, row bytes]; the norms stay float32. bfloat16 rounds to nearest even; int8 is symmetric with one scale
  per output channel; the Q formats are GGUF's blocks. From a GGUF file, a matrix the file already stores in
  the block format asked for keeps the file's bytes (its fused parts alike), and so does a Q8_0 matrix when a
  4-bit format is asked for: SmolLM2's Q4_1 file as Q4_1 keeps its Q8_0 embeddings and Q4_1 layers as they are,
  nothing re-quantized. A matrix the file stores in one K-quant (Q4_K, Q5_K, Q6_K: super-blocks of 256 values)
  keeps its blocks under any of the three block formats: a Q4_K_M file as Q4_1 keeps its Q4_K and Q6_K matrices
  and quantizes only the others (its F16/F32 ones, or Q5_0 / Q5_1 fallbacks) to Q4_1. A fused matrix whose parts
  differ in type (Q4_K queries beside Q6_K values) is quantized to the format asked as a whole: the kernels take
  one format per matrix. Other matrices are quantized to the format asked (SmolLM2 as Q4_0: its Q4_1 layers).

The embedding table of a packed engine is packed too, and is read through the kernels' embedding lookup; a tied
model stores it once, as its LM head.

With `interleave` (what `convert` asks when the model is served with int8 activations, the default of the block
formats), every block-format matrix whose rows come in whole groups of 8 is stored in its interleaved form (Q4_1 ->
Q4_1X8, ...; kernels/formats.py): the same bytes, regrouped so that the int8 products read them without transposing
them on every call. The float32 products read both forms (slower on the interleaved one).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..config import LlamaConfig
from ..kernels.formats import (GGUF_BLOCK_FORMATS, GROUP, K_QUANT_FORMATS, interleave, interleaved_format, pack,
                               row_bytes)

WEIGHT_CHOICES = ("float32", "bfloat16", "int8", "Q8_0", "Q4_0", "Q4_1")
KERNEL_FORMATS = {"bfloat16": "BF16", "int8": "INT8", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1"}
# One engine name -> the Hugging Face matrices it fuses, in order (rows of the packed matrix).
_LAYER_PARTS = {"wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "wo": ("self_attn.o_proj",),
                "w_gate_up": ("mlp.gate_proj", "mlp.up_proj"), "w_down": ("mlp.down_proj",)}


def check_weights(choice: str) -> str:
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"--weights must be one of {list(WEIGHT_CHOICES)}, got {choice!r}")
    return choice


def matrix_parts(config: LlamaConfig) -> dict[str, tuple[str, ...]]:
    """Each packed matrix of the engine and the Hugging Face tensors whose rows it stacks."""
    parts = {f"layers.{i}.{name}": tuple(f"model.layers.{i}.{p}.weight" for p in hf)
             for i in range(config.num_hidden_layers) for name, hf in _LAYER_PARTS.items()}
    parts["lm_head"] = ("model.embed_tokens.weight",) if config.tie_word_embeddings else ("lm_head.weight",)
    if not config.tie_word_embeddings:
        parts["embed_tokens"] = ("model.embed_tokens.weight",)
    return parts


def _kept_blocks(parts: tuple[str, ...], blocks: dict[str, np.ndarray], types: dict[str, str], fmt: str):
    """The file's own rows of a matrix when every part is stored in the block format asked for, or in Q8_0 when
    a 4-bit format is asked for (4-bit files keep their embeddings and head in Q8_0, as SmolLM2's does), or in one
    K-quant (Q4_K, Q5_K, Q6_K) when any block format is asked for (a Q4_K_M file keeps its Q4_K and Q6_K
    matrices: re-quantizing them to 32-value blocks would only add error)."""
    if fmt not in GGUF_BLOCK_FORMATS or not all(p in blocks for p in parts):
        return None
    kinds = {types[p] for p in parts}
    if len(kinds) != 1 or not kinds <= set(GGUF_BLOCK_FORMATS + K_QUANT_FORMATS):
        return None
    kind = kinds.pop()
    if kind != fmt and kind not in K_QUANT_FORMATS and not (kind == "Q8_0" and fmt in ("Q4_0", "Q4_1")):
        return None
    return kind, np.concatenate([blocks[p] for p in parts], axis=0)


def pack_engine_weights(config: LlamaConfig, weights: dict[str, np.ndarray], choice: str,
                        blocks: dict[str, np.ndarray] | None = None, block_types: dict[str, str] | None = None,
                        progress: Callable[[str], None] = print,
                        interleave_blocks: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """weights in the network's float32 layout -> (the arrays to store, {matrix name: kernel format}).
    Tied models: 'embed_tokens' is left out; the engine reads the table from 'lm_head'."""
    check_weights(choice)
    if choice == "float32":
        return weights, {}
    fmt = KERNEL_FORMATS[choice]
    blocks, block_types = blocks or {}, block_types or {}
    out = {name: array for name, array in weights.items() if array.ndim == 1}  # norms and biases
    formats, kept = {}, 0
    parts_of = matrix_parts(config)
    for index, (name, parts) in enumerate(parts_of.items(), 1):
        file_rows = _kept_blocks(parts, blocks, block_types, fmt)
        if file_rows is not None:
            formats[name], out[name] = file_rows
            kept += 1
        else:
            # embed_tokens is [vocab, hidden] already; the others are stored [in, out] in the network's layout
            matrix = weights[name] if name == "embed_tokens" else weights[name].T
            formats[name], out[name] = fmt, pack(fmt, matrix)
        expected = row_bytes(formats[name], config.hidden_size if name in ("lm_head", "embed_tokens") else
                             weights[name].shape[0])
        if out[name].shape[1] != expected:
            raise ValueError(f"{name}: packed rows of {out[name].shape[1]} bytes, expected {expected}")
        if interleave_blocks and formats[name] in GGUF_BLOCK_FORMATS and out[name].shape[0] % GROUP == 0:
            formats[name], out[name] = interleaved_format(formats[name]), interleave(formats[name], out[name])
        if index % max(1, len(parts_of) // 5) == 0 or index == len(parts_of):
            progress(f"packing weights as {choice}: {index} of {len(parts_of)} matrices")
    if config.tie_word_embeddings:
        formats["embed_tokens"] = formats["lm_head"]
    if kept:
        progress(f"{kept} of {len(parts_of)} matrices keep the GGUF file's own blocks")
    if interleave_blocks:
        grouped = sum(formats[name].endswith("X8") for name in parts_of)
        progress(f"{grouped} of {len(parts_of)} matrices interleaved by {GROUP} channels for the int8 products")
    return out, formats
