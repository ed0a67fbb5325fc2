"""How the in-process systems (the engine alone, the transformers peer) take requests off their queue: the
next one, waiting for it, then those already waiting, up to a batch limit. None on the queue means stop."""

from __future__ import annotations

import queue
from typing import Callable


def next_batch(arrivals: queue.Queue, limit: Callable[[object], int]) -> list:
    """The next arrival and up to limit(first) - 1 more that are already waiting; [None] when told to stop."""
    batch = [arrivals.get()]
    if batch[0] is None:
        return batch
    while len(batch) < limit(batch[0]):
        try:
            item = arrivals.get_nowait()
        except queue.Empty:
            break
        if item is None:
            arrivals.put(None)  # stop after this batch
            break
        batch.append(item)
    return batch
