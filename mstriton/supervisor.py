"""Keeps tritonserver serving when one of its processes dies: `mstriton.serve` runs it under a Supervisor.

tritonserver 2.51 does not notice that one of its Python-backend model processes (`triton_python_backend_stub`)
died: it never reaps it (the process stays a zombie), a stream in flight in it hangs until its client gives up,
every later request to the model gets 400 "Stub process 'NAME_0_0' is not healthy", `/v2/health/ready` and the
model's own ready answer 200 on, and SIGTERM then waits out the exit timeout (or longer: it was seen still running
minutes after "Exit timeout expired. Exiting immediately"). So the Supervisor owns tritonserver as a child in a
process group of its own and, every POLL_SECONDS, looks at the model processes tritonserver started (its
children whose program is the stub; the model is named in the stub's arguments). When one of them is gone or a
zombie, or tritonserver itself exits, while nobody asked it to stop, it:

1. says so ("model process demo_decode (pid N) died; restarting tritonserver");
2. kills tritonserver's whole process group at once (SIGKILL: a SIGTERM would wait for the hung requests until
   the exit timeout). Clients' connections close, so their streams end with an error instead of hanging, and
   until the new tritonserver listens they get "connection refused": readiness is false;
3. removes the shared-memory regions (/dev/shm/triton_python_backend_shm_region_*, 64 MiB each, and the prefill
   model's KV pool, mstriton-kv-*) made since that tritonserver started that no live process maps any more: a
   killed tritonserver cannot remove them;
4. starts tritonserver again with the same command, unless that is more than `max_restarts` restarts within
   `window` seconds (a crash loop: a model that cannot load, a machine out of memory): then it stops and exits
   1, so that the container runtime (Docker's restart policy, Kubernetes) restarts the container.

SIGTERM or SIGINT is forwarded to tritonserver (and to the HTTP frontend when there is one), which drains its
requests as it always did and exits 0; this process then exits with that status. If tritonserver has not
exited some seconds after its own exit timeout, it is killed and its regions removed. A second signal kills at
once. The HTTP frontend (`make run`) is not restarted with tritonserver: it keeps its port and answers 503 until
tritonserver is back; if the frontend itself exits, everything stops with its status.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

SHM = Path("/dev/shm")
# the python backend's regions, and the prefill model's shared KV pools (engine/shared_kv.py)
SHM_PATTERNS = ("triton_python_backend_shm_region_*", "mstriton-kv-*")
STUB = b"triton_python_backend_stub"
POLL_SECONDS = 0.5
# tritonserver's own default for --exit-timeout-secs, and the seconds we give it beyond that to exit by itself.
EXIT_TIMEOUT_SECONDS, STOP_MARGIN_SECONDS = 30, 15
# A killed process group is gone within milliseconds; this only bounds a wait for a stuck one.
KILL_WAIT_SECONDS = 10
# Seconds before tritonserver's exit timeout runs out at which the model processes still running are asked for
# their threads' stacks (SIGUSR1, serving/shutdown.py's stacks_on_request): the one that keeps it waiting says why.
STACKS_BEFORE_EXIT_TIMEOUT = 8
# The stub's first argument is the model's file: REPOSITORY/MODEL/VERSION/model.py
_MODEL_FILE = re.compile(rb"([^/]+)/\d+/[^/]+\.py$")


@dataclasses.dataclass
class Process:
    """What /proc says about one process. A zombie's argv is empty: the kernel has freed its memory."""
    pid: int
    ppid: int
    pgid: int
    state: str
    argv: list[bytes]


def process(pid: int) -> Process | None:
    """/proc's view of `pid`, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # the command name in parentheses may hold spaces and parentheses: the fields start after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return Process(pid, int(fields[1]), int(fields[2]), fields[0], [a for a in argv if a])


def processes() -> list[Process]:
    found = (process(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [p for p in found if p is not None]


def model_of(stub: Process) -> str | None:
    """The model a model process serves; None for any other process. tritonserver 2.51 starts the stub as
    `triton_python_backend_stub REPOSITORY/MODEL/VERSION/model.py SHM_REGION ... INSTANCE DEFAULT`, where
    INSTANCE is MODEL_GROUP_INDEX for the processes that serve. While it loads a model it also runs a stub whose
    INSTANCE is MODEL itself, to read the model's config (auto_complete_config), and stops it: not one of these."""
    argv = stub.argv
    if len(argv) < 9 or not argv[0].endswith(STUB):
        return None
    match = _MODEL_FILE.search(argv[1])
    model = match.group(1) if match else None
    return model.decode() if model and argv[8].startswith(model + b"_") else None


def model_processes(server_pid: int, table: list[Process] | None = None) -> dict[int, str]:
    """The live Python-backend model processes that tritonserver `server_pid` started (not another server's): pid
    -> model name."""
    found = {}
    for p in processes() if table is None else table:
        model = model_of(p) if p.ppid == server_pid and p.state != "Z" else None
        if model:
            found[p.pid] = model
    return found


