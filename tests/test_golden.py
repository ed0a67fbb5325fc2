"""Our MindIR prefill and decode graphs against Hugging Face transformers (PyTorch CPU, float32) on the same
random weights: logits within 1e-4 relative error, identical greedy tokens, batches equal to single runs.
Prompts longer than 16 tokens prefill in chunks, shorter ones whole: both paths meet the same bounds.

Besides plain LLaMA: llama3 and linear rope scaling, attention and MLP biases, a head_dim apart from
hidden_size / num_attention_heads, and Qwen2 (q/k/v biases)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import cache_hit_errors, copy_test_hf_tokenizer, engine_of, greedy_reference, logit_errors, \
    save_random_hf_qwen2

# llama3 scaling with an original context of 64: with head_dim 16 and theta 10000 the wavelengths are 6.3, 20, 63,
# 199, ... so one frequency pair is kept (< 64/4), two are blended (between 16 and 64) and five are divided by 4.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=96),
    "mqa-rope500k-odd-vocab": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                                   vocab_size=101),
    "llama3-rope-biases": dict(num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
                               attention_bias=True, mlp_bias=True, eos_token_id=[2, 3]),
    # q is 4 x 24 = 96 wide, wider than hidden_size 64
    "linear-rope-head-dim-24": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
}
QWEN2_CONFIGS = {"qwen2-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_theta=1000000.0)}
SCALED = ["llama3-rope-biases", "linear-rope-head-dim-24"]
PROMPTS = [[1, 5, 9, 22, 7], [1, 40, 3], [1] + list(range(10, 47)), [1, 17]]


@pytest.fixture(scope="session")
def checkpoint(hf_checkpoint_factory, tmp_path_factory):
    """A random transformers checkpoint folder per config name (each built once)."""
    qwen2 = {}

    def make(key):
        if key in CONFIGS:
            return hf_checkpoint_factory(key, **CONFIGS[key])
        if key not in qwen2:
            folder = save_random_hf_qwen2(tmp_path_factory.mktemp(f"hf-{key}"), **QWEN2_CONFIGS[key])
            copy_test_hf_tokenizer(folder)
            qwen2[key] = folder
        return qwen2[key]

    return make


@pytest.fixture(scope="module", params=list(CONFIGS) + list(QWEN2_CONFIGS))
def case(request, checkpoint, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    from mstriton.convert import convert

    folder = checkpoint(request.param)
    repo = tmp_path_factory.mktemp(f"repo-{request.param}")
    # Chunks of 16 tokens: the 38-token prompt prefills in three chunks, the others whole.
    convert(folder, "tiny", repo, max_batch_size=4, max_seq_len=128, prefill_chunk=16, progress=lambda _: None)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    return engine_of(repo, "tiny"), reference


def test_prefill_and_16_decode_steps_match_transformers(case):
    engine, reference = case
    for prompt in PROMPTS[:3]:
        errors = logit_errors(engine, reference, prompt)
        assert max(errors) < 1e-4, f"prompt of {len(prompt)} tokens: relative errors per step {errors}"


def test_greedy_32_tokens_identical_to_transformers(case):
    from mstriton.engine.engine import greedy_generate

    engine, reference = case
    for prompt in PROMPTS:
        expected, _ = greedy_reference(reference, prompt, 32)
        (ours,) = greedy_generate(engine, [prompt], 32)
        assert ours == expected, f"prompt {prompt}"


def test_mixed_length_batch_equals_single_runs(case):
    from mstriton.engine.engine import greedy_generate

    engine, reference = case
    lengths = [32, 7, 20, 32]  # sequences leave at different steps, so slots move while others run
    singles = [greedy_generate(engine, [p], n)[0] for p, n in zip(PROMPTS, lengths)]
    batched = greedy_generate(engine, PROMPTS, lengths)
    assert batched == singles
    for prompt, n, ours in zip(PROMPTS, lengths, batched):
        assert ours == greedy_reference(reference, prompt, n)[0]
    assert engine.blocks.num_used == 0 and not engine.running
    engine.blocks.check()


def test_the_disaggregated_shape_generates_what_the_colocated_one_does(case, tmp_path):
    from test_handover import colocated, disaggregated

    engine, _ = case
    assert disaggregated(engine.graphs, tmp_path, PROMPTS, 16) == colocated(engine.graphs, PROMPTS, 16)


def test_a_prefix_cache_hit_gives_the_logits_of_a_cold_run(case):
    engine, _ = case
    shared = [1] + list(range(10, 50))  # 41 tokens: two full blocks of 16 come from the cache
    errors = cache_hit_errors(engine, shared, ([5, 6, 7], [9, 22, 7, 3]))
    assert max(errors) <= 1e-5, errors


# ---- what the golden configs exercise (so that the tests above cannot pass vacuously) ---------------------------

@pytest.mark.parametrize("key", SCALED)
def test_scaled_rope_tables_equal_transformers_and_differ_from_plain(key, checkpoint):
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mstriton.config import LlamaConfig
    from mstriton.model.llama import rope_inv_freq, rope_tables

    folder = checkpoint(key)
    config = LlamaConfig.from_file(folder)
    assert config.rope_scaling.rope_type == CONFIGS[key]["rope_scaling"]["rope_type"]
    cos, sin = rope_tables(config)
    rotary = LlamaRotaryEmbedding(AutoConfig.from_pretrained(folder))
    positions = torch.arange(config.max_position_embeddings)[None]
    their_cos, their_sin = (t[0].numpy() for t in rotary(torch.zeros(1, dtype=torch.float32), positions))
    np.testing.assert_allclose(cos, their_cos, atol=1e-4)  # float32 angles up to 255 rad differ by ~2e-5
    np.testing.assert_allclose(sin, their_sin, atol=1e-4)

    plain = dataclasses.replace(config, rope_scaling=None)
    plain_cos, _ = rope_tables(plain)
    assert np.abs(cos - plain_cos).max() > 0.5  # far from a rounding difference
    ratio = rope_inv_freq(plain) / rope_inv_freq(config)
    if key.startswith("llama3"):  # kept, blended and interpolated frequencies all occur
        assert np.isclose(ratio, 1.0).sum() == 1 and np.isclose(ratio, 4.0).sum() == 5
        assert ((ratio > 1.01) & (ratio < 3.99)).sum() == 2
    else:
        np.testing.assert_allclose(ratio, 2.0)


def test_golden_configs_read_back_with_every_new_field(checkpoint):
    from mstriton.config import LlamaConfig, RopeScaling
    from mstriton.model.llama import layer_weight_names

    llama3 = LlamaConfig.from_file(checkpoint("llama3-rope-biases"))
    assert llama3.rope_scaling == RopeScaling("llama3", 4.0, 1.0, 4.0, 64)
    assert (llama3.attention_bias, llama3.mlp_bias, llama3.o_proj_bias) == (True, True, True)
    assert (llama3.eos_token_id, llama3.eos_token_ids) == (2, (2, 3))
    assert layer_weight_names(llama3) == ("attention_norm", "wqkv", "bqkv", "wo", "bo", "ffn_norm", "w_gate_up",
                                          "b_gate_up", "w_down", "b_down")
    wide = LlamaConfig.from_file(checkpoint("linear-rope-head-dim-24"))
    assert (wide.head_dim, wide.rope_scaling) == (24, RopeScaling("linear", 2.0))
    qwen2 = LlamaConfig.from_file(checkpoint("qwen2-tied"))
    assert (qwen2.model_type, qwen2.attention_bias, qwen2.o_proj_bias, qwen2.mlp_bias) == ("qwen2", True, False, False)
    assert qwen2.tie_word_embeddings and qwen2.rope_theta == 1e6
    assert layer_weight_names(qwen2) == ("attention_norm", "wqkv", "bqkv", "wo", "ffn_norm", "w_gate_up", "w_down")
    plain = LlamaConfig.from_file(checkpoint("mha"))
    assert layer_weight_names(plain) == ("attention_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")
    for config in (llama3, wide, qwen2, plain):  # what an engine's manifest keeps and EngineGraphs reads back
        assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
