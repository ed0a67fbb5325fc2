"""Drafting tokens by n-gram lookup (prompt lookup decoding): the tokens that followed the last place where the
sequence's own last n tokens appeared before, in its prompt or output. Free to compute, and right whenever the
answer copies spans of its input (summaries, rewrites, code edits, JSON that repeats the prompt's keys): a
speculative step then verifies several of them in one decode step (engine.Engine.decode with drafts).

The longest suffix that matches wins (n from max_n down to min_n), and among its matches the most recent one.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramDrafter:
    """One sequence's tokens (prompt, then output) in a growing array, and drafts from them."""

    def __init__(self, tokens: list[int], max_n: int = 4, min_n: int = 2, capacity: int = 0):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.tokens = np.zeros(max(capacity, len(tokens), 16), np.int32)
        self.length = 0
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        end = self.length + len(tokens)
        if end > len(self.tokens):
            grown = np.zeros(max(end, 2 * len(self.tokens)), np.int32)
            grown[:self.length] = self.tokens[:self.length]
            self.tokens = grown
        self.tokens[self.length:end] = tokens
        self.length = end

    def draft(self, k: int) -> list[int]:
        """Up to `k` tokens that may come next; [] when no suffix of at least min_n tokens appeared before."""
        if k <= 0:
            return []
        seq = self.tokens[:self.length]
        for n in range(min(self.max_n, self.length - 1), self.min_n - 1, -1):
            # windows starting at 0 .. length-1-n: each has at least one token after it, and none is the suffix
            windows = sliding_window_view(seq[:-1], n)
            hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return seq[start:start + k].tolist()
        return []
