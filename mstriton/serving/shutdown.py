"""Noticing that tritonserver is shutting down, from inside a model.

On SIGTERM, tritonserver 2.51 stops accepting new requests for every model, waits up to its exit timeout for
the requests in flight, and then exits without unloading the models (killing the stubs). A model is not told.
The decode model has to know, because a long generation would outlast the exit timeout and its client would see
the connection drop instead of an error. The one visible sign is that every model's scheduler now refuses
requests, so the watch asks a `probe` (a request the model sends to itself) while there is work, and calls
`on_stopping` once the probe is refused.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import threading
from typing import Callable

log = logging.getLogger(__name__)


class ShutdownWatch:
    def __init__(self, *, probe: Callable[[], bool], busy: Callable[[], bool], on_stopping: Callable[[], None],
                 interval: float = 0.5):
        """`probe()` returns True while the server accepts requests; `busy()` whether there is work to
        protect (the probe costs a request, so an idle model does not send it)."""
        self.probe, self.busy, self.on_stopping, self.interval = probe, busy, on_stopping, interval
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="mstriton-shutdown-watch", daemon=True)

    def start(self) -> "ShutdownWatch":
        self.thread.start()
        return self

    def close(self) -> None:
        self.closed.set()
        if self.thread.is_alive():
            self.thread.join()

    def _watch(self) -> None:
        while not self.closed.wait(self.interval):
            if not self.busy():
                continue
            try:
                accepted = self.probe()
            except Exception:  # noqa: BLE001 - a failing probe must not end the watch
                log.exception("shutdown probe failed")
                continue
            if not accepted:
                self.on_stopping()
                return


# Seconds a model process may take from the start of its finalize() to its exit; they take under 2 here. Past them
# it prints every thread's stack and exits: tritonserver waits for its stubs at shutdown, and one stub that never
# exited turned a soak's SIGTERM into exit status 1 (its model still "live" when the 30 s exit timeout ran out,
# with no request in flight and its finalize() never heard from).
EXIT_WATCHDOG_SECONDS = 15.0


def exit_watchdog(model_name: str, seconds: float = EXIT_WATCHDOG_SECONDS) -> None:
    """First thing in a model's finalize(): bounds the rest of the process's life. faulthandler's timer is a C
    thread: it fires even when a Python thread holds the GIL, or finalize() waits on a lock forever, or the
    interpreter, past its last Python code, waits to join a thread that never ends. The stacks go to stderr,
    tritonserver's log."""
    # faulthandler's header is only "Timeout (0:00:15)!": say first whose stacks would follow
    sys.stderr.write(f"{model_name}: unloading; the process exits within {seconds:.0f} s or prints its threads' "
                     f"stacks and exits 1\n")
    sys.stderr.flush()
    faulthandler.dump_traceback_later(seconds, exit=True)


def stacks_on_request() -> None:
    """In a model's initialize(): SIGUSR1 makes the process print every thread's stack to stderr (tritonserver's
    log) and go on. The supervisor sends it to the model processes that keep tritonserver from exiting; anyone
    may (`kill -USR1 PID`)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
