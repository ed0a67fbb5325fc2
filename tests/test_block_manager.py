"""Block accounting of the paged KV cache, without graphs: allocate, share, free, evict, preempt, through block
ids and through the per-sequence API the engine and the scheduler call; and the pool's copies in and out of
blocks."""

from __future__ import annotations

import numpy as np
import pytest

from mstriton.engine.block_manager import SCRATCH_BLOCK, BlockManager, BlockTable, OutOfBlocks, block_keys
from mstriton.engine.kv_pool import KVPool


def test_allocate_never_hands_out_the_scratch_block_and_refuses_past_the_free_count():
    manager = BlockManager(num_blocks=5, block_size=4)
    assert manager.usable_blocks == 4 and manager.num_free == 4
    blocks = manager.allocate(3)
    assert SCRATCH_BLOCK not in blocks and len(set(blocks)) == 3 and manager.num_free == 1
    with pytest.raises(OutOfBlocks, match="2 KV blocks asked for, 1 free of 4"):
        manager.allocate(2)
    assert manager.num_free == 1  # a refused allocation takes nothing
    manager.release(blocks)
    assert manager.num_free == 4 and manager.num_used == 0
    manager.check()


def test_chained_keys_name_a_block_by_everything_before_it():
    a = block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = block_keys([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and len(b) == 2       # the partial last block has no key
    assert a[0] != b[0] and a[1] != b[1]      # same tokens in block 2, different prefix: different key
    assert a[1][1] == b[1][1] == (5, 6, 7, 8)
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], 4) == a


def test_a_freed_prompt_is_found_again_and_shared_blocks_are_counted_per_holder():
    manager = BlockManager(num_blocks=10, block_size=4)
    tokens = list(range(1, 11))  # two full blocks and a partial one
    found, keys = manager.match_prefix(tokens)
    assert found == [] and len(keys) == 2
    blocks = manager.allocate(3)
    for block, key in zip(blocks, keys):
        manager.register(block, key)
    manager.release(blocks)
    assert manager.num_used == 0 and len(manager.cached) == 2
    found, _ = manager.match_prefix(tokens[:9] + [99])
    assert found == blocks[:2]
    manager.take(found)
    manager.take(found)  # a second sequence shares them
    assert manager.num_used == 2 and manager.ref_counts[blocks[0]] == 2
    manager.release(found)
    assert manager.num_used == 2  # still held by the other
    manager.release(found)
    assert manager.num_used == 0
    manager.check()


def test_unreferenced_cached_blocks_are_evicted_least_recently_freed_first_and_plain_ones_before_them():
    manager = BlockManager(num_blocks=5, block_size=2)
    first, second = [1, 2, 3, 4], [5, 6, 7, 8]
    for tokens in (first, second):
        blocks = manager.allocate(2)
        for block, key in zip(blocks, block_keys(tokens, 2)):
            manager.register(block, key)
        manager.release(blocks)
    assert manager.num_free == 4 and len(manager.cached) == 4
    (fresh,) = manager.allocate(1)  # every free block is cached: the oldest freed goes
    assert manager.stats.evictions == 1
    # the first prompt lost its last block (released last first: its end goes before its start)
    assert len(manager.match_prefix(first)[0]) == 1 and len(manager.match_prefix(second)[0]) == 2
    manager.release([fresh])  # holds nothing cached: reused before any cached block
    (again,) = manager.allocate(1)
    assert again == fresh and manager.stats.evictions == 1
    manager.check()


def test_register_keeps_the_first_holder_of_a_key_and_prefix_caching_can_be_off():
    manager = BlockManager(num_blocks=4, block_size=2)
    key = block_keys([1, 2], 2)[0]
    a, b = manager.allocate(2)
    manager.register(a, key)
    manager.register(b, key)  # the same tokens computed twice: one block holds the name
    assert manager.cached == {key: a} and manager.keys[b] is None
    off = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    (c,) = off.allocate(1)
    off.register(c, key)
    assert off.match_prefix([1, 2, 3])[0] == [] and not off.cached


def test_preempting_a_sequence_gives_back_its_blocks_and_keeps_its_full_ones_findable():
    manager = BlockManager(num_blocks=6, block_size=2)
    old, new = manager.allocate(3), manager.allocate(2)
    assert manager.num_free == 0
    for block, key in zip(new, block_keys([7, 7, 8, 8], 2)):
        manager.register(block, key)
    manager.release(new)  # the newest sequence is preempted: the old one may grow
    assert manager.num_free == 2
    grown = manager.allocate(1)
    assert grown[0] in new and manager.stats.evictions == 1
    assert len(manager.match_prefix([7, 7, 8, 8])[0]) == 1  # its first block is still cached for the resume
    manager.release(old + grown)
    manager.check()


def _prefilled(manager, tokens):
    """A prompt allocated and computed whole, its full blocks entered in the prefix cache."""
    table = manager.allocate_prompt(tokens)
    manager.cache_full_blocks(table, tokens, len(tokens))
    return table


def test_a_prompt_gets_blocks_for_one_more_position_and_a_second_one_reuses_its_cached_start():
    manager = BlockManager(num_blocks=10, block_size=4)
    first = list(range(1, 9))  # two full blocks: three with the first generated token's position
    table = _prefilled(manager, first)
    assert len(table.blocks) == 3 and table.cached_tokens == 0 and table.registered == 2
    assert len(manager.cached) == 2 and manager.num_used == 3
    second = first[:4] + [50, 51, 52, 53, 54]  # shares the first block only
    other = manager.allocate_prompt(second)
    assert other.cached_tokens == 4 and other.blocks[0] == table.blocks[0] and len(other.blocks) == 3
    assert manager.ref_counts[table.blocks[0]] == 2 and other.registered == 1
    usage = manager.usage()
    assert (usage.used, usage.total, usage.block_size) == (5, 9, 4)
    assert (usage.prefix_queries, usage.prefix_hits) == (len(first) + len(second), 4)
    manager.free(table)
    manager.free(other)
    assert table.blocks == [] and manager.num_used == 0
    manager.check()


