"""Our MindIR prefill and decode graphs against Hugging Face transformers (PyTorch CPU, float32) on the same
random weights: logits within 1e-4 relative error, identical greedy tokens, batches equal to single runs.
Prompts longer than 16 tokens prefill in chunks, shorter ones whole: both paths meet the same bounds."""

from __future__ import annotations

import pytest

from conftest import greedy_reference, relative_error

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=96),
    "mqa-rope500k-odd-vocab": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                                   vocab_size=101),
}
PROMPTS = [[1, 5, 9, 22, 7], [1, 40, 3], [1] + list(range(10, 47)), [1, 17]]


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, hf_checkpoint_factory, tmp_path_factory):
    from transformers import LlamaForCausalLM
    from mstriton.convert import convert
    from mstriton.engine.engine import Engine
    from mstriton.engine.graphs import EngineGraphs

    folder = hf_checkpoint_factory(request.param, **CONFIGS[request.param])
    repo = tmp_path_factory.mktemp(f"repo-{request.param}")
    # Chunks of 16 tokens: the 38-token prompt prefills in three chunks, the others whole.
    convert(folder, "tiny", repo, max_batch_size=4, max_seq_len=128, prefill_chunk=16, progress=lambda _: None)
    prefill = EngineGraphs(repo / "tiny_prefill" / "1" / "engine")
    decode = EngineGraphs(repo / "tiny_decode" / "1" / "engine")
    # One EngineGraphs runs both here: the test process holds all graphs (the served models split them).
    decode.manifest["prefill"] = str(prefill.dir / prefill.manifest["prefill"])
    decode.manifest["prefill_chunk"]["file"] = str(prefill.dir / prefill.manifest["prefill_chunk"]["file"])
    reference = LlamaForCausalLM.from_pretrained(folder).eval()
    return Engine(decode), reference


def test_prefill_and_16_decode_steps_match_transformers(case):
    engine, reference = case
    for prompt in PROMPTS[:3]:
        expected_tokens, expected_logits = greedy_reference(reference, prompt, 17)
        (sequence,), logits = engine.prefill([prompt])
        errors = [relative_error(logits[0], expected_logits[0])]
        for step in range(16):
            logits = engine.decode([expected_tokens[step]])
            errors.append(relative_error(logits[0], expected_logits[step + 1]))
        engine.release(sequence)
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
    assert engine.pool.n_active == 0
