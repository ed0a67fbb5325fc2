"""Import a LLaMA model from a GGUF file (llama.cpp's format): the weights dequantized to float32 under their
Hugging Face names, the hyper-parameters as a Hugging Face config.json dict, and the tokenizer rebuilt as
tokenizer.json / tokenizer_config.json / generation_config.json (see gguf_tokenizer.py).

    model = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.config          # {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, ...}
    model.tensors         # {"model.embed_tokens.weight": float32 [49152, 576], ...}
    model.tokenizer_files # {"tokenizer.json": "...", "tokenizer_config.json": "...", ...}

The file is read with the `gguf` package's GGUFReader (memory-mapped); the dequantization is our own numpy code,
written from ggml's block layouts (ggml-common.h):

    F32, F16, BF16   one value per element (BF16: the upper half of a float32)
    Q8_0   32 values: f16 d, int8 q[32]                     x = d * q
    Q4_0   32 values: f16 d, u8 qs[16]                      x = d * (q - 8)
    Q4_1   32 values: f16 d, f16 m, u8 qs[16]               x = d * q + m
    Q5_0   32 values: f16 d, u32 qh, u8 qs[16]              x = d * (q - 16)
    Q5_1   32 values: f16 d, f16 m, u32 qh, u8 qs[16]       x = d * q + m

In the 4- and 5-bit blocks, value j < 16 is the low nibble of qs[j] and value j + 16 its high nibble; the 5-bit
types add bit j of qh (little-endian) as bit 4 of value j.

The K-quants hold super-blocks of 256 values, cut into 8 sub-blocks of 32 (Q4_K, Q5_K) or 16 of 16 (Q2_K, Q3_K,
Q6_K), each with a small integer scale (and min) that multiplies the super-block's f16 d (and dmin):

    Q2_K   u8 sc[16], u8 qs[64], f16 d, f16 dmin             (84 bytes)  x = (d sc_lo) q - (dmin sc_hi), q 2-bit
    Q3_K   u8 hmask[32], u8 qs[64], u8 sc[12], f16 d          (110)       x = (d (sc - 32)) (q - 4 + 4 h), q 2-bit
    Q4_K   f16 d, f16 dmin, u8 sc[12], u8 qs[128]             (144)       x = (d sc) q - (dmin m), 6-bit sc and m
    Q5_K   f16 d, f16 dmin, u8 sc[12], u8 qh[32], u8 qs[128]  (176)       as Q4_K, q 5-bit
    Q6_K   u8 ql[128], u8 qh[64], i8 sc[16], f16 d            (210)       x = (d sc) (q - 32), q 6-bit

Every 32 values of a K-quant super-block come from one run of 32 bytes, shifted and masked (`_k_bits`): Q4_K and
Q5_K's sub-block j reads qs[32 (j / 2) ..] (low nibbles for even j, high for odd; Q5_K adds bit j of qh[0 .. 32] as
bit 4); Q6_K's j = 4 h + i reads ql[64 h + 32 (i % 2) ..] (nibble i / 2) and bits 2 i of qh[32 h ..] as bits 4-5;
Q2_K's j = 4 h + i bits 2 i of qs[32 h ..]; Q3_K's the same plus bit j of hmask[0 .. 32]. The 12 bytes of 6-bit
scales: Q4_K/Q5_K's sc and m of sub-block j < 4 are the low 6 bits of bytes j and j + 4, for j >= 4 a nibble of
byte j + 4 plus the top 2 bits of bytes j - 4 and j; Q3_K's 16 scales are a nibble of bytes 0-7 (low for the
first 8) plus 2 bits of bytes 8-11.

Every product and sum is one float32 operation on exactly representable inputs, in ggml's order (the scale
product first), so the results are those of ggml itself, bit for bit.

GGUF lists a tensor's dimensions innermost first (ne[0] is the length of a row), so a [rows, cols] matrix, PyTorch's
[out, in], is stored with shape [cols, rows]; blocks run along the rows. llama.cpp's converter also permutes the
rows of the query and key projections for its rotary layout (convert_hf_to_gguf.py, LlamaModel.permute: each
head's two halves interleaved); we undo that, so the tensors equal the Hugging Face checkpoint's.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


class GGUFError(ValueError):
    """A GGUF file this project cannot import; the message names the metadata field or tensor at fault."""


# ---- dequantization ------------------------------------------------------------------------------------------

QK = 32  # values per block of the Q4/Q5/Q8 types
# Block types the CPU kernels multiply as the file stores them (mstriton/kernels/formats.py)
KERNEL_BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


def _f16(column: np.ndarray) -> np.ndarray:
    """Bytes [n, 2] (little-endian float16) -> float32 [n, 1]."""
    return np.ascontiguousarray(column).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """u8 [n, 16] -> u8 [n, 32]: the 16 low nibbles, then the 16 high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Bytes [n, 4] (a little-endian u32) -> u8 [n, 32]: bit j shifted to bit 4 of value j."""
    word = np.ascontiguousarray(qh).view("<u4")  # [n, 1]
    return (((word >> np.arange(QK, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _deq_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f4").astype(np.float32)


def _deq_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f2").astype(np.float32)


def _deq_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _deq_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


def _deq_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    return (_nibbles(blocks[:, 2:]).astype(np.float32) - 8.0) * d


def _deq_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    return _nibbles(blocks[:, 4:]).astype(np.float32) * d + m


def _deq_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    q = _nibbles(blocks[:, 6:]) | _high_bits(blocks[:, 2:6])
    return (q.astype(np.float32) - 16.0) * d


def _deq_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:]) | _high_bits(blocks[:, 4:8])
    return q.astype(np.float32) * d + m


# ---- K-quants: super-blocks of 256 values -------------------------------------------------------------------

QK_K = 256


def _k_bits(run: np.ndarray, shift: int, mask: int) -> np.ndarray:
    """u8 [n, 32] -> u8 [n, 32]: (run >> shift) & mask."""
    return (run >> np.uint8(shift)) & np.uint8(mask)


def k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of packed scales [n, 12] -> the 6-bit scale and min of each sub-block, u8 [n, 8]."""
    low, high = sc[:, 0:4], sc[:, 4:8]  # sub-blocks 0-3 in their low 6 bits; bytes 8-11 hold 4-7's low nibbles
    last = sc[:, 8:12]
    scale = np.concatenate([low & 63, (last & 15) | ((low >> 6) << 4)], axis=1)
    mins = np.concatenate([high & 63, (last >> 4) | ((high >> 6) << 4)], axis=1)
    return scale, mins


