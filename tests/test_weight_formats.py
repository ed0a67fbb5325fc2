"""Packed weight formats end to end (--weights bfloat16|int8|Q8_0|Q4_0|Q4_1): converted MindIR graphs running the
CPU kernels as custom operators, against transformers (PyTorch CPU, float32) computing with the very same rounded
weights (each matrix packed and unpacked by kernels/formats.py, whose block formats are the gguf package's own):
logits of prefill and 16 decode steps within 1e-4 relative error and identical greedy tokens, for a tied GQA model
and one with rope scaling and biases, on whole and chunked prompts. The block formats convert as served (int8
activations: their matrices interleaved by 8 channels, Q4_1 -> Q4_1X8) and run here with float32 activations,
the exact path, on that layout; "Q4_1/float32" converts for float32 activations, GGUF's plain layout.

And the graphs' portability: an engine exported here, its MindIR naming the kernel library at a path that does
not exist on this machine (as on another machine or in a container), loads from another folder and gives the same
logits.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import engine_of, greedy_reference, logit_errors
from test_golden import CONFIGS

FORMATS = ["bfloat16", "int8", "Q8_0", "Q4_0", "Q4_1", "Q4_1/float32"]
MODELS = ["gqa-tied", "llama3-rope-biases"]
PROMPTS = [[1, 5, 9, 22, 7], [1] + list(range(10, 47))]  # the second prefills in chunks of 16


def rounded_reference(folder, weights: str):
    """transformers' model of `folder` with every weight matrix (embedding included) replaced by what the packed
    format holds, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from mstriton.engine.weight_formats import KERNEL_FORMATS
    from mstriton.kernels.formats import pack, unpack

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fmt = KERNEL_FORMATS[weights]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:  # [out, in] linear weights and the [vocab, hidden] embedding (tied: the head too)
                w = p.numpy()
                p.copy_(torch.from_numpy(unpack(fmt, pack(fmt, w), w.shape[1])))
    return model


