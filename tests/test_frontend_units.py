"""The frontend's parts that need no server: stop strings on streamed text, the reading of Triton's error
messages into HTTP errors, and typed body fields."""

from __future__ import annotations

import pytest

from mstriton.frontend.errors import ApiError, from_triton
from mstriton.frontend.fields import Fields
from mstriton.frontend.stops import StopStrings
from mstriton.serving.error_marks import INVALID_REQUEST, SERVER_BUSY


def feed_all(stops, pieces):
    matcher = StopStrings(stops)
    out = [matcher.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return out, matcher.stopped


def test_a_stop_string_split_across_pieces_ends_the_text_before_it():
    out, stopped = feed_all(["</answer>"], ["The answer", " is 4</", "ans", "wer> and more", " text"])
    assert "".join(out) == "The answer is 4" and stopped
    assert out[1] == " is 4"  # "</" is held back: it may begin the stop string
    assert out[3:] == ["", ""]


def test_held_back_text_that_is_no_stop_string_comes_out_with_the_next_piece_or_at_the_end():
    out, stopped = feed_all(["STOP"], ["a S", "T", "x", " ST"])
    assert out == ["a ", "", "STx", " ST"] and not stopped


def test_the_earliest_of_several_stop_strings_wins_and_no_stops_passes_text_through():
    assert feed_all(["b", "a"], ["xxab"]) == (["xx"], True)
    assert feed_all([], ["x", "y"]) == (["x", "y"], False)


def test_triton_error_messages_become_http_errors_naming_the_clients_field():
    error = from_triton(f"in ensemble 'm_pipeline', {INVALID_REQUEST}'max_tokens' must be in [1, 10], got 50",
                        {"max_tokens": "parameters.max_new_tokens"})
    assert (error.status, error.param) == (400, "parameters.max_new_tokens")
    assert error.message == "'parameters.max_new_tokens' must be in [1, 10], got 50"
    busy = from_triton(f"{SERVER_BUSY}all 2 sequence slots are generating")
    assert busy.status == 503 and busy.headers["Retry-After"] == "1"
    assert from_triton("Request for unknown model: 'x' is not found").status == 404
    assert from_triton("Stub process 'm_decode_0_0' is not healthy.").status == 503
    assert from_triton("something else broke").status == 500


@pytest.mark.parametrize("value", [True, "1", float("nan"), 1.5, [1]])
def test_fields_refuse_wrong_types_naming_the_field(value):
    with pytest.raises(ApiError) as raised:
        Fields({"n": value}, prefix="parameters.").integer("n", low=1)
    assert raised.value.param == "parameters.n" and "'parameters.n' must be an integer" in raised.value.message


def test_fields_ranges_unknown_fields_and_refusals():
    fields = Fields({"top_p": 0.0, "x": 1, "tools": [], "best_of": 2})
    with pytest.raises(ApiError, match=r"in \(0, 1\]"):
        fields.number("top_p", low=0.0, high=1.0, low_open=True)
    with pytest.raises(ApiError, match="unknown field 'x'"):
        fields.refuse_unknown({"top_p", "tools", "best_of"})
    fields.refuse("tools", "not implemented", unless=lambda v: not v)  # an empty list asks for nothing
    with pytest.raises(ApiError, match="'best_of' is not supported"):
        fields.refuse("best_of", "only 1", unless=lambda v: v in (None, 1))
    assert Fields({"stop": "x"}).texts("stop", max_items=4) == ["x"]
    with pytest.raises(ApiError):
        Fields({"stop": ["a"] * 5}).texts("stop", max_items=4)
