"""All of a model's weights in one buffer, for the decode step that runs as one operator (MstDecodeStep).

A graph input costs MindSpore some microseconds per call, and a decode step of SmolLM2 took 190 weight inputs.
Packed into one blob, the step takes the blob and a layout: each weight's offset (64-byte aligned, so every row
of a packed matrix starts where the kernels want it) and format, in the engine's weight order. The other graphs
(prefill, chunks) still take one input per weight: those inputs are views into the same blob, so the weights are
in memory once.
"""

from __future__ import annotations

import numpy as np

from ..config import LlamaConfig
from ..kernels.formats import FORMATS
from ..model.llama import GLOBAL_WEIGHTS, layer_weight_names
from .memory import aligned_zeros

ALIGN = 64
# Must match csrc/entry.cpp (MstDecodeStep).
STEP_VERSION, STEP_HEADER = 1, 8
STEP_LAYER_WEIGHTS = ("attention_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")
FLOAT_VALUES = -1  # the format code of a float32 vector (the norms)


def step_supported(config: LlamaConfig, formats: dict[str, str] | None) -> bool:
    """Whether the whole step runs as one operator: the CPU kernels, no biases, and each layer's four matrices in
    one format (what the fused layer needs)."""
    if not formats or tuple(layer_weight_names(config)) != STEP_LAYER_WEIGHTS:
        return False
    return all(len({formats[f"layers.{i}.{n}"] for n in ("wqkv", "wo", "w_gate_up", "w_down")}) == 1
               for i in range(config.num_hidden_layers))


def offsets(names: list[str], arrays: list[np.ndarray]) -> tuple[list[int], int]:
    """Each weight's byte offset in the blob (the same array twice, a tied table, is stored once) and the blob's
    size."""
    placed: dict[int, int] = {}
    out, end = [], 0
    for array in arrays:
        if id(array) not in placed:
            placed[id(array)] = end
            end += -(-array.nbytes // ALIGN) * ALIGN
        out.append(placed[id(array)])
    return out, end


def build(names: list[str], arrays: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The blob (huge-page aligned) and, for each weight, a view of it holding the same values as `arrays`."""
    starts, size = offsets(names, arrays)
    blob = aligned_zeros((max(size, ALIGN),), np.uint8)
    views, made = [], {}
    for array, start in zip(arrays, starts):
        if id(array) not in made:  # the same array twice (a tied table) is one view, as it was one array
            made[id(array)] = blob[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
            made[id(array)][...] = array
        views.append(made[id(array)])
    return blob, views


def step_layout(config: LlamaConfig, names: list[str], arrays: list[np.ndarray],
                formats: dict[str, str]) -> np.ndarray:
    """The layout MstDecodeStep reads: a header, then (offset / 64, format) of each weight in `names` order."""
    expected = [f"layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in STEP_LAYER_WEIGHTS]
    if list(names) != expected + list(GLOBAL_WEIGHTS):
        raise ValueError("the one-operator decode step needs the weights of a model without biases, in engine order")
    starts, _ = offsets(names, arrays)
    c = config
    header = [STEP_VERSION, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
              c.head_dim, c.intermediate_size, c.vocab_size]
    entries = []
    for name, start in zip(names, starts):
        fmt = formats.get(name)
        entries += [start // ALIGN, FORMATS[fmt] if fmt else FLOAT_VALUES]
    layout = np.array(header + entries, np.int64)
    if layout.max() > np.iinfo(np.int32).max:
        raise ValueError("the weights are too large for the one-operator decode step's layout")
    return layout.astype(np.int32)
