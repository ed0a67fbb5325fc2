"""Every /proc read of the benchmarks and the soak: CPU time and resident memory by pid, a server's processes
(its descendants, the model process of each model, tritonserver's, the frontend's), the machine's memory and CPU.

The process table is the product's (mstriton.supervisor: the supervisor finds the model processes it watches the
same way); this module only reads it. Linux only.
"""

from __future__ import annotations

import math
import os
import platform
import threading
from pathlib import Path
from typing import Callable

from mstriton.supervisor import model_processes, processes

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 2**20


# ---- one process --------------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far (/proc/PID/stat); OSError once it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` (/proc/PID/statm; the VmRSS of /proc/PID/status); OSError once it is gone."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


def label(pid: int) -> str:
    """tritonserver, or the model a python-backend stub serves (its model.py's folder), or the command."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    for arg in args[1:]:
        if arg.endswith(b"/model.py"):
            return Path(arg.decode(errors="replace")).parent.parent.name
    return Path(args[0].decode(errors="replace")).name or str(pid)


# ---- a server's processes -----------------------------------------------------------------------------------

def descendants(root: int) -> list[int]:
    """`root` and every process below it (tritonserver and its model processes; mstriton.serve and all it ran)."""
    children: dict[int, list[int]] = {}
    for p in processes():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def resident_bytes(root: int) -> int:
    """Resident memory of a process and all its descendants."""
    total = 0
    for pid in descendants(root):
        try:
            total += rss_bytes(pid)
        except OSError:
            pass
    return total


def served_processes(server_pid: int) -> dict[str, int]:
    """tritonserver and every model process it started (not another server's): name -> pid."""
    return {"tritonserver": server_pid, **{model: pid for pid, model in model_processes(server_pid).items()}}


def serve_processes(serve_pid: int) -> dict[str, int]:
    """What `python -m mstriton.serve` (pid `serve_pid`) runs: tritonserver, each of its model processes
    ("stub MODEL") and the frontend: name -> pid."""
    table = processes()
    found = {}
    for p in table:
        if p.ppid != serve_pid or not p.argv:
            continue
        if any(b"mstriton.frontend" in a for a in p.argv):
            found["frontend"] = p.pid
        elif p.argv[0].endswith(b"tritonserver"):
            found["tritonserver"] = p.pid
            for pid, model in sorted(model_processes(p.pid, table).items(), key=lambda item: item[1]):
                found[f"stub {model}"] = pid
    return found


def rss_mib_by_process(serve_pid: int) -> dict[str, float]:
    """MiB resident of each process serve_processes names."""
    return {name: rss_bytes(pid) / MIB for name, pid in serve_processes(serve_pid).items()}


def mapped_files(root: int, needle: str) -> list[str]:
    """The files whose path holds `needle` that `root` or a process below it maps (/proc/PID/maps)."""
    paths = set()
    for pid in descendants(root):
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if needle in line:
                    paths.add(line.split()[-1])
        except OSError:
            pass
    return sorted(paths)


def other_tritonservers(ours: int) -> int:
    """tritonserver processes running on the machine that are not `ours` or below it."""
    mine = set(descendants(ours))
    return sum(1 for p in processes() if p.pid not in mine and p.argv and b"bin/tritonserver" in p.argv[0])


# ---- the machine --------------------------------------------------------------------------------------------

def meminfo_bytes(field: str) -> int | None:
    """A field of /proc/meminfo (MemAvailable, MemTotal, ...) in bytes; None when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes() -> int:
    return meminfo_bytes("MemAvailable") or 0


def cpu_model() -> str | None:
    """The first `model name` of /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU feature flags of an x86-64 Linux machine (the first `flags` line of /proc/cpuinfo), or None
    elsewhere or when they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def cores() -> int:
    """Cores this process may run on (not nproc: it honours OMP_NUM_THREADS, which importing MindSpore sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---- a sampler ----------------------------------------------------------------------------------------------

class MemoryWatch(threading.Thread):
    """Every `interval` s: the resident memory of `server` (a TritonServer) and its model processes (peaks kept
    per label until reset()), and the machine's available memory. Below `min_available` bytes it stops the
    server (ours only), before the kernel's OOM killer picks a process, which on a shared machine may be
    someone else's. `say` prints what it did."""

    def __init__(self, server, min_available: int, interval: float = 0.25, say: Callable[[str], None] = print):
        super().__init__(daemon=True)
        self.server, self.min_available, self.interval, self.say = server, min_available, interval, say
        self.halt = threading.Event()
        self.tripped: str | None = None
        self.lowest_available = math.inf
        self.reset()

    def reset(self) -> None:
        self.peak_total, self.peaks, self.lowest_available = 0, {}, math.inf

    def sample(self) -> None:
        total, by_label = 0, {}
        for pid in descendants(self.server.process.pid):
            try:
                rss = rss_bytes(pid)
            except (OSError, IndexError, ValueError):
                continue
            name = label(pid)
            total += rss
            by_label[name] = by_label.get(name, 0) + rss
        self.peak_total = max(self.peak_total, total)
        for name, rss in by_label.items():
            self.peaks[name] = max(self.peaks.get(name, 0), rss)
        available = available_bytes()
        self.lowest_available = min(self.lowest_available, available)
        if available < self.min_available and self.tripped is None and self.server.process.poll() is None:
            self.tripped = (f"memory guard: {available / 2**30:.1f} GiB available (< {self.min_available / 2**30:.1f}),"
                            f" the server held {total / 2**30:.1f} GiB ("
                            + ", ".join(f"{k} {v / 2**30:.1f}" for k, v in sorted(by_label.items(),
                                                                                   key=lambda kv: -kv[1])[:4])
                            + "): the server was stopped")
            self.say(self.tripped)
            self.server.stop(timeout=10)

    def figures(self) -> dict:
        return {"server_peak_rss_gib": round(self.peak_total / 2**30, 2),
                "peak_rss_gib_by_process": {k: round(v / 2**30, 2) for k, v in
                                            sorted(self.peaks.items(), key=lambda kv: -kv[1]) if v > 2**28},
                "lowest_available_gib": round(self.lowest_available / 2**30, 2)
                if math.isfinite(self.lowest_available) else None}

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - the watch must not end the run
                self.say(f"memory watch: {type(exc).__name__}: {exc}")
