"""The n-gram drafter (engine/ngram.py): the longest suffix that appeared before, its most recent place, the tokens
after it; nothing when no suffix of min_n tokens repeats."""

from __future__ import annotations

import pytest

from mstriton.engine.ngram import NgramDrafter


def test_the_tokens_after_the_last_match_of_the_longest_suffix():
    drafter = NgramDrafter([1, 2, 3, 4, 5, 9, 9, 2, 3, 4, 7, 8, 1, 2, 3, 4], max_n=3, min_n=1)
    # suffix [2, 3, 4] appeared twice; its latest place is followed by 7, 8, 1
    assert drafter.draft(3) == [7, 8, 1]
    assert drafter.draft(10) == [7, 8, 1, 2, 3, 4]  # up to the end of what is known
    assert drafter.draft(0) == []


def test_a_longer_suffix_wins_over_a_more_recent_shorter_one():
    drafter = NgramDrafter([5, 6, 7, 1, 0, 7, 2, 5, 6, 7], max_n=3, min_n=1)
    assert drafter.draft(1) == [1]  # [5, 6, 7] -> 1, not [7] -> 2


def test_no_draft_without_a_repeated_suffix_of_min_n_tokens():
    drafter = NgramDrafter([1, 2, 3, 4, 9, 3], max_n=4, min_n=2)
    assert drafter.draft(4) == []  # only the 1-gram [3] repeats
    drafter.extend([4])
    assert drafter.draft(4) == [9, 3, 4]  # now [3, 4] does


def test_the_array_grows_past_its_capacity():
    drafter = NgramDrafter([1, 2], capacity=2)
    drafter.extend(list(range(3, 40)) + [1, 2])
    assert drafter.draft(2) == [3, 4] and drafter.length == 41


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="min_n"):
        NgramDrafter([1], max_n=1, min_n=2)
