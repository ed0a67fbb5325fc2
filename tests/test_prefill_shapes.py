"""The prefill graph runs at few shapes, all compiled at load (issue 25: the decode process's RSS flat after warm-up).

MindSpore keeps memory for every input shape a graph has run at (SmolLM2: about 1.6 MiB per padded token); batches of
whole prompts therefore run as calls of at most graphs.PREFILL_CALL_TOKENS tokens, and warm_up_prefill compiles every
shape such a call can have. Checked here: the shapes' list, that a served engine never runs the prefill graph at a
shape warm-up did not, and that a batch split into calls gives each prompt what it gets alone."""

from __future__ import annotations

import numpy as np

from conftest import engine_of


def test_prefill_calls_stay_within_the_token_budget_and_cover_every_length_bucket():
    from mstriton.engine.buckets import prefill_lengths, prefill_shape
    from mstriton.engine.graphs import PREFILL_CALL_TOKENS, prefill_call_shapes, prefill_rows_per_call

    assert prefill_call_shapes(256, 2048) == [(1, 64), (2, 64), (4, 64), (1, 128), (2, 128), (1, 192), (1, 256)]
    for max_length, max_seq_len in ((256, 2048), (2048, 2048), (128, 128), (40, 40), (500, 500)):
        shapes = prefill_call_shapes(max_length, max_seq_len)
        assert {length for _, length in shapes} == {prefill_shape(1, n, max_seq_len)[1]
                                                    for n in prefill_lengths(max_length)}
        assert all(rows == 1 or rows * length <= PREFILL_CALL_TOKENS for rows, length in shapes)
        # every batch of any size, once split into calls, runs at a listed shape
        for length in {length for _, length in shapes}:
            per_call = prefill_rows_per_call(length)
            for batch in range(1, 40):
                calls = [min(per_call, batch - start) for start in range(0, batch, per_call)]
                assert all((prefill_shape(rows, length, max_seq_len)[0], length) in shapes for rows in calls)


def test_a_served_engine_prefills_only_at_warmed_shapes_and_split_batches_match_single_prompts(
        hf_checkpoint_factory, tmp_path):
    from mstriton.convert import convert
    from mstriton.engine.engine import pad_prompts, warm_up_prefill

    folder = hf_checkpoint_factory("prefill-shapes", max_position_embeddings=256)
    convert(folder, "m", tmp_path, max_batch_size=16, max_seq_len=256, weights="Q8_0", progress=lambda _: None)
    engine = engine_of(tmp_path, "m")
    graphs = engine.graphs
    shapes: list[tuple[int, ...]] = []
    graph = graphs._graph
    prefill_file = graphs.manifest["prefill"]

    def recording(file):
        cell = graph(file)
        if file != prefill_file:
            return cell
        def call(tokens, *rest):
            shapes.append(tuple(tokens.shape))
            return cell(tokens, *rest)
        return call

    graphs._graph = recording
    warm_up_prefill(engine)
    warmed = set(shapes)
    shapes.clear()
    rng = np.random.default_rng(0)
    for count in (1, 3, 5, 9, 16):
        for longest in (10, 64, 100, 200):
            prompts = [rng.integers(3, 100, size=int(rng.integers(1, longest + 1))).tolist() for _ in range(count - 1)]
            prompts.append(rng.integers(3, 100, size=longest).tolist())
            logits, keys, values = graphs.prefill(*pad_prompts(prompts))
            assert logits.shape[0] == count and keys[0].shape[0] == count and values[0].shape[0] == count
            if count in (5, 16) and longest in (64, 200):  # split into calls: each prompt as it is alone
                for row, prompt in enumerate(prompts):
                    alone = graphs.prefill(*pad_prompts([prompt]))[0][0]
                    np.testing.assert_allclose(logits[row], alone, rtol=1e-4, atol=1e-4)
    assert set(shapes) <= warmed, f"compiled under load: {sorted(set(shapes) - warmed)}"
