"""Asking a Triton response sender whether its client cancelled, at most every so often.

``is_cancelled()`` is a round trip from the model's stub process to the server process. Asked for every token it
cost the decode model as much as a tenth of its CPU, and the front model, which streams every token to the
client, as much again. A cancel is still seen within ``interval`` seconds while tokens flow: a stream at a
hundred tokens per second runs at most five tokens past it.
"""

from __future__ import annotations

import time
from typing import Callable

CANCEL_CHECK_SECONDS = 0.05


class CancelPoll:
    def __init__(self, is_cancelled: Callable[[], bool], interval: float = CANCEL_CHECK_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.is_cancelled, self.interval, self.clock = is_cancelled, interval, clock
        self.next_check = 0.0
        self.seen = False

    def __call__(self) -> bool:
        """Whether the client has cancelled, as last asked (once seen, always true)."""
        if not self.seen:
            now = self.clock()
            if now >= self.next_check:
                self.next_check = now + self.interval
                self.seen = bool(self.is_cancelled())
        return self.seen
