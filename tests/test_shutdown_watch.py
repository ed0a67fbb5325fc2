"""The decode model's watch for tritonserver shutting down, with a probe standing in for the request it sends
to itself (the real one runs in test_server's SIGTERM test)."""

from __future__ import annotations

import threading
import time

from mstriton.serving.shutdown import ShutdownWatch


def test_watch_probes_only_while_busy_and_reports_a_refused_probe_once():
    probes, stopping = [], threading.Event()
    state = {"busy": False, "accepting": True}

    def probe():
        probes.append(state["accepting"])
        return state["accepting"]

    watch = ShutdownWatch(probe=probe, busy=lambda: state["busy"], on_stopping=stopping.set, interval=0.01)
    watch.start()
    try:
        assert not stopping.wait(0.1) and probes == []  # idle: no probe sent
        state["busy"] = True
        assert not stopping.wait(0.1) and len(probes) >= 2 and all(probes)
        state["accepting"] = False
        assert stopping.wait(5)
        count = len(probes)
        time.sleep(0.1)
        assert len(probes) == count  # it stops watching once it has reported
    finally:
        watch.close()


def test_a_failing_probe_does_not_end_the_watch():
    calls, stopping = [], threading.Event()

    def probe():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("the stub lost its connection for a moment")
        return False

    watch = ShutdownWatch(probe=probe, busy=lambda: True, on_stopping=stopping.set, interval=0.01).start()
    try:
        assert stopping.wait(5) and len(calls) == 3
    finally:
        watch.close()