def q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of packed scales [n, 12] -> the 16 signed scales (stored + 32 in 6 bits), int8 [n, 16]."""
    low = np.concatenate([sc[:, 0:8] & 15, sc[:, 0:8] >> 4], axis=1)
    high = np.concatenate([(sc[:, 8:12] >> np.uint8(2 * i)) & 3 for i in range(4)], axis=1)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def k_values(kind: str, blocks: np.ndarray, j: int) -> np.ndarray:
    """The integer values of sub-block j (0..7: 32 values) of K-quant super-blocks [n, type_size] -> u8 [n, 32]
    (Q3_K: q + 4 - 4 h, so 0..7, the value being it minus 4; Q6_K: 0..63, the value being it minus 32)."""
    h, i = divmod(j, 4)
    if kind in ("Q4_K", "Q5_K"):
        qs = blocks[:, 16:144] if kind == "Q4_K" else blocks[:, 48:176]
        q = _k_bits(qs[:, 32 * (j // 2):32 * (j // 2) + 32], 4 * (j % 2), 15)
        if kind == "Q5_K":
            q = q | (_k_bits(blocks[:, 16:48], j, 1) << 4)
        return q
    if kind == "Q6_K":
        ql = _k_bits(blocks[:, 64 * h + 32 * (i % 2):64 * h + 32 * (i % 2) + 32], 4 * (i // 2), 15)
        return ql | (_k_bits(blocks[:, 128 + 32 * h:128 + 32 * h + 32], 2 * i, 3) << 4)
    if kind == "Q2_K":
        return _k_bits(blocks[:, 16 + 32 * h:16 + 32 * h + 32], 2 * i, 3)
    if kind == "Q3_K":
        low = _k_bits(blocks[:, 32 + 32 * h:32 + 32 * h + 32], 2 * i, 3)
        return low + (_k_bits(blocks[:, 0:32], j, 1) << 2)  # hmask bit set: no -4
    raise ValueError(kind)


def _deq_q2_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    sc = blocks[:, 0:16]
    scale = (d * (sc & 15).astype(np.float32)).repeat(16, axis=1)   # [n, 256], per 16 values
    mins = (dmin * (sc >> 4).astype(np.float32)).repeat(16, axis=1)
    q = np.concatenate([k_values("Q2_K", blocks, j) for j in range(8)], axis=1).astype(np.float32)
    return scale * q - mins


def _deq_q3_k(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 108:110])
    scale = (d * q3_k_scales(blocks[:, 96:108]).astype(np.float32)).repeat(16, axis=1)
    q = np.concatenate([k_values("Q3_K", blocks, j) for j in range(8)], axis=1).astype(np.float32) - 4.0
    return scale * q


def _deq_q45_k(kind: str, blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, m = k_scale_min(blocks[:, 4:16])
    scale = (d * sc.astype(np.float32)).repeat(32, axis=1)
    mins = (dmin * m.astype(np.float32)).repeat(32, axis=1)
    q = np.concatenate([k_values(kind, blocks, j) for j in range(8)], axis=1).astype(np.float32)
    return scale * q - mins


def _deq_q6_k(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 208:210])
    scale = (d * blocks[:, 192:208].view(np.int8).astype(np.float32)).repeat(16, axis=1)
    q = np.concatenate([k_values("Q6_K", blocks, j) for j in range(8)], axis=1).astype(np.float32) - 32.0
    return scale * q


@dataclasses.dataclass(frozen=True)
class _Layout:
    block_size: int  # values per block
    type_size: int   # bytes per block
    decode: Callable[[np.ndarray], np.ndarray]  # u8 [n_blocks, type_size] -> float32 [n_blocks, block_size]


# keyed by ggml's type numbers (enum ggml_type)
LAYOUTS: dict[int, _Layout] = {
    0: _Layout(1, 4, _deq_f32),                # F32
    1: _Layout(1, 2, _deq_f16),                # F16
    30: _Layout(1, 2, _deq_bf16),              # BF16
    8: _Layout(QK, 2 + QK, _deq_q8_0),         # Q8_0
    2: _Layout(QK, 2 + QK // 2, _deq_q4_0),    # Q4_0
    3: _Layout(QK, 4 + QK // 2, _deq_q4_1),    # Q4_1
    6: _Layout(QK, 6 + QK // 2, _deq_q5_0),    # Q5_0
    7: _Layout(QK, 8 + QK // 2, _deq_q5_1),    # Q5_1
    10: _Layout(QK_K, 84, _deq_q2_k),          # Q2_K
    11: _Layout(QK_K, 110, _deq_q3_k),         # Q3_K
    12: _Layout(QK_K, 144, functools.partial(_deq_q45_k, "Q4_K")),  # Q4_K
    13: _Layout(QK_K, 176, functools.partial(_deq_q45_k, "Q5_K")),  # Q5_K
    14: _Layout(QK_K, 210, _deq_q6_k),         # Q6_K
}

CHUNK_VALUES = 1 << 23  # values decoded at once: bounds the temporaries to a few tens of MB


def type_name(tensor_type) -> str:
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType(int(tensor_type)).name
    except ValueError:
        return f"type {int(tensor_type)}"


def supported_types() -> list[str]:
    return [type_name(t) for t in LAYOUTS]


def layout_of(tensor_type, name: str = "tensor") -> _Layout:
    layout = LAYOUTS.get(int(tensor_type))
    if layout is None:
        raise GGUFError(f"tensor '{name}' is stored as {type_name(tensor_type)}, which cannot be dequantized here; "
                        f"supported types: {', '.join(supported_types())}")
    return layout


def dequantize(data: np.ndarray, tensor_type, shape: tuple[int, ...] | None = None,
               name: str = "tensor") -> np.ndarray:
    """float32 values of a tensor stored as `tensor_type` (a GGMLQuantizationType or its number).

    `data` holds the stored bytes, as a uint8 array (any shape; with `shape` None its last axis is a row's bytes,
    as gguf.quants.quantize returns them) or as the float array itself for F32/F16. `shape` is the numpy shape of
    the result (its last axis a row); by default it follows from `data`'s shape."""
    layout = layout_of(tensor_type, name)
    data = np.asarray(data)
    if shape is None:
        if data.dtype == np.uint8:
            if data.ndim == 0 or data.shape[-1] % layout.type_size:
                raise GGUFError(f"tensor '{name}': {data.shape[-1] if data.ndim else 0} bytes per row is not a "
                                f"whole number of {type_name(tensor_type)} blocks ({layout.type_size} bytes)")
            shape = (*data.shape[:-1], data.shape[-1] // layout.type_size * layout.block_size)
        else:
            shape = data.shape
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n_values = int(np.prod(shape, dtype=np.int64))
    if n_values % layout.block_size or raw.size != n_values // layout.block_size * layout.type_size:
        raise GGUFError(f"tensor '{name}': {raw.size} bytes of {type_name(tensor_type)} do not hold shape "
                        f"{tuple(shape)}")
    if layout.block_size == 1:
        return layout.decode(raw).reshape(shape)
    blocks = raw.reshape(-1, layout.type_size)
    out = np.empty((blocks.shape[0], layout.block_size), dtype=np.float32)
    chunk = max(1, CHUNK_VALUES // layout.block_size)
    for start in range(0, blocks.shape[0], chunk):
        out[start:start + chunk] = layout.decode(blocks[start:start + chunk])
    return out.reshape(shape)


# ---- the rotary permutation of Q and K -----------------------------------------------------------------------

def unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's permute(w, n_head): rows [head, dim/2, 2] (interleaved pairs) back to [head, 2, dim/2]
    (Hugging Face's two halves)."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot undo the rotary permutation: {rows} rows are not {n_head} heads of even size")
    return np.ascontiguousarray(
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


# ---- metadata -> config.json ---------------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES = ("llama",)


def read_metadata(reader) -> dict[str, Any]:
    """Every key/value of the file as Python values (strings, numbers, lists), without GGUF's own header keys."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _float32(value) -> float:
    """A float32 metadata value as the shortest decimal that reads back as it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _get(metadata: dict, key: str, default: Any = ...) -> Any:
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise GGUFError(f"the file has no metadata field '{key}'")
    return default


def _int(metadata: dict, key: str, default: Any = ...) -> Any:
    if key not in metadata:
        return _get(metadata, key, default)
    value = metadata[key]
    if isinstance(value, list):  # a per-layer list (some converters): one value for every layer
        if len(set(value)) != 1:
            raise GGUFError(f"metadata field '{key}' varies per layer ({value}); only one value is supported")
        value = value[0]
    return int(value)


def check_architecture(metadata: dict) -> str:
    arch = _get(metadata, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"metadata field 'general.architecture' is {arch!r}; only "
                        f"{', '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)} is supported")
    return arch


def hf_config(metadata: dict, tensor_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """The Hugging Face config.json of the model a file describes (only the llama architecture).
    `tensor_shapes` (GGUF name -> numpy shape) settles what the metadata may leave out: the vocabulary size and
    whether the embeddings are tied (no output.weight)."""
    arch = check_architecture(metadata)
    p = f"{arch}."
    hidden = _int(metadata, p + "embedding_length")
    heads = _int(metadata, p + "attention.head_count")
    kv_heads = _int(metadata, p + "attention.head_count_kv", heads)
    shapes = tensor_shapes or {}
    vocab = _int(metadata, p + "vocab_size", None)
    if vocab is None:
        if "token_embd.weight" in shapes:
            vocab = shapes["token_embd.weight"][0]
        elif "tokenizer.ggml.tokens" in metadata:
            vocab = len(metadata["tokenizer.ggml.tokens"])
        else:
            raise GGUFError(f"the file has no metadata field '{p}vocab_size' and no token_embd.weight")
    experts = _int(metadata, p + "expert_count", 0)
    if experts:
        raise GGUFError(f"metadata field '{p}expert_count' is {experts}: mixture-of-experts models are not supported")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": _int(metadata, p + "feed_forward_length"),
        "num_hidden_layers": _int(metadata, p + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": _int(metadata, p + "context_length"),
        "rms_norm_eps": _float32(_get(metadata, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(_get(metadata, p + "rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in shapes if tensor_shapes is not None else True,
        "torch_dtype": "float32",
    }
    for name, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                      ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if key in metadata:
            config[name] = int(metadata[key])

    head_dim = _int(metadata, p + "attention.key_length", hidden // heads)
    value_dim = _int(metadata, p + "attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"metadata field '{p}attention.value_length' ({value_dim}) differs from "
                        f"'{p}attention.key_length' ({head_dim}); a LLaMA head has one size")
    if head_dim * heads != hidden:
        config["head_dim"] = head_dim
    rope_dims = _int(metadata, p + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"metadata field '{p}rope.dimension_count' is {rope_dims}, not the head size {head_dim}: "
                        "partial rotary embeddings are not supported")

    scaling = _get(metadata, p + "rope.scaling.type", None)
    factor = _get(metadata, p + "rope.scaling.factor", None)
    if scaling is None and _get(metadata, p + "rope.scale_linear", None) is not None:  # older files
        scaling, factor = "linear", metadata[p + "rope.scale_linear"]
    if scaling == "linear":
        if factor is None:
            raise GGUFError(f"metadata field '{p}rope.scaling.type' is 'linear' but '{p}rope.scaling.factor' is "
                            "missing")
        if float(factor) != 1.0:
            config["rope_scaling"] = {"rope_type": "linear", "factor": _float32(factor)}
    elif scaling not in (None, "none"):
        raise GGUFError(f"metadata field '{p}rope.scaling.type' is {scaling!r}; only 'linear' (or none) is supported")
    return config


# ---- tensor names ----------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a llama GGUF tensor; GGUFError for a tensor this import does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    if gguf_name == "rope_freqs.weight":
        raise GGUFError("tensor 'rope_freqs.weight' (Llama 3.1-style rotary frequency factors) is not supported")
    raise GGUFError(f"tensor '{gguf_name}' is not part of a plain LLaMA model (biases, experts and other extras "
                    "are not supported)")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({
            layer + "input_layernorm.weight": (hidden,), layer + "post_attention_layernorm.weight": (hidden,),
            layer + "self_attn.q_proj.weight": (q, hidden), layer + "self_attn.k_proj.weight": (kv, hidden),
            layer + "self_attn.v_proj.weight": (kv, hidden), layer + "self_attn.o_proj.weight": (hidden, q),
            layer + "mlp.gate_proj.weight": (inter, hidden), layer + "mlp.up_proj.weight": (inter, hidden),
            layer + "mlp.down_proj.weight": (hidden, inter)})
    return shapes


# ---- the model -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GGUFModel:
    path: Path
    config: dict[str, Any]                 # Hugging Face config.json
    tensors: dict[str, np.ndarray]         # Hugging Face name -> float32, PyTorch's [out, in]
    metadata: dict[str, Any]               # the file's key/values
    tensor_types: dict[str, str]           # Hugging Face name -> how the file stored it (Q4_1, F32, ...)
    # Hugging Face name -> the file's own bytes [out, row bytes] of each matrix stored in a block format the CPU
    # kernels run as it is (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), rotary rows un-permuted like the float32 tensors
    blocks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def tokenizer_files(self) -> dict[str, str]:
        """tokenizer.json, tokenizer_config.json, generation_config.json (file name -> JSON text)."""
        from .gguf_tokenizer import tokenizer_files
        return tokenizer_files(self.metadata)


def open_reader(path: str | Path):
    from gguf import GGUFReader
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise GGUFError(f"{path} cannot be read as GGUF: {exc}") from exc
    if getattr(reader, "endianess", None) is not None and reader.endianess.name != "LITTLE":
        raise GGUFError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
    return reader


def read_gguf(path: str | Path, progress: Callable[[str], None] | None = print) -> GGUFModel:
    """Read a llama GGUF file: config, float32 tensors under Hugging Face names, metadata for the tokenizer."""
    say = progress or (lambda _line: None)
    path = Path(path)
    started = time.perf_counter()
    reader = open_reader(path)
    metadata = read_metadata(reader)
    check_architecture(metadata)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = hf_config(metadata, shapes)
    names = {t.name: hf_name(t.name) for t in reader.tensors}
    expected = expected_shapes(config)
    for gguf_name, name in names.items():
        if name not in expected:
            raise GGUFError(f"tensor '{gguf_name}' does not fit a {config['num_hidden_layers']}-layer model")
        if shapes[gguf_name] != expected[name]:
            raise GGUFError(f"tensor '{gguf_name}' has shape {list(shapes[gguf_name])}, the config implies "
                            f"{list(expected[name])}")
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise GGUFError(f"the file lacks {len(missing)} tensors of the model, first {missing[0]}")
    for t in reader.tensors:  # refuse an unsupported type before any work
        layout_of(t.tensor_type, t.name)

    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[type_name(t.tensor_type)] = counts.get(type_name(t.tensor_type), 0) + 1
    stored_mb = sum(int(t.n_bytes) for t in reader.tensors) / 1e6
    say(f"reading {path.name}: {len(reader.tensors)} tensors, {stored_mb:.0f} MB stored as "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    tensors: dict[str, np.ndarray] = {}
    blocks: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    step = max(1, len(reader.tensors) // 10)
    for index, t in enumerate(reader.tensors, 1):
        raw = reader.data[t.data_offset:t.data_offset + t.n_bytes]
        values = dequantize(raw, t.tensor_type, shapes[t.name], name=t.name)
        kept = None
        if type_name(t.tensor_type) in KERNEL_BLOCK_TYPES and len(shapes[t.name]) == 2:
            kept = np.array(raw, np.uint8).reshape(shapes[t.name][0], -1)
        if t.name.endswith(".attn_q.weight"):
            values = unpermute_rope(values, n_head)
            kept = None if kept is None else unpermute_rope(kept, n_head)  # rows are output channels either way
        elif t.name.endswith(".attn_k.weight"):
            values = unpermute_rope(values, n_kv)
            kept = None if kept is None else unpermute_rope(kept, n_kv)
        tensors[names[t.name]] = values
        if kept is not None:
            blocks[names[t.name]] = kept
        types[names[t.name]] = type_name(t.tensor_type)
        if index % step == 0 or index == len(reader.tensors):
            say(f"dequantizing: {index} of {len(reader.tensors)} tensors done")
    n_params = sum(v.size for v in tensors.values())
    say(f"read {path.name}: {n_params / 1e6:.1f}M parameters as float32 in {time.perf_counter() - started:.1f} s")
    return GGUFModel(path=path, config=config, tensors=tensors, metadata=metadata, tensor_types=types,
                     blocks=blocks)