def mapped_shared_memory() -> set[str]:
    """Paths under /dev/shm that some live process maps (the ones of processes we may not read are missed:
    run as the user that runs tritonserver)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.rsplit(" ", 1)[-1].strip() for line in maps.read_text().splitlines()
                          if "/dev/shm/" in line)
        except OSError:
            pass
    return mapped


def shared_memory_regions() -> set[Path]:
    return {path for pattern in SHM_PATTERNS for path in SHM.glob(pattern)}


def wait_group_gone(pgid: int, timeout: float = KILL_WAIT_SECONDS) -> None:
    """Until no live process is left in the process group `pgid` (tritonserver's: its model processes outlive it by
    a moment after an exit timeout): their mappings of shared memory go only when they do."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(p.pgid == pgid and p.state != "Z" for p in processes()):
            return
        time.sleep(0.05)


def remove_unmapped_regions(regions) -> list[Path]:
    """Removes those of `regions` that no live process maps: a killed tritonserver's, once it and its model
    processes are gone. Regions of a server still running are mapped by it and stay. Returns the removed ones."""
    mapped = mapped_shared_memory()
    removed = [r for r in regions if str(r) not in mapped]
    for region in removed:
        region.unlink(missing_ok=True)
    return removed


def option_value(argv: list[str], name: str) -> str | None:
    """The value of `name VALUE` or `name=VALUE` in a command line (the last one given)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


class RestartBudget:
    """At most `limit` restarts within any `window` seconds; one more is a crash loop."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self.times: collections.deque[float] = collections.deque()

    def spend(self) -> bool:
        """Counts a restart; False when it is one too many for the window."""
        now = self.clock()
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        self.times.append(now)
        return len(self.times) <= self.limit


class SupervisedTriton:
    """tritonserver as our child in a process group of its own (so that one SIGKILL reaches its model processes
    too), and the model processes it has started."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None, log: Callable[[str], None] = print):
        self.command, self.env, self.log = command, env, log
        self.process: subprocess.Popen | None = None
        self.models: dict[int, str] = {}  # every model process seen since the start: pid -> model
        self.shm_before: set[Path] = set()
        self.terminated = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        self.shm_before = shared_memory_regions()
        self.models, self.terminated = {}, False
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True,
                                        preexec_fn=dying_with(os.getpid()))

    def failure(self, table: list[Process]) -> str | None:
        """Why tritonserver must be restarted, or None while it and every model process it started run.
        `table`: a fresh processes()."""
        code = self.process.poll()
        if code is not None:
            return f"tritonserver (pid {self.process.pid}) exited with {code}"
        running = model_processes(self.process.pid, table)
        self.models.update(running)
        for pid, model in self.models.items():
            if pid not in running:
                return f"model process {model} (pid {pid}) died"
        return None

    def terminate(self) -> None:
        """SIGTERM to tritonserver alone (it stops its model processes itself, after draining): once."""
        if self.process and self.process.poll() is None and not self.terminated:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    def signal_group(self, signum: int) -> None:
        """`signum` to tritonserver and every process of its group (its model processes)."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:  # tritonserver and all of its group are gone already
            pass

    def kill(self) -> None:
        """SIGKILL to tritonserver and its model processes; then their shared memory is removed."""
        if self.process is None:
            return
        self.signal_group(signal.SIGKILL)
        self.process.wait()
        self._wait_group_gone()
        self.remove_shared_memory()

    def stop(self, timeout: float, stacks_after: float | None = None) -> int:
        """Waits up to `timeout` seconds for tritonserver to exit after terminate(); then kills it. Its exit
        status (1 when it had to be killed), after removing what it left in /dev/shm. `stacks_after`: seconds
        after which the model processes still running print their threads' stacks into the log."""
        if self.process is None:
            return 0
        self.terminate()
        deadline = time.monotonic() + timeout
        try:
            if stacks_after is not None and stacks_after < timeout:
                try:
                    self.process.wait(stacks_after)
                except subprocess.TimeoutExpired:
                    self.request_stacks(f"tritonserver still runs {stacks_after:.0f} s after SIGTERM")
            code = self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.log(f"tritonserver did not exit within {timeout:.0f} s of SIGTERM; killing it")
            self.kill()
            return 1
        self._wait_group_gone()
        self.remove_shared_memory()
        return exit_status(code)

    def request_stacks(self, why: str) -> None:
        """SIGUSR1 to each model process still running: each prints its threads' stacks to the log."""
        running = model_processes(self.process.pid)
        self.log(f"{why}; the model processes still running print their threads' stacks: "
                 f"{', '.join(f'{model} (pid {pid})' for pid, model in running.items()) or 'none'}")
        for pid in running:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def remove_shared_memory(self) -> None:
        removed = remove_unmapped_regions(shared_memory_regions() - self.shm_before)
        if removed:
            self.log(f"removed {len(removed)} shared-memory region(s) tritonserver left in {SHM}")

    def _wait_group_gone(self) -> None:
        wait_group_gone(self.process.pid)