def test_a_prompt_found_whole_in_the_cache_still_computes_its_last_block():
    manager = BlockManager(num_blocks=10, block_size=4)
    tokens = list(range(1, 9))
    manager.free(_prefilled(manager, tokens))
    again = manager.allocate_prompt(tokens)
    assert again.cached_tokens == 4 and again.registered == 1  # the last token's logits are needed
    assert manager.usage().prefix_hits == 4
    manager.free(again)
    manager.check()


def test_a_prompt_is_refused_whole_when_its_cached_blocks_leave_too_few_free():
    """Cached blocks nobody holds sit in the free list: taking them for a prompt leaves fewer to allocate."""
    manager = BlockManager(num_blocks=5, block_size=2)
    cached = [1, 2, 3, 4]
    manager.free(_prefilled(manager, cached))  # 2 cached blocks and 2 plain ones free
    holder = manager.allocate_prompt([9])      # takes a plain one: 3 free, 2 of them cached
    assert manager.num_free == 3
    before = (list(manager.ref_counts), list(manager.free_list), manager.usage())
    assert manager.allocate_prompt(cached + [5, 6, 7]) is None  # 2 cached + 2 new > 3 free
    assert (list(manager.ref_counts), list(manager.free_list), manager.usage()) == before  # nothing taken or counted
    manager.free(holder)
    table = manager.allocate_prompt(cached + [5, 6, 7])
    assert table.cached_tokens == 4 and len(table.blocks) == 4 and manager.num_free == 0
    manager.free(table)
    manager.check()


def test_make_room_takes_a_block_only_when_the_next_position_starts_one_and_refuses_when_none_is_free():
    manager = BlockManager(num_blocks=4, block_size=4)
    table = manager.allocate_prompt([1, 2, 3])  # 4 positions: one block
    assert len(table.blocks) == 1
    assert manager.make_room(table, 4) and len(table.blocks) == 1
    assert manager.make_room(table, 5) and len(table.blocks) == 2
    other = BlockTable()
    assert manager.make_room(other, 5) is False and other.blocks == []  # two needed, one free: nothing taken
    assert manager.num_free == 1
    assert manager.make_room(other, 4) and manager.num_free == 0
    assert manager.make_room(table, 9) is False and len(table.blocks) == 2
    manager.free(table)
    manager.free(other)
    manager.check()


def test_blocks_filled_by_decoding_are_named_as_a_prompt_of_the_same_tokens_would_be():
    manager = BlockManager(num_blocks=10, block_size=4)
    prompt, generated = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]
    table = _prefilled(manager, prompt)
    tokens = prompt + generated
    for computed in range(len(prompt) + 1, len(tokens) + 1):  # one decode step at a time
        assert manager.make_room(table, computed + 1)
        manager.cache_full_blocks(table, tokens, computed)
    assert table.registered == 2 and table.keys == block_keys(tokens, 4)
    manager.free(table)
    resumed = manager.allocate_prompt(tokens)  # e.g. after a preemption
    assert resumed.cached_tokens == 8
    manager.free(resumed)
    manager.check()


def test_preempt_frees_like_free_and_counts_the_preemption():
    manager = BlockManager(num_blocks=6, block_size=2)
    table = _prefilled(manager, [7, 7, 8, 8, 9])
    manager.preempt(table)
    usage = manager.usage()
    assert usage.preemptions == 1 and usage.used == 0 and table.blocks == []
    assert len(manager.match_prefix([7, 7, 8, 8])[0]) == 2  # its full blocks wait in the prefix cache
    manager.free(_prefilled(manager, [1]))
    assert manager.usage().preemptions == 1
    manager.check()


def test_pool_writes_and_gathers_positions_across_blocks():
    pool = KVPool(n_layers=2, n_kv_heads=2, head_dim=3, num_blocks=6, block_size=4)
    rng = np.random.default_rng(0)
    keys = [rng.standard_normal((2, 3, 11)).astype(np.float32) for _ in range(2)]
    values = [rng.standard_normal((2, 11, 3)).astype(np.float32) for _ in range(2)]
    blocks = [5, 2, 3]
    pool.write(blocks, 0, keys, values, 6)                       # positions 0-5: blocks 5 and 2
    pool.write(blocks, 6, keys, values, 5, source_start=6)      # 6-10: the rest of block 2, then block 3
    got_k, got_v = pool.gather(blocks, 11, 16)
    for layer in range(2):
        np.testing.assert_array_equal(got_k[layer][0, :, :, :11], keys[layer])
        np.testing.assert_array_equal(got_v[layer][0, :, :11], values[layer])
        assert not got_k[layer][0, :, :, 11:].any()
        # layer-major rows: layer 1's block 2 is row 6 + 2
        np.testing.assert_array_equal(pool.keys[layer * 6 + 2], keys[layer][:, :, 4:8])
    index = pool.block_index(np.array([blocks], np.int32))
    assert index.shape == (2, 1, 3) and index[1, 0].tolist() == [11, 8, 9]
    new_k = [rng.standard_normal((1, 2, 3)).astype(np.float32) for _ in range(2)]
    pool.write_tokens([blocks], [11], new_k, new_k)
    np.testing.assert_array_equal(pool.keys[6 + 3][:, :, 3], new_k[1][0])
    np.testing.assert_array_equal(pool.values[3][:, 3], new_k[0][0])
