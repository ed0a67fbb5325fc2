"""Clients in threads: the closed loop every benchmark measures with, and plain client threads (the soak's)."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, ContextManager, Sequence


def closed_loop(items: Sequence, concurrency: int, send: Callable, session: Callable[[], ContextManager] | None = None,
                on_done: Callable[[int, int], None] | None = None) -> list:
    """`concurrency` clients share `items`; each sends its next one when its previous one has ended, the way
    perf_analyzer's concurrency mode does. `send(index, item)` runs one request and returns its result (a
    RequestTiming, a Generation, ...); with `session`, each client first enters `session()` (a context manager:
    its own gRPC stream, say) and calls `send(index, item, what session gave)`. `on_done(done, total)` is told
    of every request that ends. Returns the results in the order of `items`; the first error ends the run and
    is raised here."""
    todo = list(range(len(items)))
    results: list = [None] * len(items)
    lock = threading.Lock()
    errors: list[BaseException] = []
    done = [0]

    def client() -> None:
        try:
            with session() if session else contextlib.nullcontext() as opened:
                while True:
                    with lock:
                        if not todo or errors:
                            return
                        index = todo.pop(0)
                    result = send(index, items[index], opened) if session else send(index, items[index])
                    with lock:
                        results[index] = result
                        done[0] += 1
                        count = done[0]
                    if on_done:
                        on_done(count, len(items))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by run_clients
            with lock:
                errors.append(exc)

    run_clients(client, max(1, min(concurrency, len(items))), errors)
    return results


def run_clients(client: Callable[[], None], count: int, errors: list[BaseException]) -> None:
    """`count` threads each running `client`, waited for; then the first error the clients put in `errors`."""
    threads = [threading.Thread(target=client, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
