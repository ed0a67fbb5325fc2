"""The engine's parts without a server: buckets, prefill batching, config checks, chunked prefill."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstriton.config import ConfigError, LlamaConfig
from mstriton.engine.buckets import batch_buckets, seq_buckets, smallest_fitting


def test_buckets_cover_the_limits():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert seq_buckets(1024) == [64, 128, 256, 512, 1024]
    assert seq_buckets(40) == [40]
    assert smallest_fitting([1, 2, 4], 3) == 4
    with pytest.raises(ValueError, match="exceeds the largest bucket 4"):
        smallest_fitting([1, 2, 4], 5)


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


@pytest.mark.parametrize("length", [17, 32, 33, 100])
def test_chunked_prefill_equals_the_whole_prompt(tmp_path, length):
    """The chunk graph against the whole-prompt graph on the same random weights, at chunk boundaries and past
    them: same last logits and same cache in the pool (transformers checks both paths in test_golden)."""
    from mstriton.config import LlamaConfig
    from mstriton.engine.engine import Engine
    from mstriton.engine.graphs import EngineGraphs, export_engine
    from mstriton.model.llama import weight_shapes

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    rng = np.random.default_rng(length)
    weights = {n: (rng.standard_normal(s) * 0.2).astype(np.float32) for n, s in weight_shapes(config).items()}
    export_engine(config, weights, tmp_path, dtype="float32", device="CPU", max_batch_size=1, max_seq_len=128,
                  prefill_chunk=16, batches=[1], seqs=[64, 128], progress=lambda _: None)
    graphs = EngineGraphs(tmp_path)
    prompt = rng.integers(0, 97, length).astype(np.int32)
    engine = Engine(graphs, kv_cache_bytes=1 << 20, enable_prefix_caching=False)
    sequence = engine.add(prompt)
    logits = engine.prefill([(sequence, length)])[sequence]  # in chunks of 16
    whole_logits, whole_keys, whole_values = graphs.prefill(prompt[None], np.array([length], np.int32))
    np.testing.assert_allclose(logits, whole_logits[0], rtol=1e-4, atol=1e-5)
    keys, values = engine.pool.gather(sequence.blocks, length, length)
    for ours, whole in zip(keys, whole_keys):
        np.testing.assert_allclose(ours[0], whole[0, :, :, :length], rtol=1e-4, atol=1e-5)
    for ours, whole in zip(values, whole_values):
        np.testing.assert_allclose(ours[0], whole[0, :, :length], rtol=1e-4, atol=1e-5)


def _resident_mib() -> float:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_a_prefaulted_kv_pool_is_resident_from_the_start_and_a_lazy_one_is_not():
    from mstriton.engine.kv_pool import KVPool

    # 16 layers x 640 blocks x 2 heads x 64 dims x 16 positions x 4 bytes x (K + V) = 160 MiB
    before = _resident_mib()
    lazy = KVPool(n_layers=16, n_kv_heads=2, head_dim=64, num_blocks=640, block_size=16)
    assert lazy.nbytes == 160 << 20 and _resident_mib() - before < 20
    before = _resident_mib()
    eager = KVPool(n_layers=16, n_kv_heads=2, head_dim=64, num_blocks=640, block_size=16, prefault=True)
    assert _resident_mib() - before > 140
    assert not eager.keys.any() and not eager.values.any()  # still zeros
    del lazy, eager


def test_the_default_kv_pool_is_a_share_of_memory_at_most_twice_what_the_slots_hold():
    from mstriton.engine.kv_pool import DEFAULT_SLOT_MULTIPLE, default_pool_bytes

    share = default_pool_bytes()
    assert default_pool_bytes(need_bytes=1 << 20) == DEFAULT_SLOT_MULTIPLE << 20  # a small model: megabytes
    assert default_pool_bytes(need_bytes=share) == share                          # a big one: the share
