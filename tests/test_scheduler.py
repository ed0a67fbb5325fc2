"""Continuous batching in the decode loop, without a server: joins between steps, per-request results equal
single runs, cancellation frees the slot, a full queue refuses with "server busy"; the paged KV cache under the
scheduler: prefill beside decode within its budget, preemption when blocks run out, prefix-cache hits, refusal
of what could never fit."""

from __future__ import annotations

import numpy as np
import pytest

from mstriton.engine.engine import Engine, greedy_generate
from mstriton.engine.graphs import EngineGraphs
from mstriton.params import GenerationParams
from mstriton.serving.scheduler import DecodeRequest, Scheduler, ServerBusy

PROMPTS = [[1, 5, 9, 22, 7], [1, 40, 3], [1] + list(range(10, 30)), [1, 17], [1, 8, 8, 8, 8, 8]]


@pytest.fixture(scope="module")
def graphs(hf_checkpoint_factory, tmp_path_factory):
    from mstriton.convert import convert

    repo = tmp_path_factory.mktemp("repo-sched")
    convert(hf_checkpoint_factory("mha"), "tiny", repo, max_batch_size=4, max_seq_len=128,
            progress=lambda _: None)
    return EngineGraphs(repo / "tiny_decode/1/engine")


def make_request(graphs, key, prompt, events, **params):
    """What the tokenizer hands the decode model: the prompt's ids and the settings."""
    params.setdefault("temperature", 0.0)
    return DecodeRequest(key=key, prompt_ids=list(prompt), params=GenerationParams(**params),
                         emit=events.setdefault(key, []).append)


def run_until_idle(scheduler, limit=500):
    for _ in range(limit):
        if not scheduler.running and not scheduler.waiting:
            return
        scheduler.step()
    raise AssertionError("scheduler did not finish")


def tokens_of(events):
    return [e.token for e in events if e.token >= 0]


def test_requests_joining_between_steps_each_get_their_single_run_result(graphs):
    expected = [greedy_generate(Engine(graphs, max_slots=1), [p], n)[0] for p, n in zip(PROMPTS, [12, 5, 9, 12, 3])]
    scheduler = Scheduler(Engine(graphs, max_slots=3), max_waiting=8)
    events = {}
    for i in range(2):
        scheduler.submit(make_request(graphs, f"r{i}", PROMPTS[i], events, max_tokens=[12, 5][i]))
    scheduler.step()
    scheduler.step()
    for i in range(2, 5):  # arrive while the first two generate; one must wait for a free slot
        scheduler.submit(make_request(graphs, f"r{i}", PROMPTS[i], events, max_tokens=[12, 5, 9, 12, 3][i]))
    scheduler.step()
    assert len(scheduler.running) == 3 and len(scheduler.waiting) == 2
    run_until_idle(scheduler)
    for i in range(5):
        assert tokens_of(events[f"r{i}"]) == expected[i], i
        assert events[f"r{i}"][-1].finish_reason == "length"
    assert scheduler.engine.blocks.num_used == 0
    scheduler.engine.blocks.check()


def test_cancel_frees_the_slot_for_the_next_request(graphs):
    scheduler = Scheduler(Engine(graphs, max_slots=1), max_waiting=4)
    events = {}
    scheduler.submit(make_request(graphs, "long", PROMPTS[0], events, max_tokens=100))
    scheduler.submit(make_request(graphs, "next", PROMPTS[1], events, max_tokens=3))
    scheduler.step()
    scheduler.step()
    assert [r.request.key for r in scheduler.running] == ["long"] and len(scheduler.waiting) == 1
    assert scheduler.cancel("long")
    scheduler.step()
    assert events["long"][-1].finish_reason == "cancelled" and len(tokens_of(events["long"])) < 5
    assert [r.request.key for r in scheduler.running] == ["next"]
    run_until_idle(scheduler)
    assert len(tokens_of(events["next"])) == 3
    assert not scheduler.cancel("unknown")


