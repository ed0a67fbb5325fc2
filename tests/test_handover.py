"""The disaggregated shape without a server: the prefill stage computes prompts into a pool in shared memory and
leases their blocks; the decode loop adopts them (copying what its own prefix cache lacks) with the sampler's first
token, and gives every lease back, adopted or not; the results are those of the colocated loop, token for token;
no block is left held on either side."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mstriton.engine.engine import Engine, pool_blocks
from mstriton.engine.graphs import EngineGraphs
from mstriton.engine.kv_pool import KVPool
from mstriton.engine.shared_kv import (CLAIMED, FREE, LEASED, RETURNED, LeaseBook, SharedKV, decode_handover,
                                       region_path)
from mstriton.params import GenerationParams
from mstriton.serving.first_token import FirstToken, choose_first
from mstriton.serving.prefill_stage import PrefillStage
from mstriton.serving.scheduler import DecodeRequest, Scheduler

PROMPTS = [[1, 5, 9, 22, 7], [1, 40, 3], [1] + list(range(10, 50)), [1, 17], [1] + list(range(10, 50)) + [3, 4]]


@pytest.fixture(scope="module")
def graphs(hf_checkpoint_factory, tmp_path_factory):
    from mstriton.convert import convert

    repo = tmp_path_factory.mktemp("repo-handover")
    convert(hf_checkpoint_factory("mha"), "tiny", repo, max_batch_size=4, max_seq_len=128, weights="bfloat16",
            progress=lambda _: None)
    return EngineGraphs(repo / "tiny_decode/1/engine")


@pytest.fixture
def region(graphs, tmp_path):
    made = SharedKV.for_graphs(tmp_path / "kv", graphs, pool_blocks(graphs, None, 4))
    yield made
    made.close()


def stage_of(graphs, region, **kwargs) -> PrefillStage:
    return PrefillStage(Engine(graphs, pool=region.pool), region, **kwargs)


def request(key, prompt, events, handover=None, first=None, **params):
    params.setdefault("temperature", 0.0)
    return DecodeRequest(key=key, prompt_ids=list(prompt), params=GenerationParams(**params),
                         emit=events.setdefault(key, []).append, handover=handover, first=first)


def handed_over(stage, region, prompts, params=None):
    """What the prefill and sampler models send decode for `prompts`: (handover, first token) per prompt."""
    results = stage.run(prompts)
    fields = params or {"temperature": 0.0}
    firsts = choose_first([(r.logits, fields, {"end_ids": [2]}, p) for r, p in zip(results, prompts)])
    opened = SharedKV.open(region.path)  # the decode model's own mapping
    return [(decode_handover(opened, r.handover), FirstToken.from_tensors(f.to_json(), None)) for r, f in
            zip(results, firsts)]


def run(scheduler, limit=500):
    for _ in range(limit):
        if not scheduler.running and not scheduler.waiting:
            return
        scheduler.step()
    raise AssertionError("scheduler did not finish")


def tokens(events):
    return [e.token for e in events if e.token >= 0]


def disaggregated(graphs, folder, prompts, max_tokens=12, **params) -> list[list[int]]:
    """Each prompt's tokens when the prefill stage computes it into a fresh shared pool (in `folder`) and the decode
    loop adopts it: what the disaggregated shape serves. Checks that every prompt was adopted."""
    region = SharedKV.for_graphs(folder / "kv", graphs, pool_blocks(graphs, None, graphs.max_batch_size))
    try:
        stage = stage_of(graphs, region)
        scheduler = Scheduler(Engine(graphs, max_slots=min(4, graphs.max_batch_size)))
        events = {}
        sampling = {"temperature": 0.0, **params}
        for i, (handover, first) in enumerate(handed_over(stage, region, prompts, sampling)):
            scheduler.submit(request(f"r{i}", prompts[i], events, handover, first, max_tokens=max_tokens, **params))
        run(scheduler)
        assert scheduler.adopted_prompts == len(prompts)
        return [tokens(events[f"r{i}"]) for i in range(len(prompts))]
    finally:
        region.close()
        region.unlink()


def colocated(graphs, prompts, max_tokens=12, **params):
    scheduler = Scheduler(Engine(graphs, max_slots=min(4, graphs.max_batch_size)))
    events = {}
    for i, prompt in enumerate(prompts):
        scheduler.submit(request(f"r{i}", prompt, events, max_tokens=max_tokens, **params))
    run(scheduler)
    return [tokens(events[f"r{i}"]) for i in range(len(prompts))]


def test_the_pool_is_shared_memory_that_a_second_mapping_sees(graphs, region):
    other = SharedKV.open(region.path)
    region.pool.keys[3, 0, 0, 0] = 7.5
    assert other.pool.keys[3, 0, 0, 0] == 7.5
    assert other.pool.keys.shape == region.pool.keys.shape and other.pool.num_blocks == region.pool.num_blocks
    assert region_path("smollm2", 1234).name == "mstriton-kv-1234-smollm2"
    assert region_path("x").name == f"mstriton-kv-{os.getppid()}-x"


def test_adopted_prompts_generate_exactly_what_the_colocated_loop_does(graphs, region):
    expected = colocated(graphs, PROMPTS)
    stage = stage_of(graphs, region)
    scheduler = Scheduler(Engine(graphs, max_slots=4))
    events = {}
    for i, (handover, first) in enumerate(handed_over(stage, region, PROMPTS)):
        assert handover is not None and first.chosen
        scheduler.submit(request(f"r{i}", PROMPTS[i], events, handover, first, max_tokens=12))
    run(scheduler)
    assert [tokens(events[f"r{i}"]) for i in range(len(PROMPTS))] == expected
    # no prompt was computed by the decode loop: every one was adopted
    assert scheduler.prefill_token_seconds is None
    assert region.outstanding() == len(PROMPTS) and all(region.leases[:len(PROMPTS), 1] == RETURNED)
    assert stage.reap() == len(PROMPTS) and region.outstanding() == 0
    assert stage.engine.blocks.num_used == 0 and scheduler.engine.blocks.num_used == 0
    stage.engine.blocks.check()


def test_sampled_first_tokens_leave_the_seeded_stream_unchanged(graphs, tmp_path):
    params = {"temperature": 0.9, "top_k": 20, "seed": 11}
    assert disaggregated(graphs, tmp_path, PROMPTS[:2], **params) == colocated(graphs, PROMPTS[:2], **params)


def test_smollm2_adopted_prompts_generate_what_the_colocated_loop_does(smollm2_repository, tmp_path):
    """The real model, with the activations it is served with (int8): bit for bit the same tokens."""
    from mstriton.kernels import activations

    graphs = EngineGraphs(smollm2_repository / "smollm2_decode/1/engine")
    prompts = [[1, 504, 3458, 282, 4649, 314], list(range(200, 260)), [1] + list(range(300, 341))]
    before = activations.activations()
    activations.set_activations("int8")
    try:
        assert disaggregated(graphs, tmp_path, prompts, 24) == colocated(graphs, prompts, 24)
    finally:
        activations.set_activations(before)


def test_decode_copies_only_the_blocks_its_own_prefix_cache_lacks(graphs, region):
    stage = stage_of(graphs, region)
    engine = Engine(graphs, max_slots=4)
    scheduler = Scheduler(engine)
    events = {}
    [(handover, first)] = handed_over(stage, region, [PROMPTS[2]])
    scheduler.submit(request("a", PROMPTS[2], events, handover, first, max_tokens=2))
    run(scheduler)
    # the same 41-token prompt again: its first two blocks (32 tokens) are in decode's cache; one block is copied
    [(handover, first)] = handed_over(stage, region, [PROMPTS[2]])
    region.pool.keys[:] = np.nan  # what decode would read if it copied a cached block
    region.pool.values[:] = np.nan
    scheduler.submit(request("b", PROMPTS[2], events, handover, first, max_tokens=1))
    scheduler.step()
    blocks = scheduler.running[0].sequence.blocks if scheduler.running else None
    assert engine.blocks.stats.prefix_hits == 32
    run(scheduler)
    assert blocks is None or not np.isnan(engine.pool.keys[blocks[0]]).any()


def test_every_lease_comes_back_when_requests_end_before_adoption(graphs, region):
    stage = stage_of(graphs, region)
    scheduler = Scheduler(Engine(graphs, max_slots=1), max_waiting=8)
    events = {}
    handovers = handed_over(stage, region, PROMPTS[:3])
    for i, (handover, first) in enumerate(handovers):
        scheduler.submit(request(f"r{i}", PROMPTS[i], events, handover, first, max_tokens=30))
    scheduler.step()  # r0 adopted; r1, r2 wait for the only slot
    assert [region.leases[h.slot, 1] for h, _ in handovers] == [RETURNED, LEASED, LEASED]
    scheduler.cancel("r1")
    scheduler.shutdown("stopping")  # ends r0, and r1 (cancelled) and r2 while they wait
    assert all(region.leases[h.slot, 1] == RETURNED for h, _ in handovers)
    assert stage.reap() == 3 and stage.engine.blocks.num_used == 0


def test_an_unclaimed_lease_runs_out_and_decode_then_computes_the_prompt(graphs, region):
    stage = stage_of(graphs, region, lease_seconds=0.0)
    [(handover, first)] = handed_over(stage, region, [PROMPTS[0]])
    assert stage.reap() == 1 and stage.book.expired == 1 and region.outstanding() == 0
    assert stage.engine.blocks.num_used == 0
    scheduler = Scheduler(Engine(graphs, max_slots=1))
    events = {}
    scheduler.submit(request("late", PROMPTS[0], events, handover, first, max_tokens=12))
    run(scheduler)
    assert tokens(events["late"]) == colocated(graphs, [PROMPTS[0]])[0]
    assert scheduler.prefill_token_seconds is not None  # computed here
    assert region.leases[handover.slot, 1] == FREE  # a taken-back lease is not written again


def test_a_prompt_the_prefill_stage_cannot_take_gets_no_handover(graphs, tmp_path):
    tiny = SharedKV.for_graphs(tmp_path / "small", graphs, 4)  # 3 usable blocks: 48 positions
    stage = stage_of(graphs, tiny)
    results = stage.run([PROMPTS[0], None, list(range(1, 60)), PROMPTS[1]])
    assert [r.handover.size > 0 for r in results] == [True, False, False, True]
    assert [r.logits.size > 0 for r in results] == [True, False, False, True]
    assert FirstToken.from_tensors("", results[1].logits) is None


def test_lease_states_move_only_forward_and_a_stale_generation_cannot_claim(graphs, region):
    released = []
    book = LeaseBook(region, released.append)
    slot, generation = book.lease("seq")
    opened = SharedKV.open(region.path)
    stale = decode_handover(opened, np.array([slot, generation - 1, 5], np.int32))
    assert not stale.claim()
    handover = decode_handover(opened, np.array([slot, generation, 5], np.int32))
    assert handover.claim() and region.leases[slot, 1] == CLAIMED
    assert book.reap() == 0 and not released  # claimed: still pinned
    handover.give_back()
    handover.give_back()
    assert book.reap() == 1 and released == ["seq"] and region.leases[slot, 1] == FREE
    assert decode_handover(opened, np.zeros(0, np.int32)) is None and decode_handover(None, np.arange(3)) is None


def test_kv_pools_copy_whole_blocks_across_layers():
    source = KVPool(2, 1, 4, 6, 2)
    target = KVPool(2, 1, 4, 5, 2)
    source.keys[:] = np.arange(source.keys.size, dtype=np.float32).reshape(source.keys.shape)
    source.values[:] = -source.keys.reshape(source.values.shape)
    target.copy_blocks(source, [4, 1], [2, 3])
    for layer in range(2):
        for src, dst in ((4, 2), (1, 3)):
            np.testing.assert_array_equal(target.keys[layer * 5 + dst], source.keys[layer * 6 + src])
            np.testing.assert_array_equal(target.values[layer * 5 + dst], source.values[layer * 6 + src])
    with pytest.raises(ValueError, match="differ"):
        target.copy_blocks(KVPool(2, 1, 4, 6, 4), [1], [1])
