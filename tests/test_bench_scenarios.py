"""Unit tests of the KV-cache benchmark's scenario building and statistics (bench/scenarios.py): no
server, no model; a whitespace tokenizer stands in for the served one."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import scenarios as sc


class WordTokenizer:
    """One token per whitespace-separated word, plus one for each mark at a word's end."""

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            ids.append(len(word))
            if word[-1] in ".,;?!:":
                ids.append(0)
        return ids


class WideTokenizer:
    """Two tokens for every word: text_of_tokens must not overshoot by one."""

    def encode(self, text: str) -> list[int]:
        return [1, 2] * len(text.split())


TOKENIZER = WordTokenizer()


def test_word_stream_is_deterministic_and_seeded():
    assert sc.word_stream(3, 200) == sc.word_stream(3, 200)
    assert sc.word_stream(3, 200) != sc.word_stream(4, 200)
    words = sc.word_stream(0, 500)
    assert all(w.rstrip("".join(sc.END_MARKS)).lower() in sc.WORDS for w in words)
    assert words[0][0].isupper()
    assert any(w[-1] in sc.END_MARKS for w in words)


@pytest.mark.parametrize("length", [1, 7, 32, 50, 128, 1000])
def test_text_of_tokens_is_at_most_and_close_to_the_length(length):
    text = sc.text_of_tokens(TOKENIZER, length, seed=length)
    count = sc.token_count(TOKENIZER, text)
    assert length - 2 <= count <= length
    assert text == sc.text_of_tokens(TOKENIZER, length, seed=length)


def test_text_of_tokens_keeps_prefix_and_suffix_inside_the_length():
    text = sc.text_of_tokens(TOKENIZER, 40, seed=1, prefix="System: ", suffix=" What now?")
    assert text.startswith("System: ") and text.endswith(" What now?")
    assert 38 <= sc.token_count(TOKENIZER, text) <= 40


def test_text_of_tokens_with_two_tokens_a_word():
    text = sc.text_of_tokens(WideTokenizer(), 51, seed=0)
    assert sc.token_count(WideTokenizer(), text) == 50


def test_questions_differ_per_seed_and_shared_prompts_share_the_system_text():
    system = sc.text_of_tokens(TOKENIZER, 100, seed=1000, prefix="System: ")
    questions = [sc.question_text(TOKENIZER, 50, seed=i) for i in range(8)]
    assert len(set(questions)) == 8
    prompts = [sc.shared_prefix_prompt(system, q) for q in questions]
    assert all(p.startswith(system + "\n\n") and p.endswith(q) for p, q in zip(prompts, questions))
    assert all(48 <= sc.token_count(TOKENIZER, q) <= 50 for q in questions)


def test_conversation_text_appends_answers_and_ends_with_the_assistant_cue():
    assert sc.conversation_text([("hi", None)]) == "User: hi\nAssistant:"
    text = sc.conversation_text([("hi", " hello there"), ("and you?", None)])
    assert text == "User: hi\nAssistant: hello there\nUser: and you?\nAssistant:"
    # each turn's prompt starts with the previous turn's prompt: a prefix cache can reuse it
    earlier = sc.conversation_text([("hi", None)])
    assert text.startswith(earlier)


def test_turn_results_and_medians():
    one = sc.turn_results([50, 110, 170], [100.0, 120.0, 150.0])
    assert [(t.turn, t.prompt_tokens, t.new_tokens) for t in one] == [(1, 50, 50), (2, 110, 60), (3, 170, 60)]
    two = sc.turn_results([52, 112], [300.0, 90.0])
    three = sc.turn_results([48, 108, 168], [200.0, 100.0, 130.0])
    rows = sc.median_turns([one, two, three])
    assert [r["turn"] for r in rows] == [1, 2, 3]
    assert rows[0]["prompt_tokens"] == 50 and rows[0]["ttft_ms"] == 200.0
    assert isinstance(rows[0]["prompt_tokens"], int) and isinstance(rows[2]["prompt_tokens"], int)  # (168+170)/2
    assert rows[1]["conversations"] == 3 and rows[1]["ttft_ms"] == 100.0 and rows[1]["new_tokens"] == 60
    assert rows[2]["conversations"] == 2 and rows[2]["ttft_ms"] == pytest.approx(140.0)
    assert rows[0]["ttft_ms_each"] == [100.0, 300.0, 200.0]


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_is_numpys(q):
    values = [5.0, 1.0, 9.0, 3.0, 7.5, 2.25, 8.0]
    assert sc.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_nan_and_of_one_is_it():
    assert math.isnan(sc.percentile([], 50))
    assert sc.percentile([4.0], 99) == 4.0
    assert sc.median(iter([3, 1, 2])) == 2


def test_token_times_repeat_a_response_for_each_of_its_tokens():
    from bench.harness.streams import token_times

    assert token_times([(1.0, 1), (1.5, 2), (2.0, 5)]) == [1.0, 1.5, 2.0, 2.0, 2.0]
    # a response without new tokens (a piece of text held back) adds none; counts never go back
    assert token_times([(1.0, 1), (1.2, 1), (1.4, 2)]) == [1.0, 1.4]