def test_state_hook_sees_a_cancel_that_empties_the_batch_at_once(graphs):
    """The gauges follow the state hook: a cancel of the only running request runs no decode step, and the
    hook must still report zero running at that pass (not at some later step)."""
    seen = []
    scheduler = Scheduler(Engine(graphs, max_slots=1), on_state=lambda s: seen.append(s.stats()))
    events = {}
    scheduler.submit(make_request(graphs, "only", PROMPTS[0], events, max_tokens=100))
    scheduler.step()
    assert seen[-1]["running"] == 1 and seen[-1]["kv_blocks_used"] == 1
    assert scheduler.cancel("only")
    scheduler.step()
    assert events["only"][-1].finish_reason == "cancelled"
    assert seen[-1]["running"] == 0 and seen[-1]["kv_blocks_used"] == 0 and seen[-1]["kv_tokens_used"] == 0


def test_full_queue_refuses_with_server_busy(graphs):
    scheduler = Scheduler(Engine(graphs, max_slots=1), max_waiting=1)
    events = {}
    # submitted together before the loop admits any: one for the free slot, one for the queue place
    scheduler.submit(make_request(graphs, "a", PROMPTS[0], events, max_tokens=4))
    scheduler.submit(make_request(graphs, "b", PROMPTS[1], events, max_tokens=4))
    with pytest.raises(ServerBusy, match="server busy"):
        scheduler.submit(make_request(graphs, "c", PROMPTS[1], events, max_tokens=4))
    scheduler.step()  # a runs, b waits: still full
    with pytest.raises(ServerBusy, match="server busy"):
        scheduler.submit(make_request(graphs, "c", PROMPTS[1], events, max_tokens=4))


def test_end_id_and_stop_words_finish_early(graphs):
    greedy = greedy_generate(Engine(graphs, max_slots=1), [PROMPTS[0]], 10)[0]
    scheduler = Scheduler(Engine(graphs, max_slots=2))
    events = {}
    end_request = make_request(graphs, "end", PROMPTS[0], events, max_tokens=10)
    end_request.end_ids = (greedy[3],)
    stop_request = make_request(graphs, "stop", PROMPTS[0], events, max_tokens=10)
    stop_request.stop_words = [greedy[4:6]]
    scheduler.submit(end_request)
    scheduler.submit(stop_request)
    run_until_idle(scheduler)
    first_end = greedy.index(greedy[3])
    assert tokens_of(events["end"]) == greedy[:first_end + 1] and events["end"][-1].finish_reason == "end_id"
    assert tokens_of(events["stop"]) == greedy[:6] and events["stop"][-1].finish_reason == "stop"


def test_background_loop_and_shutdown(graphs):
    import threading

    scheduler = Scheduler(Engine(graphs, max_slots=2))
    done = threading.Event()
    events = []

    def emit(event):
        events.append(event)
        if event.finish_reason:
            done.set()

    request = make_request(graphs, "bg", PROMPTS[1], {}, max_tokens=6)
    request.emit = emit
    scheduler.start()
    scheduler.submit(request)
    assert done.wait(30)
    assert len(tokens_of(events)) == 6
    long = make_request(graphs, "long", PROMPTS[0], {}, max_tokens=120)
    got = []
    long.emit = got.append
    scheduler.submit(long)
    scheduler.shutdown()
    assert got[-1].finish_reason == "cancelled" and "shutting down" in got[-1].error


def test_drain_lets_accepted_requests_run_for_the_grace_then_ends_the_rest_with_an_error(graphs):
    import time

    scheduler = Scheduler(Engine(graphs, max_slots=1), max_waiting=4)
    events = {}
    for key, prompt in [("short", PROMPTS[1]), ("long", PROMPTS[0]), ("waiting", PROMPTS[3])]:
        scheduler.submit(make_request(graphs, key, prompt, events, max_tokens=4 if key == "short" else 100))
    scheduler.drain(60.0, "the server is shutting down")
    while "long" not in events or len(tokens_of(events["long"])) < 3:  # inside the grace: generation goes on
        scheduler.step()
    assert tokens_of(events["short"]) == greedy_generate(Engine(graphs, max_slots=1), [PROMPTS[1]], 4)[0]
    assert events["short"][-1].finish_reason == "length" and events["short"][-1].error is None
    scheduler.drain(0.0, "the server is shutting down")  # the grace is over
    time.sleep(0.01)
    scheduler.step()
    assert not scheduler.running and not scheduler.waiting
    assert scheduler.engine.free_slots == 1
    for key in ("long", "waiting"):
        assert events[key][-1].finish_reason == "cancelled" and "shutting down" in events[key][-1].error
    assert 3 <= len(tokens_of(events["long"])) < 100 and tokens_of(events["waiting"]) == []


