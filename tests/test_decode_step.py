"""The decode step as one kernel operator over one weight blob (engine/weight_blob.py, MstDecodeStep): where it is
used, how the blob is laid out, and that every other graph reads the same memory. Its logits against
transformers are tests/test_weight_formats.py's (its tied model decodes this way; its model with biases does not)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import engine_of
from test_golden import CONFIGS

from mstriton.config import LlamaConfig
from mstriton.engine import weight_blob


def small_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **overrides)
    return LlamaConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], **settings})


def test_offsets_are_aligned_and_a_shared_array_is_stored_once():
    a, b, c = np.ones(10, np.float32), np.ones((3, 70), np.uint8), np.ones(1, np.uint8)
    starts, size = weight_blob.offsets(["a", "b", "a2", "c"], [a, b, a, c])
    assert starts == [0, 64, 0, 64 + 256] and size == 64 + 256 + 64
    blob, views = weight_blob.build(["a", "b", "a2", "c"], [a, b * 7, a, c])
    assert views[0] is views[2]  # one array, one view
    assert all(np.shares_memory(v, blob) for v in views) and blob.ctypes.data % 64 == 0
    assert (views[1] == 7).all() and views[1].shape == (3, 70)


def test_layout_names_each_weight_in_engine_order_with_its_format():
    config = small_config()
    from mstriton.model.llama import weight_names, weight_shapes

    names = weight_names(config)
    shapes = weight_shapes(config)
    formats = {n: "Q8_0" for n in names if len(shapes[n]) == 2}
    arrays = [np.zeros(shapes[n], np.float32) if len(shapes[n]) == 1 else np.zeros((4, 4), np.uint8) for n in names]
    layout = weight_blob.step_layout(config, names, arrays, formats)
    assert layout[:8].tolist() == [1, 2, 64, 8, 2, 8, 160, 96]
    pairs = layout[8:].reshape(-1, 2)
    assert len(pairs) == len(names) == 2 * 6 + 3
    assert [int(f) for f in pairs[:6, 1]] == [-1, 3, 3, -1, 3, 3]  # norms are float32 values
    starts = pairs[:, 0] * 64
    assert (np.diff(starts) > 0).all()
    assert weight_blob.step_supported(config, formats)
    assert not weight_blob.step_supported(config, None)  # MindSpore's own ops (Ascend, GPU, float32 reference)
    mixed = dict(formats, **{"layers.1.wo": "Q4_1"})
    assert not weight_blob.step_supported(config, mixed)  # a layer's matrices in two formats
    biased = small_config(attention_bias=True)
    assert not weight_blob.step_supported(biased, formats)


@pytest.mark.parametrize("model, one_operator", [("gqa-tied", True), ("llama3-rope-biases", False)])
def test_converted_engines_decode_in_one_operator_when_they_can(model, one_operator, hf_checkpoint_factory, tmp_path):
    """A tied model without biases: its decode graphs take the blob (7 inputs), every weight the prefill graphs
    take is a view of the blob, and a few greedy steps run; a model with biases keeps one input per weight."""
    from mstriton.convert import convert

    folder = hf_checkpoint_factory(model, **CONFIGS[model])
    convert(folder, "m", tmp_path, max_batch_size=2, max_seq_len=32, weights="Q8_0", progress=lambda _: None)
    manifest = json.loads((tmp_path / "m_decode" / "1" / "engine" / "manifest.json").read_text())
    assert bool(manifest["decode_step"]) == one_operator
    engine = engine_of(tmp_path, "m")
    graphs = engine.graphs
    if one_operator:
        assert len(graphs.step_inputs) == 2
        assert all(np.shares_memory(a, graphs.blob) for a in graphs.weight_arrays)
        names = manifest["weight_names"]
        assert graphs.weight_arrays[names.index("embed_tokens")] is graphs.weight_arrays[names.index("lm_head")]
    from mstriton import kernels

    (sequence,), logits = engine.prefill_prompts([[1, 5, 9, 22, 7]])
    kernels.step_profile(True)
    try:
        for _ in range(4):
            logits = engine.decode([int(logits.argmax(-1)[0])])
            assert np.isfinite(logits).all() and np.abs(logits).max() > 0
        stages = kernels.step_profile(False)
    finally:
        kernels.step_profile(False)
    engine.release(sequence)
    # the stage clock runs inside the one operator only, and stops when asked
    assert set(stages) == set(kernels.STEP_STAGES)
    assert all(seconds > 0 for seconds in stages.values()) == one_operator
    assert sum(kernels.step_profile().values()) == 0
