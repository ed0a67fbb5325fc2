"""When the iterator of a finished decoupled BLS call may be dropped: a workaround for tritonserver 2.51's stub.

In the python backend's stub (2.51), a decoupled BLS call's C++ ResponseIterator keeps every response of the
stream, each tensor with its numpy array, and is held twice: by the Python iterator object and by the stub's
response_iterator_map_. Reading the last response queues a cleanup message; the stub's stub-to-parent thread,
which never holds the GIL, takes the iterator out of the map when it sends that message. If the Python object is
gone by then, that erase drops the last reference: the responses and their numpy arrays are freed in that thread
without the GIL (2.51's ~PbTensor does not take it; python_backend #390 added that later), racing the model's own
Python threads in pymalloc. Under load the front model died of this (SIGSEGV in pymalloc_alloc in libpython;
perf_analyzer: "Stub process 'tiny_0_0' is not healthy"), and tritonserver then waited forever for the pipeline
requests the dead stub had been reading.

So the models keep each finished iterator (`hold`) until the stub-to-parent thread is past its cleanup. That
thread serves its queue in order, so an `is_cancelled()` that makes a round trip (one that answers False: once
True, the stub caches the answer and asks nothing) was queued behind the cleanups of every iterator held before it
began. After such a round trip those iterators are dropped, in a Python thread, holding the GIL. Ask
`is_cancelled()` before the request's final response only: a finished request's sender may no longer be asked.
"""

from __future__ import annotations

import threading
from typing import Callable


class FinishedStreams:
    def __init__(self):
        self._lock = threading.Lock()
        self._held: list = []

    def hold(self, iterator) -> None:
        """Keep a finished (read to its end) iterator until a later round trip lets it go."""
        with self._lock:
            self._held.append(iterator)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def is_cancelled(self, is_cancelled: Callable[[], bool]) -> bool:
        """`is_cancelled()`; when it answered False (a round trip), drop the iterators held before it began.
        A given request's is_cancelled must not be asked from two threads at once (the second call would wait
        for the first one's round trip, queued perhaps before the cleanups)."""
        with self._lock:
            count = len(self._held)
        cancelled = is_cancelled()
        if count and not cancelled:
            with self._lock:
                released, self._held = self._held[:count], self._held[count:]
            del released  # the last references: the iterators and their responses are freed here
        return cancelled

    def releasing(self, is_cancelled: Callable[[], bool]) -> Callable[[], bool]:
        """`is_cancelled` that also lets go of what it may (for CancelPoll)."""
        return lambda: self.is_cancelled(is_cancelled)


FINISHED_STREAMS = FinishedStreams()