@pytest.fixture(scope="module", params=[(m, f) for m in MODELS for f in FORMATS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, hf_checkpoint_factory, tmp_path_factory):
    from mstriton.convert import convert

    model, choice = request.param
    weights, _, activations = choice.partition("/")
    folder = hf_checkpoint_factory(model, **CONFIGS[model])
    repo = tmp_path_factory.mktemp(f"formats-{model}-{weights}")
    convert(folder, "m", repo, max_batch_size=2, max_seq_len=64, prefill_chunk=16, weights=weights,
            activations=activations or None, progress=lambda _: None)
    return engine_of(repo, "m"), rounded_reference(folder, weights), repo


def test_logits_equal_transformers_on_the_same_rounded_weights(case):
    engine, reference, _ = case
    for prompt in PROMPTS:
        errors = logit_errors(engine, reference, prompt)
        assert max(errors) < 1e-4, f"prompt of {len(prompt)} tokens: relative errors per step {errors}"


def test_greedy_tokens_equal_transformers(case):
    from mstriton.engine.engine import greedy_generate

    engine, reference, _ = case
    for prompt in PROMPTS:
        expected, _ = greedy_reference(reference, prompt, 24)
        (ours,) = greedy_generate(engine, [prompt], 24)
        assert ours == expected


def test_packed_engine_stores_the_packed_bytes(case):
    """The weights file holds the packed matrices (a tied table once, as the LM head): about 2 bytes per weight
    for bfloat16, 1 for int8 and Q8_0, 0.6 for the 4-bit blocks, against float32's 4."""
    import json

    from mstriton.repository import read_config

    engine, reference, repo = case
    manifest = json.loads((repo / "m_decode" / "1" / "engine" / "manifest.json").read_text())
    tied = reference.config.tie_word_embeddings
    assert manifest["weight_aliases"] == ({"embed_tokens": "lm_head"} if tied else {})
    bytes_per_weight = {"bfloat16": 2, "int8": 1.05, "Q8_0": 1.07, "Q4_0": 0.57, "Q4_1": 0.63}[manifest["weights_format"]]
    matrices = sum(p.numel() for name, p in reference.named_parameters() if p.ndim == 2)
    stored = sum(a.nbytes for a in {id(a): a for a in engine.graphs.weight_arrays}.values() if a.ndim == 2)
    assert stored <= matrices * bytes_per_weight + 64 * 1024
    # served with int8 activations (the block formats' default), the matrices of whole groups of 8 rows are
    # interleaved; for float32 activations they keep GGUF's layout
    served = read_config(repo / "m_decode").parameters["kernel_activations"].string_value
    interleaved = manifest["weights_format"] in ("Q8_0", "Q4_0", "Q4_1") and served == "int8"
    assert manifest["weight_formats"]
    for name, fmt in manifest["weight_formats"].items():
        assert fmt.endswith("X8") == interleaved, (name, fmt, served)


LOAD_ELSEWHERE = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from mstriton.engine.graphs import EngineGraphs
graphs = EngineGraphs(sys.argv[2])
logits, _, _ = graphs.prefill(np.array([[1, 5, 9, 22, 7]], np.int32), np.array([5], np.int32))
np.save(sys.argv[3], logits)
"""


def test_graphs_load_from_another_folder_with_the_library_elsewhere(case, tmp_path):
    """What another machine or a container image would hold: the engine in another folder, its graphs naming
    the library where that machine installed it. The loader points them at this installation's library."""
    from pathlib import Path

    from mstriton.kernels import LIBRARY
    from mstriton.kernels.ops import with_library

    engine, _, repo = case
    moved = tmp_path / "elsewhere" / "engine"
    shutil.copytree(repo / "m_decode" / "1" / "engine", moved)
    foreign = "/opt/another/venv/lib/python3.11/site-packages/mstriton/kernels/" + LIBRARY.name
    for graph in moved.glob("*.mindir"):
        graph.chmod(0o644)
        graph.write_bytes(with_library(graph.read_bytes(), foreign))
        assert foreign.encode() in graph.read_bytes() and str(LIBRARY).encode() not in graph.read_bytes()
    out = tmp_path / "logits.npy"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, str(root), str(moved), str(out)], check=True,
                   cwd=tmp_path, timeout=300)
    expected, _, _ = engine.graphs.prefill(np.array([[1, 5, 9, 22, 7]], np.int32), np.array([5], np.int32))
    np.testing.assert_allclose(np.load(out), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model", MODELS)  # the fused decoder layer (no biases) and the separate operators
def test_padding_rows_of_a_batch_bucket_are_skipped_and_change_nothing(model, hf_checkpoint_factory, tmp_path):
    """Three sequences decode in the 4-row graph: the kernels skip its padding row (position -1), and each
    sequence's logits equal those of its run alone, prefill and decode steps."""
    from mstriton.convert import convert

    folder = hf_checkpoint_factory(model, **CONFIGS[model])
    convert(folder, "m", tmp_path, max_batch_size=4, max_seq_len=64, weights="Q4_1", progress=lambda _: None)
    engine = engine_of(tmp_path, "m", enable_prefix_caching=False)
    assert engine.padding_position == -1 and engine.graphs.batch_buckets[:3] == [1, 2, 4]
    prompts = [[1, 5, 9, 22, 7], [1, 3, 4], [1, 8, 8, 8, 2, 11, 13, 17]]

    def run(batch: list[list[int]], steps: int = 6) -> np.ndarray:
        sequences, logits = engine.prefill_prompts(batch)
        out = [logits]
        for _ in range(steps):
            logits = engine.decode(logits.argmax(-1).tolist())
            out.append(logits)
        for sequence in sequences:
            engine.release(sequence)
        return np.stack(out, 1)  # [sequences, steps + 1, vocab]

    together = run(prompts)
    alone = np.concatenate([run([p]) for p in prompts])
    assert np.abs(together - alone).max() / np.abs(alone).max() < 1e-5
