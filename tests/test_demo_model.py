"""The demo model: trained with MindSpore, exported as a Hugging Face folder, converted and served by our engine.

The model is built once for this module (one to three minutes on 2 cores) unless ``build/demo_model`` already
holds one trained with the default settings on the current corpus - the folder ``make run`` serves - which is then
reused (``tools/make_demo_model.py --out build/demo_model --if-stale`` brings it up to date).
``MSTRITON_DEMO_MODEL=DIR`` tests the given folder instead (for instance one trained with fewer steps, to see the
memorization test fail).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

PREFIX_WORDS = 8      # a prompt is the first words of a sentence of the corpus ...
EXPECTED_WORDS = 12   # ... and the greedy continuation must give back the corpus's next words
N_PROMPTS = 6
SPARE_TOKENS = 4      # generated beyond the tokens of the expected words themselves (their count varies: 12 words
                      # of prose are about 18 tokens, of `SERVE_ARGS=--expose-triton` markup over 40)
SHARED_MODEL = REPO_ROOT / "build" / "demo_model"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    if os.environ.get("MSTRITON_DEMO_MODEL"):
        return Path(os.environ["MSTRITON_DEMO_MODEL"])
    from mstriton.demo.train import build_demo_model, is_current

    if is_current(SHARED_MODEL):
        return SHARED_MODEL

    folder = tmp_path_factory.mktemp("demo") / "demo_model"
    build_demo_model(folder, progress=lambda message: print(f"[demo model] {message}", flush=True))
    return folder


@pytest.fixture(scope="module")
def engine(demo_model, tmp_path_factory):
    from mstriton.convert import convert
    from mstriton.engine.engine import Engine
    from mstriton.engine.graphs import EngineGraphs

    repo = tmp_path_factory.mktemp("demo-repository")
    convert(demo_model, "demo", repo, max_batch_size=4, max_seq_len=128, progress=lambda _: None)
    return Engine(EngineGraphs(repo / "demo_decode" / "1" / "engine"))


@pytest.fixture(scope="module")
def sp(demo_model):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(demo_model / "tokenizer.model"))


def sentence_starts(corpus: str, count: int = N_PROMPTS) -> list[tuple[str, list[str]]]:
    """`count` prompts spread over the corpus: (first PREFIX_WORDS words of a sentence, the EXPECTED_WORDS words
    that follow in the corpus). Only prefixes that occur once in the corpus qualify, so that the continuation
    is determined."""
    from mstriton.demo.corpus import corpus_sentences

    words = corpus.split()
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - PREFIX_WORDS + 1):
        key = tuple(words[i:i + PREFIX_WORDS])
        counts[key] = counts.get(key, 0) + 1
    eligible, position = [], 0
    for sentence in corpus_sentences(corpus):
        n = len(sentence.split())
        prefix = words[position:position + PREFIX_WORDS]
        assert sentence.split()[:PREFIX_WORDS] == prefix[:n], "sentences must tile the corpus's words"
        follow = words[position + PREFIX_WORDS:position + PREFIX_WORDS + EXPECTED_WORDS]
        if n >= PREFIX_WORDS and len(follow) == EXPECTED_WORDS and counts[tuple(prefix)] == 1:
            eligible.append((" ".join(prefix), follow))
        position += n
    assert position == len(words)
    assert len(eligible) >= count, f"only {len(eligible)} usable sentence starts in the corpus"
    return [eligible[round(i * (len(eligible) - 1) / (count - 1))] for i in range(count)]


# ---- fast checks that need no trained model ------------------------------------------------------------------

def test_corpus_is_deterministic_bounded_and_covers_the_package(tmp_path):
    from mstriton.demo.corpus import MAX_WORDS, build_corpus, corpus_sentences

    corpus = build_corpus()
    assert corpus == build_corpus()
    assert 2000 < len(corpus.split()) <= MAX_WORDS
    assert "Continuous batching means" in corpus  # the fixed text
    assert "The module mstriton.config is documented as follows." in corpus  # the docstrings
    assert [w for s in corpus_sentences(corpus) for w in s.split()] == corpus.split()

    # A README joins the corpus without its code blocks and tables, and an endless one is cut.
    (tmp_path / "README.md").write_text("# Title here\n\nSome words\nacross lines.\n\n```\ncode block\n```\n" +
                                        "| a table | cell |\n|---|---|\n" + "More words. " * 10000)
    (tmp_path / "mstriton").mkdir()
    (tmp_path / "mstriton" / "x.py").write_text('"""Doc of x."""\n')
    small = build_corpus(tmp_path)
    assert "Title here\n\nSome words across lines.\n\n" in small and "code block" not in small
    assert "table" not in small and "|" not in small
    assert "The module mstriton.x is documented as follows.\n\nDoc of x.\n" in small
    assert len(small.split()) <= MAX_WORDS


def test_hf_export_is_the_inverse_of_loading():
    """to_hf_tensors splits the fused [in, out] matrices so that the loader's fusing gives them back."""
    from mstriton.config import LlamaConfig
    from mstriton.demo.train import initial_weights, to_hf_tensors
    from mstriton.model.weights import hf_shapes, to_network_layout

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(3)
    weights = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in initial_weights(config, 0).items()}
    hf = to_hf_tensors(config, weights)
    assert {k: v.shape for k, v in hf.items()} == hf_shapes(config)
    back = to_network_layout(config, hf)
    assert back.keys() == weights.keys()
    for name in weights:
        np.testing.assert_array_equal(back[name], weights[name], err_msg=name)
    # q, k and v are the column blocks q|k|v of wqkv: the first k column is k_proj's first row.
    np.testing.assert_array_equal(hf["model.layers.0.self_attn.k_proj.weight"][0], weights["layers.0.wqkv"][:, 32])
    np.testing.assert_array_equal(hf["model.layers.1.mlp.up_proj.weight"][0], weights["layers.1.w_gate_up"][:, 48])