# ---- the paged KV cache under the scheduler -------------------------------------------------------------------

def block_bytes(graphs) -> int:
    from mstriton.engine.kv_pool import KVPool

    c = graphs.config
    return KVPool.block_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, graphs.block_size)


def test_preemption_under_a_tiny_pool_still_ends_every_request_with_its_single_run_result(graphs):
    """Four requests of up to 5 + 40 tokens in a pool of 8 blocks (16 tokens each): they cannot all hold their
    blocks at once. The newest are preempted and recomputed; every one ends with the tokens of its solo run."""
    lengths = [40, 40, 36, 30]
    expected = [greedy_generate(Engine(graphs, max_slots=1), [p], n)[0] for p, n in zip(PROMPTS, lengths)]
    engine = Engine(graphs, max_slots=4, kv_cache_bytes=9 * block_bytes(graphs))
    assert engine.blocks.usable_blocks == 8
    scheduler = Scheduler(engine, max_waiting=8)
    events = {}
    for i, n in enumerate(lengths):
        scheduler.submit(make_request(graphs, f"r{i}", PROMPTS[i], events, max_tokens=n))
    run_until_idle(scheduler, limit=2000)
    assert engine.blocks.stats.preemptions > 0
    for i in range(len(lengths)):
        assert tokens_of(events[f"r{i}"]) == expected[i], i
        assert events[f"r{i}"][-1].finish_reason == "length" and events[f"r{i}"][-1].error is None
    assert engine.blocks.num_used == 0
    engine.blocks.check()


def test_a_request_that_could_never_fit_the_pool_is_refused_at_once_with_the_numbers(graphs):
    engine = Engine(graphs, max_slots=2, kv_cache_bytes=3 * block_bytes(graphs))  # 2 blocks: 32 tokens
    scheduler = Scheduler(engine)
    events = {}
    scheduler.submit(make_request(graphs, "huge", list(range(1, 41)), events, max_tokens=4))
    scheduler.submit(make_request(graphs, "small", PROMPTS[1], events, max_tokens=4))
    run_until_idle(scheduler)
    assert events["huge"][-1].finish_reason == "length"
    assert "needs 3 KV blocks" in events["huge"][-1].error and "the whole pool has 2" in events["huge"][-1].error
    assert len(tokens_of(events["small"])) == 4


