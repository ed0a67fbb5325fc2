"""The real pretrained model, engine level: SmolLM2-135M-Instruct converted from its GGUF file into our MindIR
graphs twice, as float32 (its Q4_1 / Q8_0 blocks dequantized by our reader, MindSpore's MatMul) and as Q4_1 (the
file's own blocks kept and multiplied by the CPU kernels), against transformers reading the same file with its
own GGUF reader (PyTorch CPU, float32). Logits of prefill and 16 decode steps within 1e-4 relative error, and
64 greedy tokens identical, for a chat-templated question, a Chinese-and-emoji text, and a prompt longer than
the prefill chunk (which prefills in chunks)."""

from __future__ import annotations

import pytest

from conftest import cache_hit_errors, engine_of, greedy_reference, logit_errors
from mstriton.pretrained import smollm2_gguf

CHUNK = 32  # the long prompt below (79 tokens) prefills in three chunks
LONG_TEXT = ("Triton Inference Server runs models from many frameworks behind one set of HTTP and gRPC endpoints. "
             "Its dynamic batcher merges requests that arrive close together, and its ensembles chain models so "
             "that pre- and post-processing run beside the network. MindSpore exports graphs to MindIR, which a "
             "serving process loads and runs without the Python code that defined them. Together they serve")


@pytest.fixture(scope="module", params=["float32", "Q4_1"])
def models(request, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mstriton.convert import convert

    path = smollm2_gguf()
    repo = tmp_path_factory.mktemp("smollm2-engine")
    convert(path, "smollm2", repo, max_batch_size=1, max_seq_len=256, prefill_chunk=CHUNK, weights=request.param,
            progress=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return engine_of(repo, "smollm2"), reference, tokenizer


def prompts(tokenizer) -> dict[str, list[int]]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_dict=True)["input_ids"]
    cases = {"chat question": list(chat),
             "chinese and emoji": tokenizer("MindSpore 图模式在昇腾上运行 🚀🎉，然后", add_special_tokens=False)["input_ids"],
             "longer than the prefill chunk": tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]}
    assert len(cases["longer than the prefill chunk"]) > 2 * CHUNK
    return cases


def test_prefill_and_16_decode_steps_match_transformers(models):
    engine, reference, tokenizer = models
    for name, prompt in prompts(tokenizer).items():
        errors = logit_errors(engine, reference, prompt)
        assert max(errors) < 1e-4, f"{name}: relative errors per step {errors}"


def test_64_greedy_tokens_identical_to_transformers(models):
    from mstriton.engine.engine import greedy_generate

    engine, reference, tokenizer = models
    for name, prompt in prompts(tokenizer).items():
        expected, _ = greedy_reference(reference, prompt, 64)
        (ours,) = greedy_generate(engine, [prompt], 64)
        assert ours == expected, f"{name}: ours {tokenizer.decode(ours)!r}, transformers {tokenizer.decode(expected)!r}"


def test_the_model_answers_the_question(models):
    """Not only agreement: the converted model knows the answer (what transformers answers with on this file)."""
    from mstriton.engine.engine import greedy_generate

    engine, _, tokenizer = models
    (ours,) = greedy_generate(engine, [prompts(tokenizer)["chat question"]], 12)
    assert tokenizer.decode(ours, skip_special_tokens=True).startswith("The capital of France is Paris.")


def test_a_prefix_cache_hit_gives_the_logits_of_a_cold_run(models):
    """Two chat turns sharing a system prompt: the second's cached blocks give the logits of a cold run."""
    engine, _, tokenizer = models
    system = tokenizer(LONG_TEXT, add_special_tokens=False)["input_ids"]
    tails = tuple(tokenizer(q, add_special_tokens=False)["input_ids"] for q in (" What is Triton?", " And MindIR?"))
    errors = cache_hit_errors(engine, system, tails)
    assert max(errors) <= 1e-5, errors
