"""GGUF K-quants (issue 30): our numpy dequantization of Q2_K .. Q6_K bit for bit the `gguf` package's; a small
random LLaMA written as a K-quant GGUF (Q4_K, Q5_K and Q6_K matrices, a Q6_K tied embedding: the mix of a
Q4_K_M file) converted with its K-quant blocks kept and multiplied by our kernels, against transformers reading
the same file with its own GGUF reader; and the Llama 3.1 `rope_freqs` tensor refused by name. (A `llama`
sentencepiece tokenizer is refused by name in tests/test_gguf.py, test_unsupported_tokenizer_model.)

Neither the gguf package nor we quantize to K-quants: the matrices are random valid super-blocks
(tests/kquant_blocks.py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from kquant_blocks import random_k_blocks
from test_gguf import MERGES, gguf_name, llamacpp_permute, tiny_vocab

from mstriton.model.gguf import GGUFError, dequantize, read_gguf

K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_package(qtype):
    rng = np.random.default_rng(int(qtype))
    stored = random_k_blocks(qtype.name, 5, 3 * 256, rng, scale=0.05)
    stored[0, :] = 0  # an all-zero super-block row (d = dmin = 0)
    reference = np.asarray(gguf.quants.dequantize(stored, qtype), dtype=np.float32)
    ours = dequantize(stored, qtype)
    assert ours.dtype == np.float32 and ours.shape == (5, 3 * 256)
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))
    flat = stored.reshape(-1)
    np.testing.assert_array_equal(dequantize(flat, int(qtype), (5, 768)).view(np.uint32), reference.view(np.uint32))


# ---- a small K-quant LLaMA -----------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 512, 2
# the types of a Q4_K_M file (llama-quantize: Q6_K for the embeddings/head and some ffn_down) and a Q5_K layer;
# every fused matrix's parts in one type, so that every matrix keeps the file's blocks and the engine computes
# with exactly the values transformers reads
TYPES = {"token_embd": T.Q6_K,
         "blk.0.attn_q": T.Q4_K, "blk.0.attn_k": T.Q4_K, "blk.0.attn_v": T.Q4_K, "blk.0.attn_output": T.Q4_K,
         "blk.0.ffn_gate": T.Q4_K, "blk.0.ffn_up": T.Q4_K, "blk.0.ffn_down": T.Q6_K,
         "blk.1.attn_q": T.Q5_K, "blk.1.attn_k": T.Q5_K, "blk.1.attn_v": T.Q5_K, "blk.1.attn_output": T.Q6_K,
         "blk.1.ffn_gate": T.Q5_K, "blk.1.ffn_up": T.Q5_K, "blk.1.ffn_down": T.Q4_K}


def shapes(vocab: int) -> dict[str, tuple[int, int]]:
    head = HIDDEN // HEADS
    out = {"token_embd": (vocab, HIDDEN)}
    for i in range(LAYERS):
        out.update({f"blk.{i}.attn_q": (HEADS * head, HIDDEN), f"blk.{i}.attn_k": (KV_HEADS * head, HIDDEN),
                    f"blk.{i}.attn_v": (KV_HEADS * head, HIDDEN), f"blk.{i}.attn_output": (HIDDEN, HEADS * head),
                    f"blk.{i}.ffn_gate": (FFN, HIDDEN), f"blk.{i}.ffn_up": (FFN, HIDDEN),
                    f"blk.{i}.ffn_down": (HIDDEN, FFN)})
    return out


def write_k_gguf(path: Path, extra_tensors: dict[str, np.ndarray] | None = None) -> None:
    tokens, types = tiny_vocab()
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for name, shape in shapes(len(tokens)).items():
        qtype = TYPES[name]
        if qtype == T.F32:
            w.add_tensor(name + ".weight", (0.05 * rng.standard_normal(shape)).astype(np.float32))
        else:
            w.add_tensor(name + ".weight", random_k_blocks(qtype.name, shape[0], shape[1], rng, scale=2e-4),
                         raw_dtype=qtype)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_k_quant_matrices_are_read_and_kept_as_blocks(tmp_path):
    path = tmp_path / "k.gguf"
    write_k_gguf(path)
    model = read_gguf(path, progress=None)
    assert model.tensor_types["model.layers.0.mlp.down_proj.weight"] == "Q6_K"
    assert model.tensor_types["model.layers.1.self_attn.q_proj.weight"] == "Q5_K"
    kept = model.blocks["model.layers.0.self_attn.q_proj.weight"]  # rows un-permuted like the float32 tensor
    np.testing.assert_array_equal(dequantize(kept, T.Q4_K), model.tensors["model.layers.0.self_attn.q_proj.weight"])
    assert model.blocks["model.layers.1.self_attn.o_proj.weight"].shape == (HIDDEN, HIDDEN // 256 * 210)


def test_a_fused_matrix_of_mixed_types_is_quantized_as_a_whole():
    from mstriton.config import LlamaConfig
    from mstriton.engine.weight_formats import pack_engine_weights

    config = LlamaConfig(vocab_size=300, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    parts = {"q_proj": (HIDDEN, T.Q4_K), "k_proj": (HIDDEN // 2, T.Q4_K), "v_proj": (HIDDEN // 2, T.Q6_K),
             "o_proj": (HIDDEN, T.Q5_K)}
    blocks, types, weights = {}, {}, {}
    for part, (rows, qtype) in parts.items():
        name = f"model.layers.0.self_attn.{part}.weight"
        blocks[name] = random_k_blocks(qtype.name, rows, HIDDEN, rng)
        types[name] = qtype.name
    weights["layers.0.wqkv"] = np.concatenate([dequantize(blocks[f"model.layers.0.self_attn.{p}.weight"], parts[p][1])
                                               for p in ("q_proj", "k_proj", "v_proj")]).T
    weights["layers.0.wo"] = dequantize(blocks["model.layers.0.self_attn.o_proj.weight"], T.Q5_K).T
    weights["layers.0.w_gate_up"] = rng.standard_normal((HIDDEN, 2 * FFN)).astype(np.float32)
    weights["layers.0.w_down"] = rng.standard_normal((FFN, HIDDEN)).astype(np.float32)
    weights["lm_head"] = rng.standard_normal((HIDDEN, 300)).astype(np.float32)
    out, formats = pack_engine_weights(config, weights, "Q4_1", blocks, types, progress=lambda _: None)
    assert formats["layers.0.wqkv"] == "Q4_1" and formats["layers.0.wo"] == "Q5_K"
    np.testing.assert_array_equal(out["layers.0.wo"], blocks["model.layers.0.self_attn.o_proj.weight"])


def test_rope_freqs_refused_by_name(tmp_path):
    path = tmp_path / "rope.gguf"
    write_k_gguf(path, {"rope_freqs.weight": np.ones(HIDDEN // HEADS // 2, np.float32)})
    with pytest.raises(GGUFError, match=r"tensor 'rope_freqs\.weight'.*not supported"):
        read_gguf(path, progress=None)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import engine_of
    from mstriton.convert import convert

    folder = tmp_path_factory.mktemp("kquants")
    path = folder / "k.gguf"
    write_k_gguf(path)
    lines: list[str] = []
    convert(path, "kq", folder / "repo", max_batch_size=1, max_seq_len=64, prefill_chunk=16, weights="Q4_1",
            activations="float32", progress=lines.append)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32).eval()
    return engine_of(folder / "repo", "kq"), reference, lines


def test_converted_engine_keeps_the_k_quant_blocks(converted):
    from mstriton.engine.engine import Engine  # noqa: F401
    _, _, lines = converted
    assert any("9 of 9 matrices keep the GGUF file's own blocks" in line for line in lines), lines


def test_logits_equal_transformers_reading_the_same_file(converted):
    from conftest import logit_errors
    engine, reference, _ = converted
    prompt = [5, 80, 17, 200, 3, 41, 9, 120, 66, 7, 150, 31, 12, 90, 100, 4, 60, 22, 8, 77]  # 20 > the chunk: 2 chunks
    errors = logit_errors(engine, reference, prompt, steps=8)
    assert max(errors) < 1e-4, errors