# ---- the trained model ----------------------------------------------------------------------------------------

def test_folder_contents_and_tokenizer(demo_model, sp):
    config = json.loads((demo_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert sp.unk_id() == 0 and sp.pad_id() == -1
    assert config["vocab_size"] == sp.get_piece_size() and 1000 <= sp.get_piece_size() <= 2000
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert json.loads((demo_model / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    for text in ["MindSpore 在 Triton 上运行 🚀", "two  spaces,\ttab and\nnewline", "naïve café ∑"]:
        assert sp.decode(sp.encode(text)) == text


def test_transformers_loads_the_folder_and_agrees_with_our_engine(demo_model, engine, sp):
    import torch
    from transformers import LlamaForCausalLM

    from mstriton.engine.engine import greedy_generate

    corpus = (demo_model / "corpus.txt").read_text(encoding="utf-8")
    model = LlamaForCausalLM.from_pretrained(demo_model).eval()
    model.generation_config.eos_token_id = None
    for prefix, _ in sentence_starts(corpus, 3):
        prompt = [sp.bos_id()] + sp.encode(prefix)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                    pad_token_id=0)[0, len(prompt):].tolist()
            reference_logits = model(ids).logits[0, -1].numpy()
        (ours,) = greedy_generate(engine, [prompt], 24)
        assert ours == theirs, f"prompt {prefix!r}: ours {sp.decode(ours)!r}, transformers {sp.decode(theirs)!r}"
        # the prompt's blocks are in the prefix cache now: this prefill reuses them and computes its last block
        (sequence,), logits = engine.prefill_prompts([prompt])
        engine.release(sequence)
        error = np.abs(logits[0] - reference_logits).max() / np.abs(reference_logits).max()
        assert error < 1e-4, f"prompt {prefix!r}: last-position logits differ by {error:.2e} (relative)"


def test_served_model_continues_sentences_of_its_corpus(demo_model, engine, sp):
    from mstriton.engine.engine import greedy_generate

    corpus = (demo_model / "corpus.txt").read_text(encoding="utf-8")
    cases = sentence_starts(corpus)
    prompts = [[sp.bos_id()] + sp.encode(prefix) for prefix, _ in cases]
    new_tokens = [len(sp.encode(prefix + " " + " ".join(expected))) - len(sp.encode(prefix)) + SPARE_TOKENS
                  for prefix, expected in cases]
    outputs = greedy_generate(engine, prompts, new_tokens)  # 6 prompts through 4 slots: continuous batching
    failures = []
    for (prefix, expected), tokens in zip(cases, outputs):
        got = sp.decode(tokens).split()[:EXPECTED_WORDS]
        if got != expected:
            failures.append(f"{prefix!r}\n    expected: {' '.join(expected)!r}\n    got:      {' '.join(got)!r}")
    assert not failures, f"{len(failures)} of {len(cases)} continuations differ from the corpus:\n" + \
        "\n".join(failures)