def dying_with(parent: int) -> Callable[[], None]:
    """What a child runs before its program (Popen's preexec_fn), `parent` being the process that forks it: SIGKILL
    when the parent dies (Linux's PR_SET_PDEATHSIG), so that a supervisor killed itself (SIGKILL, the out-of-memory
    killer) leaves no tritonserver running on in its own session, holding the ports. Kept across exec (the
    tritonserver wrapper script execs the binary). A parent that died between the fork and the prctl call would
    never send the signal: the child then finds another parent than `parent` and exits at once."""
    def die_with_parent() -> None:
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
    return die_with_parent


def exit_status(code: int) -> int:
    """A child's exit status as ours: 0 after the SIGTERM or SIGINT that stops it, 128 + N after another signal
    N (as a shell reports it), else its own."""
    if code in (-signal.SIGTERM, -signal.SIGINT):
        return 0
    return 128 - code if code < 0 else code


def reap_adopted(own: set[int], table: list[Process]) -> None:
    """Reaps zombies that are our children but not ones we started: model processes orphaned by a killed
    tritonserver are adopted by PID 1, which we are in a container; nobody else would reap them."""
    me = os.getpid()
    for p in table:
        if p.ppid == me and p.state == "Z" and p.pid not in own:
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass


class Supervisor:
    """Runs tritonserver (and optionally the HTTP frontend beside it) until a signal, restarting tritonserver
    when it or a model process dies. run() returns the exit status for this process."""

    def __init__(self, triton: SupervisedTriton, frontend: list[str] | None = None,
                 frontend_env: dict[str, str] | None = None, *, max_restarts: int = 5, window: float = 600,
                 log: Callable[[str], None] = print, poll: float = POLL_SECONDS):
        self.triton, self.frontend_command, self.frontend_env = triton, frontend, frontend_env
        self.budget = RestartBudget(max_restarts, window)
        self.log, self.poll = log, poll
        self.frontend: subprocess.Popen | None = None
        self.stopping = False
        exit_timeout = option_value(triton.command, "--exit-timeout-secs")
        self.exit_timeout = float(exit_timeout or EXIT_TIMEOUT_SECONDS)
        self.stop_timeout = self.exit_timeout + STOP_MARGIN_SECONDS

    def run(self) -> int:
        handlers = {s: signal.signal(s, self._signalled) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.triton.start()
            if self.frontend_command:
                self.frontend = subprocess.Popen(self.frontend_command, env=self.frontend_env,
                                                 preexec_fn=dying_with(os.getpid()))
            code = self._watch()
            return self._stop() if code is None else code
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _watch(self) -> int | None:
        """Until a signal (None) or a failure that ends this process (its exit status)."""
        while not self.stopping:
            time.sleep(self.poll)
            if self.frontend and self.frontend.poll() is not None and not self.stopping:
                self.log(f"the frontend exited with {self.frontend.returncode}; stopping tritonserver")
                self._stop()
                return exit_status(self.frontend.returncode)
            table = processes()
            reap_adopted({self.triton.pid, self.frontend.pid if self.frontend else None}, table)
            reason = self.triton.failure(table)
            if reason is None or self.stopping:
                continue
            if not self._restart(reason):
                return 1
        return None

    def _restart(self, reason: str) -> bool:
        """Kills tritonserver and starts it again; False (and everything stopped) in a crash loop."""
        self.log(f"{reason}; restarting tritonserver")
        self.triton.kill()
        if not self.budget.spend():
            self.log(f"tritonserver failed more than {self.budget.limit} times within {self.budget.window:.0f} s; "
                     f"giving up (exit 1) so that the container is restarted")
            self._stop()
            return False
        if not self.stopping:  # a signal during the kill: stay stopped
            self.triton.start()
        return True

    def _signalled(self, signum, frame) -> None:
        if self.stopping:  # the second signal: no more waiting
            self.log(f"{signal.Signals(signum).name} again: killing tritonserver")
            if self.triton.process:
                self.triton.signal_group(signal.SIGKILL)  # stop() then returns at once, and cleans up
            return
        self.stopping = True
        self.triton.terminate()
        if self.frontend and self.frontend.poll() is None:
            self.frontend.send_signal(signal.SIGTERM)

    def _stop(self) -> int:
        """tritonserver drained and stopped (killed past its exit timeout), the frontend stopped; the status."""
        self.stopping = True
        if self.frontend and self.frontend.poll() is None:
            self.frontend.send_signal(signal.SIGTERM)
        stacks_after = max(1.0, self.exit_timeout - STACKS_BEFORE_EXIT_TIMEOUT)
        code = self.triton.stop(self.stop_timeout, stacks_after=stacks_after)
        if self.frontend:
            self.frontend.wait()
        self.log(f"tritonserver exited with {code}; stopped")
        return code
