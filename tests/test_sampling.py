"""Per-request sampling: each row keeps its own settings and random generator."""

from __future__ import annotations

import numpy as np
import pytest

from mstriton.engine.sampling import SamplingState, choose_tokens, log_softmax
from mstriton.params import GenerationParams, ParameterError

V = 50


def state(seed=None, prompt=(1, 2, 3), **settings):
    return SamplingState(params=GenerationParams(seed=seed, **settings), end_ids=(2,), prompt_ids=list(prompt))


def logits_rows(n, seed=0):
    return np.random.default_rng(seed).normal(0, 2, (n, V)).astype(np.float32)


def test_greedy_takes_the_argmax_and_reports_the_true_log_probability():
    logits = logits_rows(3)
    tokens, logprobs, _ = choose_tokens(logits, [state(temperature=0.0), state(top_k=1), state(do_sample=False)])
    assert list(tokens) == list(logits.argmax(1))
    np.testing.assert_allclose(logprobs, log_softmax(logits)[np.arange(3), tokens], rtol=1e-6)
    assert np.all(logprobs < 0)


def test_seeded_sampling_is_the_same_whatever_runs_beside_it():
    alone = [choose_tokens(logits_rows(1, s)[:1], [st])[0][0]
             for s, st in zip(range(20), [state(seed=7, temperature=1.3)] * 20)]
    beside, st, other = [], state(seed=7, temperature=1.3), state(seed=99, temperature=0.5, top_k=3)
    for s in range(20):
        logits = np.concatenate([logits_rows(1, s), logits_rows(1, 1000 + s)])
        beside.append(choose_tokens(logits, [st, other])[0][0])
    assert alone == beside
    assert len(set(beside)) > 3  # it really samples


def test_top_k_and_top_p_restrict_the_choice():
    logits = logits_rows(1)
    top2 = set(np.argsort(-logits[0])[:2])
    st = state(seed=1, top_k=2)
    assert {int(choose_tokens(logits, [st])[0][0]) for _ in range(200)} == top2
    st = state(seed=1, top_p=1e-6)
    assert {int(choose_tokens(logits, [st])[0][0]) for _ in range(50)} == {int(logits.argmax())}
    probs = np.exp(log_softmax(logits[0]))
    order = np.argsort(-probs)
    needed = int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1
    st = state(seed=3, top_p=0.9)
    seen = {int(choose_tokens(logits, [st])[0][0]) for _ in range(3000)}
    assert seen <= set(order[:needed]) and len(seen) >= min(needed, 3)


def test_min_tokens_bans_the_end_id_and_bad_words_are_never_produced():
    logits = np.zeros((1, V), np.float32)
    logits[0, 2] = 10.0  # the end id is the favourite
    st = state(temperature=0.0, min_tokens=2)
    assert choose_tokens(logits, [st])[0][0] != 2
    st.record(5)
    st.record(6)
    assert choose_tokens(logits, [st])[0][0] == 2
    logits[0, 9] = 20.0
    st = state(temperature=0.0)
    st.bad_words = [[9], [4, 2]]
    st.record(4)
    assert choose_tokens(logits, [st])[0][0] not in (9, 2)


def test_penalties_push_repeated_tokens_down():
    logits = np.zeros((1, V), np.float32)
    logits[0, 3] = 1.0   # in the prompt
    logits[0, 7] = 0.9
    assert choose_tokens(logits, [state(temperature=0.0)])[0][0] == 3
    assert choose_tokens(logits, [state(temperature=0.0, repetition_penalty=1.5)])[0][0] == 7
    st = state(temperature=0.0, prompt=(), presence_penalty=0.5)
    st.record(3)
    assert choose_tokens(logits, [st])[0][0] == 7
    st = state(temperature=0.0, prompt=(), frequency_penalty=0.06)
    st.record(3)
    st.record(3)
    assert choose_tokens(logits, [st])[0][0] == 7


@pytest.mark.parametrize("field, value, allowed", [
    ("max_tokens", 0, "in [1, 100]"), ("max_tokens", -1, "in [1, 100]"), ("max_tokens", 101, "in [1, 100]"),
    ("top_p", 0.0, "in (0, 1]"), ("top_p", 1.5, "in (0, 1]"), ("temperature", -0.1, ">= 0"),
    ("top_k", -1, ">= 0"), ("repetition_penalty", 0.0, "> 0"), ("min_tokens", 50, "in [0, max_tokens=16]"),
    ("end_id", V, f"in [0, {V})"), ("stream_interval", 0, "in [1, 256]"), ("stream_interval", 257, "in [1, 256]"),
])
def test_bad_parameters_name_the_field_and_range(field, value, allowed):
    with pytest.raises(ParameterError) as error:
        GenerationParams(**{field: value}).validate(max_new_tokens_limit=100, vocab_size=V)
    assert f"'{field}'" in str(error.value) and allowed in str(error.value)


def test_top_logprobs_are_the_k_best_true_log_probabilities_best_first():
    logits = logits_rows(2, 7)
    tokens, chosen, tops = choose_tokens(logits, [state(temperature=0.0, top_logprobs=5), state(temperature=0.0)])
    expected = log_softmax(logits)
    best = np.argsort(-expected[0])[:5]
    assert [t for t, _ in tops[0]] == best.tolist()
    np.testing.assert_allclose([lp for _, lp in tops[0]], expected[0, best], rtol=1e-6)
    assert tops[0][0] == (int(tokens[0]), pytest.approx(float(chosen[0])))  # greedy: the best is the chosen
    assert tops[1] == []  # a request that did not ask gets none