def test_prompts_prefill_in_budgeted_chunks_beside_running_streams(graphs):
    """A long prompt arriving while a stream decodes is computed budget tokens per step: the stream gets a
    token at every step meanwhile, and both end with their solo results."""
    long_prompt = [1] + list(range(2, 90))
    expected_long = greedy_generate(Engine(graphs, max_slots=1), [long_prompt], 4)[0]
    expected_stream = greedy_generate(Engine(graphs, max_slots=1), [PROMPTS[0]], 30)[0]
    engine = Engine(graphs, max_slots=2)
    scheduler = Scheduler(engine, prefill_budget=16)
    events = {}
    scheduler.submit(make_request(graphs, "stream", PROMPTS[0], events, max_tokens=30))
    scheduler.step()
    scheduler.submit(make_request(graphs, "long", long_prompt, events, max_tokens=4))
    steps_to_first = 0
    while not tokens_of(events.get("long", [])):
        before = len(tokens_of(events["stream"]))
        scheduler.step()
        steps_to_first += 1
        assert len(tokens_of(events["stream"])) == before + 1  # never a step without the stream's token
    assert steps_to_first == -(-len(long_prompt) // 16)
    run_until_idle(scheduler)
    assert tokens_of(events["long"]) == expected_long and tokens_of(events["stream"]) == expected_stream


def test_a_prompt_cut_by_the_budget_is_cut_on_block_boundaries_and_equals_its_whole_prefill(graphs):
    """A budget of 20 beside a running stream: every piece that does not finish the prompt ends on a multiple of
    the KV block size (16), and the prompt's logits are bit for bit those of its prefill in one call. A piece
    starting elsewhere put its keys in other columns of the chunk graph's attention, where MindSpore's softmax
    sums in 8-wide lanes: the probabilities came out 1 ulp apart, and int8 activations grew that into other greedy
    tokens under load. A budget under one block still moves the first prompt in line."""
    long_prompt = [1] + list(range(2, 90))
    (_,), whole = Engine(graphs, max_slots=1).prefill_prompts([long_prompt])
    for budget in (20, 7):
        engine = Engine(graphs, max_slots=2)
        pieces, logits = [], {}
        prefill = engine.prefill

        def recording(work, prefill=prefill, pieces=pieces, logits=logits):
            pieces += [(sequence.computed, count) for sequence, count in work if len(sequence.tokens) > 80]
            done = prefill(work)
            logits.update({id(s): v for s, v in done.items() if len(s.tokens) > 80})
            return done

        engine.prefill = recording
        scheduler = Scheduler(engine, prefill_budget=budget)
        events = {}
        scheduler.submit(make_request(graphs, "stream", PROMPTS[0], events, max_tokens=60))
        scheduler.step()
        scheduler.submit(make_request(graphs, "long", long_prompt, events, max_tokens=2))
        run_until_idle(scheduler)
        ends = [start + count for start, count in pieces]
        assert ends[-1] == len(long_prompt) and len(pieces) > 1, pieces
        if budget >= engine.blocks.block_size:
            assert all(end % engine.blocks.block_size == 0 for end in ends[:-1]), pieces
            [prompt_logits] = logits.values()
            np.testing.assert_array_equal(prompt_logits, whole[0])
        else:  # under one block: pieces of at most the budget, ending on a boundary where one is in reach
            assert all(0 < count <= budget for _, count in pieces), pieces
            assert [end for end in ends if end % 16 == 0][:5] == [16, 32, 48, 64, 80], pieces


def test_a_prompt_sharing_a_cached_prefix_computes_only_the_rest_and_equals_a_cold_run(graphs):
    engine = Engine(graphs, max_slots=1)
    cold = Engine(graphs, max_slots=1, enable_prefix_caching=False)
    system = [1] + list(range(20, 60))  # 41 tokens: two full blocks of 16 are cached
    first, second = system + [5, 6, 7], system + [9, 9]
    (a,), _ = engine.prefill_prompts([first])
    engine.release(a)
    hits = engine.blocks.stats.prefix_hits
    (b,), warm_logits = engine.prefill_prompts([second])
    assert engine.blocks.stats.prefix_hits - hits == 32
    (c,), cold_logits = cold.prefill_prompts([second])
    np.testing.assert_allclose(warm_logits, cold_logits, rtol=0, atol=1e-5)
    for _ in range(5):  # and the decode steps after it
        token = int(warm_logits[0].argmax())
        warm_logits, cold_logits = engine.decode([token]), cold.decode([token])
        np.testing.assert_allclose(warm_logits, cold_logits, rtol=0, atol=1e-5)


def test_the_auto_prefill_budget_takes_a_share_of_the_decode_step_in_whole_chunks(graphs):
    from mstriton.serving.scheduler import PREFILL_TIME_SHARE

    scheduler = Scheduler(Engine(graphs, max_slots=2), prefill_budget=0)
    chunk = graphs.continuation
    assert scheduler.budget() == chunk  # nothing measured yet: one chunk
    scheduler.decode_seconds, scheduler.prefill_token_seconds = 0.1, 0.001
    expected = int(PREFILL_TIME_SHARE * 0.1 / 0.001) // chunk * chunk
    assert scheduler.budget() == expected > chunk
    scheduler.prefill_token_seconds = 1.0  # slow prefill: still one chunk a step, never none
    assert scheduler.budget() == chunk
    assert Scheduler(Engine(graphs, max_slots=2), prefill_budget=48).budget() == 48


def test_the_loop_survives_a_failed_step_and_serves_the_next_request(graphs):
    """A step that raises ends what was running with an error; the loop thread lives on for later requests (a
    dead loop thread once hung every request after it)."""
    import threading

    engine = Engine(graphs, max_slots=2)
    real_decode, failures = engine.decode_with_drafts, [RuntimeError("a broken step")]

    def decode_failing_once(*args, **kwargs):
        if failures:
            raise failures.pop()
        return real_decode(*args, **kwargs)

    engine.decode_with_drafts = decode_failing_once
    scheduler = Scheduler(engine)
    events, done = {}, {k: threading.Event() for k in ("first", "second")}

    def request(key, prompt):
        def emit(event):
            events.setdefault(key, []).append(event)
            if event.finish_reason:
                done[key].set()
        return DecodeRequest(key=key, prompt_ids=list(prompt), params=GenerationParams(temperature=0.0, max_tokens=4),
                             emit=emit)

    scheduler.start()
    try:
        scheduler.submit(request("first", PROMPTS[0]))
        assert done["first"].wait(60)
        assert "internal error in the decode loop: RuntimeError: a broken step" in events["first"][-1].error
        scheduler.submit(request("second", PROMPTS[1]))
        assert done["second"].wait(60)
        assert events["second"][-1].error is None and len(tokens_of(events["second"])) == 4
    finally:
        scheduler.shutdown()
    assert engine.blocks.num_used == 0


class _ByteVocabulary:
    """A vocabulary of one byte per token (ids 0..127: ASCII), for a real llguidance matcher over the random model's
    128 tokens: what llguidance's TokenizerWrapper reads."""
    tokens = [bytes([i]) for i in range(128)]
    eos_token_id, bos_token_id, special_token_ids = 0, None, [0]

    def __call__(self, text):
        return list(text.encode() if isinstance(text, str) else text)


def test_a_request_waits_for_its_grammar_while_others_go_on_and_then_keeps_to_it(graphs):
    import concurrent.futures
    import re

    import llguidance

    from mstriton.engine.structured_output import GrammarCompiler, grammar_of

    vocabulary = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary()), n_vocab=128)
    compiler = GrammarCompiler(lambda: vocabulary)
    scheduler = Scheduler(Engine(graphs, max_slots=3), max_waiting=8)
    events = {}
    slow = concurrent.futures.Future()  # a grammar still compiling
    scheduler.submit(DecodeRequest(key="grammar", prompt_ids=PROMPTS[0], emit=events.setdefault("grammar", []).append,
                                   params=GenerationParams(max_tokens=20, temperature=1.0, seed=3),
                                   end_ids=(0,), grammar=slow))
    scheduler.submit(make_request(graphs, "plain", PROMPTS[1], events, max_tokens=4))
    scheduler.step()
    scheduler.step()
    assert [r.request.key for r in scheduler.running] == ["plain"] and len(scheduler.waiting) == 1
    slow.set_result(compiler.submit(grammar_of({"regex": "[0-9]{2,3}(ab|cd)"})).result())
    broken = concurrent.futures.Future()
    broken.set_exception(ValueError("'structured_outputs' cannot be compiled: test"))
    scheduler.submit(DecodeRequest(key="broken", prompt_ids=PROMPTS[3], emit=events.setdefault("broken", []).append,
                                   params=GenerationParams(), grammar=broken))
    run_until_idle(scheduler)
    text = bytes(tokens_of(events["grammar"])).decode()
    assert re.fullmatch("[0-9]{2,3}(ab|cd)\x00", text), text  # then the end id, which the grammar allows last
    assert events["grammar"][-1].finish_reason == "end_id"
    assert len(tokens_of(events["plain"])) == 4
    assert events["broken"][-1].error.endswith("'structured_outputs' cannot be compiled: test")
    assert scheduler.engine.blocks.num_used == 0
    compiler.close()
