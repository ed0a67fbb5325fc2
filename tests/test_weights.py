"""Loading checkpoints: sharded and bfloat16 safetensors, MindSpore .ckpt (Hugging Face and MindFormers names),
biased projections (LLaMA's attention_bias/mlp_bias, Qwen2), and the errors for a missing tensor, a wrong shape or
an unsupported architecture."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import save_random_hf_llama, save_random_hf_qwen2
from mstriton.model.weights import (WeightError, hf_shapes, load_checkpoint, read_hf_folder,
                                    read_safetensors)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_random_hf_llama(tmp_path_factory.mktemp("hf"), num_key_value_heads=2)


@pytest.fixture(scope="module")
def reference(hf_folder):
    return load_checkpoint(hf_folder)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path, hf_folder, reference):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(hf_folder).save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    config, weights = load_checkpoint(tmp_path)
    assert config == reference[0]
    for name, array in reference[1].items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)


def test_missing_shard_is_named(tmp_path, hf_folder):
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(hf_folder).save_pretrained(tmp_path, max_shard_size="50KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(WeightError, match=victim.name):
        load_checkpoint(tmp_path)


def test_bfloat16_safetensors_widen_exactly(tmp_path, hf_folder):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_folder).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path / "model.safetensors")
    expected = model.model.embed_tokens.weight.float().detach().numpy()
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], expected)


def _as_ckpt(folder, tensors, tmp_path):
    import mindspore as ms

    shutil.copy(folder / "config.json", tmp_path / "config.json")
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in tensors.items()],
                       str(tmp_path / "model.ckpt"))
    return tmp_path


def test_mindspore_ckpt_with_hf_names(tmp_path, hf_folder, reference):
    _, weights = load_checkpoint(_as_ckpt(hf_folder, read_hf_folder(hf_folder), tmp_path))
    for name, array in reference[1].items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)


def test_mindspore_ckpt_with_mindformers_names(tmp_path, hf_folder, reference):
    renames = {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
               "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
               "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
               "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight",
               "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
               "model.norm.weight": "model.norm_out.weight"}
    tensors = {}
    for name, array in read_hf_folder(hf_folder).items():
        for hf, mf in renames.items():
            if name.endswith(hf):
                name = name[:-len(hf)] + mf
                break
        tensors[name] = array
    _, weights = load_checkpoint(_as_ckpt(hf_folder, tensors, tmp_path))
    for name, array in reference[1].items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)


def test_missing_tensor_is_named(tmp_path, hf_folder):
    tensors = read_hf_folder(hf_folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_checkpoint(_as_ckpt(hf_folder, tensors, tmp_path))


def test_wrong_shape_is_named(tmp_path, hf_folder):
    tensors = read_hf_folder(hf_folder)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*\[3, 3\].*\[32, 64\]"):
        load_checkpoint(_as_ckpt(hf_folder, tensors, tmp_path))


def test_unsupported_architecture_is_named(tmp_path, hf_folder):
    shutil.copytree(hf_folder, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="unsupported architecture.*MistralForCausalLM"):
        load_checkpoint(tmp_path / "m")


def test_hf_shapes_follow_the_config(reference):
    config, _ = reference
    shapes = hf_shapes(config)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (2 * config.head_dim, config.hidden_size)


# ---- biases and head_dim ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def biased_folder(tmp_path_factory):
    return save_random_hf_llama(tmp_path_factory.mktemp("hf-biased"), num_key_value_heads=2, head_dim=24,
                                attention_bias=True, mlp_bias=True)


def test_plain_models_keep_their_weight_names_and_order(reference):
    _, weights = reference
    per_layer = ["attention_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down"]
    assert list(weights) == [f"layers.{i}.{n}" for i in range(2) for n in per_layer] + \
        ["embed_tokens", "norm", "lm_head"]


def test_biases_are_fused_like_their_matrices(biased_folder):
    config, weights = load_checkpoint(biased_folder)
    hf = read_hf_folder(biased_folder)
    assert (config.head_dim, config.attention_bias, config.mlp_bias) == (24, True, True)
    assert set(hf) == set(hf_shapes(config))  # no tensor left unread
    per_layer = ["attention_norm", "wqkv", "bqkv", "wo", "bo", "ffn_norm", "w_gate_up", "b_gate_up", "w_down",
                 "b_down"]
    assert list(weights)[:10] == [f"layers.0.{n}" for n in per_layer]
    p = "model.layers.1."
    np.testing.assert_array_equal(weights["layers.1.bqkv"], np.concatenate(
        [hf[p + "self_attn.q_proj.bias"], hf[p + "self_attn.k_proj.bias"], hf[p + "self_attn.v_proj.bias"]]))
    np.testing.assert_array_equal(weights["layers.1.bo"], hf[p + "self_attn.o_proj.bias"])
    np.testing.assert_array_equal(weights["layers.1.b_gate_up"], np.concatenate(
        [hf[p + "mlp.gate_proj.bias"], hf[p + "mlp.up_proj.bias"]]))
    np.testing.assert_array_equal(weights["layers.1.b_down"], hf[p + "mlp.down_proj.bias"])
    # q is num_heads * head_dim = 96 wide, o_proj maps it back to hidden_size 64
    assert weights["layers.0.wqkv"].shape == (64, 96 + 2 * 48) and weights["layers.0.wo"].shape == (96, 64)
    assert hf_shapes(config)["model.layers.0.self_attn.o_proj.weight"] == (64, 96)


def test_missing_bias_is_named(tmp_path, biased_folder):
    tensors = read_hf_folder(biased_folder)
    del tensors["model.layers.1.mlp.down_proj.bias"]
    with pytest.raises(WeightError, match=r"lacks tensor 'model\.layers\.1\.mlp\.down_proj\.bias'.*mlp_bias=True"):
        load_checkpoint(_as_ckpt(biased_folder, tensors, tmp_path))


def test_mindformers_names_with_biases(tmp_path, biased_folder):
    renames = {"self_attn.q_proj.": "attention.wq.", "self_attn.k_proj.": "attention.wk.",
               "self_attn.v_proj.": "attention.wv.", "self_attn.o_proj.": "attention.wo.",
               "mlp.gate_proj.": "feed_forward.w1.", "mlp.down_proj.": "feed_forward.w2.",
               "mlp.up_proj.": "feed_forward.w3.", "input_layernorm.": "attention_norm.",
               "post_attention_layernorm.": "ffn_norm.", "model.norm.weight": "model.norm_out.weight",
               "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight"}
    tensors = {}
    for name, array in read_hf_folder(biased_folder).items():
        for hf, mf in renames.items():
            name = name.replace(hf, mf)
        tensors[name] = array
    _, expected = load_checkpoint(biased_folder)
    _, weights = load_checkpoint(_as_ckpt(biased_folder, tensors, tmp_path))
    assert list(weights) == list(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)


def test_qwen2_has_qkv_biases_only(tmp_path):
    folder = save_random_hf_qwen2(tmp_path, num_key_value_heads=2, tie_word_embeddings=True)
    config, weights = load_checkpoint(folder)
    hf = read_hf_folder(folder)
    assert config.model_type == "qwen2" and set(hf) == set(hf_shapes(config))  # no tensor left unread
    assert [n.split(".", 2)[2] for n in weights if n.startswith("layers.0.")] == [
        "attention_norm", "wqkv", "bqkv", "wo", "ffn_norm", "w_gate_up", "w_down"]
    np.testing.assert_array_equal(weights["layers.0.bqkv"][:64], hf["model.layers.0.self_attn.q_proj.bias"])
    np.testing.assert_array_equal(weights["lm_head"], hf["model.embed_tokens.weight"].T)
