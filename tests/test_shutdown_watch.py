"""The decode model's watch for tritonserver shutting down, with a probe standing in for the request it sends
to itself (the real one runs in test_server's SIGTERM test); and the watchdog that bounds a model process's exit."""

from __future__ import annotations

import subprocess
import sys
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


# ---- the exit watchdog at the end of finalize() -------------------------------------------------------------------


def run_after_finalize(body: str) -> subprocess.CompletedProcess:
    script = f"from mstriton.serving.shutdown import exit_watchdog\nimport threading\n{body}\nexit_watchdog('m', 1)\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_a_process_that_exits_by_itself_is_left_alone_by_the_watchdog():
    started = time.monotonic()
    done = run_after_finalize("pass")
    assert done.returncode == 0 and time.monotonic() - started < 30
    assert "Timeout" not in done.stderr


def test_a_process_that_cannot_exit_prints_its_stacks_and_exits_1():
    # a non-daemon thread that never ends: the interpreter's exit would wait for it forever
    done = run_after_finalize("threading.Thread(target=threading.Event().wait, name='stuck').start()")
    assert done.returncode == 1
    assert "m: unloading" in done.stderr and "Timeout (0:00:01)!" in done.stderr
    assert "in wait" in done.stderr  # the stuck thread's stack


def test_sigusr1_prints_the_stacks_and_the_process_goes_on():
    script = ("import os, signal\nfrom mstriton.serving.shutdown import stacks_on_request\nstacks_on_request()\n"
              "def waiting_here():\n    os.kill(os.getpid(), signal.SIGUSR1)\nwaiting_here()\nprint('went on')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "went on"
    assert "in waiting_here" in done.stderr