def test_gaps_in_window_take_the_gaps_ending_inside_it():
    streams = [[0.0, 1.0, 2.0, 3.0], [0.5, 2.5, 2.75]]
    assert sorted(sc.gaps_in_window(streams, 1.5, 2.6)) == [1.0, 2.0]
    assert sorted(sc.all_gaps(streams)) == [0.25, 1.0, 1.0, 1.0, 2.0]
    assert sc.gaps_in_window(streams, 10, 11) == []


def test_latency_summary_in_milliseconds():
    summary = sc.latency_summary([0.1, 0.2, 0.3, 0.4])
    assert summary["count"] == 4
    assert summary["p50_ms"] == pytest.approx(250.0)
    assert summary["max_ms"] == pytest.approx(400.0)
    empty = sc.latency_summary([])
    assert empty["count"] == 0 and math.isnan(empty["p99_ms"]) and math.isnan(empty["max_ms"])


def test_target_check_and_safe_ratio():
    assert sc.target_check(1.2, 1.5) == {"value": 1.2, "target": 1.5, "met": True}
    assert sc.target_check(4.0, 3.0)["met"] is False
    assert sc.target_check(math.nan, 3.0)["met"] is False
    assert sc.safe_ratio(3.0, 2.0) == 1.5
    assert math.isnan(sc.safe_ratio(3.0, 0.0)) and math.isnan(sc.safe_ratio(math.nan, 1.0))


METRICS = """# HELP mstriton_requests_running Requests generating in the decode batch
# TYPE mstriton_requests_running gauge
mstriton_requests_running{model="smollm2_decode"} 12
mstriton_requests_running{model="demo_decode"} 3
# HELP mstriton_kv_cache_usage_ratio Tokens held / token capacity of the KV cache
# TYPE mstriton_kv_cache_usage_ratio gauge
mstriton_kv_cache_usage_ratio{model="smollm2_decode"} 0.25
# TYPE mstriton_kv_cache_blocks_used gauge
mstriton_kv_cache_blocks_used{model="smollm2_decode",pool="main"} 40
# TYPE mstriton_prompt_tokens_total counter
mstriton_prompt_tokens_total{model="smollm2"} 1234
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="smollm2_decode",version="1"} 2
# TYPE mstriton_decode_step_seconds histogram
mstriton_decode_step_seconds_bucket{model="smollm2_decode",le="0.1"} 7
"""


def test_parse_metrics_reads_types_labels_and_values():
    types, samples = sc.parse_metrics(METRICS)
    assert types["mstriton_requests_running"] == "gauge"
    assert types["mstriton_prompt_tokens_total"] == "counter"
    assert ("mstriton_kv_cache_blocks_used", {"model": "smollm2_decode", "pool": "main"}, 40.0) in samples
    assert ("mstriton_decode_step_seconds_bucket", {"model": "smollm2_decode", "le": "0.1"}, 7.0) in samples


def test_model_gauges_keep_every_gauge_of_that_model_whatever_its_name():
    gauges = sc.model_gauges(METRICS, "smollm2_decode")
    assert gauges == {"mstriton_requests_running": 12.0, "mstriton_kv_cache_usage_ratio": 0.25,
                      "mstriton_kv_cache_blocks_used": 40.0, "nv_inference_pending_request_count": 2.0}
    assert sc.model_gauges(METRICS, "smollm2_decode", prefix="mstriton_").keys() == \
        {"mstriton_requests_running", "mstriton_kv_cache_usage_ratio", "mstriton_kv_cache_blocks_used"}
    assert sc.model_gauges(METRICS, "demo_decode") == {"mstriton_requests_running": 3.0}


def test_gauge_maxima_over_snapshots_with_names_coming_and_going():
    maxima = sc.gauge_maxima([{"running": 1.0}, {"running": 5.0, "usage": 0.5}, {"running": 2.0, "usage": 0.25}])
    assert maxima == {"running": 5.0, "usage": 0.5}
    assert sc.gauge_maxima([]) == {}


def test_integral():
    assert sc.integral(64.0) == 64 and isinstance(sc.integral(64.0), int)
    assert sc.integral(0.25) == 0.25 and sc.integral(3) == 3 and sc.integral(None) is None


def test_tables():
    rows = [["shared", 1050, 161.26, None], ["alone", 50, 90.0, True], ["ratio", None, math.nan, None]]
    lines = sc.markdown_table(["prompts", "tokens", "TTFT ms", "met"], rows)
    assert lines[0] == "| prompts | tokens | TTFT ms | met |"
    assert lines[1] == "|---|---:|---:|---|"
    assert lines[2] == "| shared | 1050 | 161.3 |  |"
    assert lines[3] == "| alone | 50 | 90.0 | yes |"
    assert lines[4] == "| ratio |  | n/a |  |"
    text = sc.text_table(["prompts", "tokens"], [["shared", 1050], ["alone", 50]]).splitlines()
    assert len({len(line) for line in text}) == 1
    assert text[2].endswith("  50")
    assert sc.fmt(math.nan) == "n/a" and sc.fmt(3) == "3" and sc.fmt(2.346, 2) == "2.35" and sc.fmt(None) == "n/a"
