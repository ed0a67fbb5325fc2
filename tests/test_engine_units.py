"""The engine's parts without a server: buckets, the KV-cache pool, config and weight checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstriton.config import ConfigError, LlamaConfig
from mstriton.engine.buckets import batch_buckets, seq_buckets, smallest_fitting
from mstriton.engine.kv_cache import KVCachePool, PoolFull


def test_buckets_cover_the_limits():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert seq_buckets(1024) == [64, 128, 256, 512, 1024]
    assert seq_buckets(40) == [40]
    assert smallest_fitting([1, 2, 4], 3) == 4
    with pytest.raises(ValueError, match="exceeds the largest bucket 4"):
        smallest_fitting([1, 2, 4], 5)


def prompt_cache(pool: KVCachePool, length: int, fill: float):
    keys = [np.full((pool.n_kv_heads, pool.head_dim, length), fill + layer, np.float32)
            for layer in range(pool.n_layers)]
    values = [np.full((pool.n_kv_heads, length, pool.head_dim), -fill - layer, np.float32)
              for layer in range(pool.n_layers)]
    return keys, values


def test_pool_keeps_running_sequences_in_a_prefix_and_moves_the_last_into_a_freed_slot():
    pool = KVCachePool(n_layers=2, n_kv_heads=2, head_dim=4, max_slots=3, seq_buckets=[8, 16, 32])
    slots = [pool.add(*prompt_cache(pool, n, fill), n) for n, fill in [(3, 10.0), (5, 20.0), (2, 30.0)]]
    assert slots == [0, 1, 2] and pool.capacity == 8
    with pytest.raises(PoolFull):
        pool.add(*prompt_cache(pool, 1, 0.0), 1)
    assert pool.remove(0) == 2  # slot 2's sequence now lives in slot 0
    assert pool.n_active == 2 and list(pool.lengths[:2]) == [2, 5]
    assert np.all(pool.keys[1][0, :, :, :2] == 31.0) and np.all(pool.values[0][0, :, :2] == -30.0)
    assert pool.remove(1) is None and pool.n_active == 1


def test_pool_append_writes_each_sequence_at_its_own_position_and_grows_the_capacity():
    pool = KVCachePool(n_layers=1, n_kv_heads=1, head_dim=2, max_slots=2, seq_buckets=[4, 8])
    pool.add(*prompt_cache(pool, 3, 1.0), 3)
    pool.add(*prompt_cache(pool, 1, 5.0), 1)
    new_k = [np.array([[[7.0, 7.5]], [[8.0, 8.5]]], np.float32)]
    pool.append(new_k, [-new_k[0]])
    assert list(pool.lengths[:2]) == [4, 2]
    assert list(pool.keys[0][0, 0, :, 3]) == [7.0, 7.5] and list(pool.keys[0][1, 0, :, 1]) == [8.0, 8.5]
    assert list(pool.values[0][1, 0, 1]) == [-8.0, -8.5]
    pool.reserve(pool.required())  # the longest now holds 4 positions, its next token needs a fifth
    assert pool.capacity == 8
    assert np.all(pool.keys[0][0, 0, :, :3] == 1.0) and list(pool.keys[0][0, 0, :, 3]) == [7.0, 7.5]
    views = pool.views(2)
    assert all(v.flags.c_contiguous for v in views) and views[0].shape == (2, 1, 2, 8)
    pool.remove(0)
    pool.reserve(pool.required())  # the long sequence left: back to the small bucket
    assert pool.capacity == 4 and list(pool.keys[0][0, 0, :, 1]) == [8.0, 8.5]


def test_pool_refuses_a_prompt_that_leaves_no_room_to_generate():
    pool = KVCachePool(n_layers=1, n_kv_heads=1, head_dim=2, max_slots=1, seq_buckets=[4, 8])
    with pytest.raises(ValueError, match="max_seq_len 8"):
        pool.add(*prompt_cache(pool, 8, 0.0), 8)


BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=10, hidden_size=8,
            intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize("change, field", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "architectures"),
    (dict(num_key_value_heads=3, num_attention_heads=4, hidden_size=16), "num_key_value_heads"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=9), "hidden_size"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        LlamaConfig.from_hf_dict({**BASE, **change})


def test_config_reads_list_eos_and_rope_parameters():
    config = LlamaConfig.from_hf_dict({**BASE, "eos_token_id": [2, 7], "rope_parameters": {"rope_theta": 5e5}})
    assert config.eos_token_id == 2 and config.rope_theta == 5e5


def test_config_round_trips_through_hf_dict():
    config = LlamaConfig.from_hf_dict({**BASE, "num_key_value_heads": 1, "tie_word_embeddings": True})
    assert LlamaConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config


def test_prefill_batches_keep_their_attention_scores_within_the_budget():
    from mstriton.engine.engine import prefill_batches

    lengths = [32] * 20
    chunks = prefill_batches(lengths, budget=8 * 32 * 32)
    assert [len(c) for c in chunks] == [8, 8, 4] and [i for c in chunks for i in c] == list(range(20))
    # a prompt longer than the budget still runs, alone; short ones are not put with it
    assert prefill_batches([10, 20, 90, 30], budget=2000) == [range(0, 2), range(2, 3), range(3, 4)]
    assert [len(b) for b in prefill_batches([128] * 64)] == [8] * 8     # the default budget
    assert [len(b) for b in prefill_batches([256] * 4)] == [2, 2]
    assert prefill_batches([], budget=100) == []


def test_prefill_shapes_round_up_to_few_buckets():
    from mstriton.engine.buckets import prefill_lengths, prefill_shape

    assert prefill_shape(1, 5, 512) == (1, 64)
    assert prefill_shape(3, 64, 512) == (4, 64)
    assert prefill_shape(5, 65, 512) == (8, 128)
    assert prefill_shape(1, 500, 500) == (1, 500)       # never past max_seq_len
    assert prefill_lengths(200) == [64, 128, 192, 200]
    assert prefill_lengths(1152) == [64, 128, 192, 256, 384, 512, 768, 1024, 1152]
    assert prefill_shape(1, 300, 1152) == (1, 384) and prefill_shape(2, 1100, 1152) == (2, 1152)
    assert all(prefill_shape(1, t, 1152)[1] - t < 64 or prefill_shape(1, t, 1152)[1] <= 1.5 * t for t in range(1, 1153))
    shapes = {prefill_shape(b, t, 1152) for b in range(1, 65) for t in range(1, 1153)}
    assert len(shapes) == 7 * 9


def test_graph_lock_serves_waiters_in_arrival_order():
    """A thread that releases the lock and asks again goes behind the threads already waiting (no starvation)."""
    import threading
    import time

    from mstriton.engine.graphs import FairLock

    lock, order = FairLock(), []
    waiter_started = threading.Event()

    def waiter():
        waiter_started.set()
        with lock:
            order.append("waiter")

    with lock:
        thread = threading.Thread(target=waiter)
        thread.start()
        waiter_started.wait()
        time.sleep(0.05)  # the waiter has taken its ticket
    with lock:  # released and asked again at once, as the decode loop does
        order.append("again")
    thread.join(5)
    assert order == ["waiter", "again"]


def test_chunks_start_at_each_chunk_boundary_and_attend_to_a_doubling_cache():
    from mstriton.engine.buckets import chunk_cache_length, chunk_starts

    assert chunk_starts(256, 256) == [] and chunk_starts(257, 256) == [256]
    assert chunk_starts(1088, 256) == [256, 512, 768, 1024]
    assert [chunk_cache_length(s, 256) for s in (256, 512, 768, 1024)] == [256, 512, 1024, 1024]
    assert all(chunk_cache_length(s, 16) >= s for s in range(16, 2000, 16))


@pytest.mark.parametrize("length", [17, 32, 33, 100])
def test_chunked_prefill_equals_the_whole_prompt(tmp_path, length):
    """The chunk graph against the whole-prompt graph on the same random weights, at chunk boundaries and past
    them: same last logits and same cache (transformers checks both paths in test_golden)."""
    from mstriton.config import LlamaConfig
    from mstriton.engine.graphs import EngineGraphs, export_engine
    from mstriton.model.llama import weight_shapes

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    rng = np.random.default_rng(length)
    weights = {n: (rng.standard_normal(s) * 0.2).astype(np.float32) for n, s in weight_shapes(config).items()}
    export_engine(config, weights, tmp_path, dtype="float32", device="CPU", max_batch_size=1, max_seq_len=128,
                  prefill_chunk=16, batches=[1], seqs=[64], progress=lambda _: None)
    graphs = EngineGraphs(tmp_path)
    prompt = rng.integers(0, 97, length).astype(np.int32)
    logits, keys, values = graphs.prefill_long(prompt)
    whole_logits, whole_keys, whole_values = graphs.prefill(prompt[None], np.array([length], np.int32))
    np.testing.assert_allclose(logits, whole_logits[0], rtol=1e-4, atol=1e-5)
    for ours, whole in zip(keys, whole_keys):
        np.testing.assert_allclose(ours[:, :, :length], whole[0, :, :, :length], rtol=1e-4, atol=1e-5)
    for ours, whole in zip(values, whole_values):
        np.testing.assert_allclose(ours[:, :length], whole[0, :, :length], rtol=1e-4, atol=1e-5)
