"""Load LLaMA weights from a Hugging Face folder (safetensors, sharded or not) or a MindSpore checkpoint, and
lay them out for ``model/llama.py``.

Errors name the tensor at fault: a missing tensor, a shape that does not fit the config, a dtype we cannot read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..config import LlamaConfig
from .llama import weight_shapes


class WeightError(ValueError):
    """A checkpoint whose tensors do not fit the model; the message names the tensor."""


# ---- reading files -------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as float32 numpy arrays (BF16 widened exactly).

    Read directly from the documented layout (8-byte header size, JSON header, raw little-endian data) so that
    bfloat16 checkpoints load without torch.
    """
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    data = np.memmap(path, np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = data[start:end]
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            array = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).astype(np.float32)
        else:
            raise WeightError(f"tensor '{name}' in {path.name} has dtype {info['dtype']}; "
                              f"supported: BF16, {', '.join(_SAFETENSORS_DTYPES)}")
        tensors[name] = array.reshape(info["shape"])
    return tensors


def read_hf_folder(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise WeightError(f"{index.name} names shard files that are missing: {missing}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise WeightError(f"no *.safetensors in {folder}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(read_safetensors(folder / file))
    return tensors


def read_mindspore_ckpt(path: Path) -> dict[str, np.ndarray]:
    import mindspore as ms
    return {name: p.asnumpy().astype(np.float32) for name, p in ms.load_checkpoint(str(path)).items()}


# ---- naming -------------------------------------------------------------------------------------------------

# Per layer: our canonical (Hugging Face) name -> the MindFormers name of the same tensor.
_MINDFORMERS_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.bias": "attention.wq.bias", "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias", "self_attn.o_proj.bias": "attention.wo.bias",
    "mlp.gate_proj.bias": "feed_forward.w1.bias", "mlp.down_proj.bias": "feed_forward.w2.bias",
    "mlp.up_proj.bias": "feed_forward.w3.bias",
}
_MINDFORMERS_GLOBAL = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
                       "model.norm.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}


def hf_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face LlamaForCausalLM (or Qwen2ForCausalLM) and its shape ([out, in] matrices),
    biases included when the config has them."""
    e, q, kv, ffn = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.intermediate_size
    layer = {"self_attn.q_proj.weight": (q, e), "self_attn.k_proj.weight": (kv, e),
             "self_attn.v_proj.weight": (kv, e), "self_attn.o_proj.weight": (e, q),
             "mlp.gate_proj.weight": (ffn, e), "mlp.up_proj.weight": (ffn, e),
             "mlp.down_proj.weight": (e, ffn), "input_layernorm.weight": (e,),
             "post_attention_layernorm.weight": (e,)}
    if c.attention_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if c.o_proj_bias:
        layer["self_attn.o_proj.bias"] = (e,)
    if c.mlp_bias:
        layer.update({"mlp.gate_proj.bias": (ffn,), "mlp.up_proj.bias": (ffn,), "mlp.down_proj.bias": (e,)})
    shapes = {f"model.layers.{i}.{k}": v for i in range(c.num_hidden_layers) for k, v in layer.items()}
    shapes.update({"model.embed_tokens.weight": (c.vocab_size, e), "model.norm.weight": (e,)})
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, e)
    return shapes


def _mindformers_name(hf_name: str) -> str:
    if hf_name in _MINDFORMERS_GLOBAL:
        return _MINDFORMERS_GLOBAL[hf_name]
    prefix, rest = hf_name.split(".", 3)[:3], hf_name.split(".", 3)[3]
    return ".".join(prefix) + "." + _MINDFORMERS_LAYER[rest]


def to_canonical(c: LlamaConfig, tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Hugging Face names, shapes checked. Accepts Hugging Face or MindFormers naming."""
    expected = hf_shapes(c)
    mindformers = "model.tok_embeddings.embedding_weight" in tensors
    out = {}
    for name, shape in expected.items():
        stored = _mindformers_name(name) if mindformers else name
        if stored not in tensors:
            raise WeightError(f"{source} lacks tensor '{stored}' (needed for config: {c.num_hidden_layers} layers, "
                              f"tie_word_embeddings={c.tie_word_embeddings}, attention_bias={c.attention_bias}, "
                              f"mlp_bias={c.mlp_bias})")
        if tuple(tensors[stored].shape) != shape:
            raise WeightError(f"tensor '{stored}' in {source} has shape {list(tensors[stored].shape)}, but the "
                              f"config needs {list(shape)}")
        out[name] = tensors[stored]
    return out


def to_network_layout(c: LlamaConfig, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fuse q/k/v and gate/up (their biases alike), store matrices [in, out], and give untied and tied models
    alike an lm_head."""
    out = {}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention_norm"] = hf[p + "input_layernorm.weight"]
        out[f"layers.{i}.wqkv"] = np.concatenate(
            [hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"], axis=0).T
        out[f"layers.{i}.wo"] = hf[p + "self_attn.o_proj.weight"].T
        out[f"layers.{i}.ffn_norm"] = hf[p + "post_attention_layernorm.weight"]
        out[f"layers.{i}.w_gate_up"] = np.concatenate(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], axis=0).T
        out[f"layers.{i}.w_down"] = hf[p + "mlp.down_proj.weight"].T
        if c.attention_bias:
            out[f"layers.{i}.bqkv"] = np.concatenate([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        if c.o_proj_bias:
            out[f"layers.{i}.bo"] = hf[p + "self_attn.o_proj.bias"]
        if c.mlp_bias:
            out[f"layers.{i}.b_gate_up"] = np.concatenate([hf[p + "mlp.gate_proj.bias"], hf[p + "mlp.up_proj.bias"]])
            out[f"layers.{i}.b_down"] = hf[p + "mlp.down_proj.bias"]
    out["embed_tokens"] = hf["model.embed_tokens.weight"]
    out["norm"] = hf["model.norm.weight"]
    out["lm_head"] = hf["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"].T
    expected = weight_shapes(c)
    return {n: np.ascontiguousarray(out[n], dtype=np.float32) for n in expected}


def load_checkpoint(folder: str | Path) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """A checkpoint folder (config.json plus *.safetensors or one *.ckpt) -> config and network-layout weights.

    A .ckpt may hold Hugging Face names, MindFormers names, or this network's own names (as the demo trainer
    saves them).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightError(f"checkpoint folder {folder} does not exist")
    config = LlamaConfig.from_file(folder)
    ckpts = sorted(folder.glob("*.ckpt"))
    if list(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists():
        tensors, source = read_hf_folder(folder), f"{folder}/*.safetensors"
    elif len(ckpts) == 1:
        tensors, source = read_mindspore_ckpt(ckpts[0]), str(ckpts[0])
    elif ckpts:
        raise WeightError(f"{folder} holds several .ckpt files {[p.name for p in ckpts]}; keep one")
    else:
        raise WeightError(f"{folder} holds neither *.safetensors nor a *.ckpt file")
    network_names = weight_shapes(config)
    if set(network_names) <= set(tensors):  # already in this network's layout
        for name, shape in network_names.items():
            if tuple(tensors[name].shape) != shape:
                raise WeightError(f"tensor '{name}' in {source} has shape {list(tensors[name].shape)}, but the "
                                  f"config needs {list(shape)}")
        return config, {n: np.ascontiguousarray(tensors[n], np.float32) for n in network_names}
    return config, to_network_layout(config, to_canonical(config, tensors, source))
