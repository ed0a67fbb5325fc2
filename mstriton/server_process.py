"""Start and stop the real tritonserver (the `.venv/bin/tritonserver` that `make install` writes) on free ports:
used by the integration tests and the serving benchmark."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .serve import ADMIN_KEY_VARIABLE, API_KEY_VARIABLE, restricted_api_args
from .supervisor import (SHM, SHM_PATTERNS, remove_unmapped_regions, shared_memory_regions,  # noqa: F401 (SHM*: API)
                         wait_group_gone)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What importing mindspore sets with C's setenv (see python_environment).
MINDSPORE_C_VARIABLES = ("OMP_NUM_THREADS", "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION")


def python_environment() -> dict[str, str]:
    """The environment for a child process, as Python sees it (os.environ). Importing mindspore sets
    OMP_NUM_THREADS=1 and PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python with C's setenv, which os.environ does
    not show but a child started without `env` inherits: a server started by a process that converted a model
    would run its MindSpore stubs on one OpenMP thread and its frontend on pure-Python protobuf. (The protobuf
    setting does show in os.environ: it is dropped when mindspore, which sets it, has been imported here.)"""
    environment = dict(os.environ)
    if "mindspore" in sys.modules and environment.get("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION") == "python":
        del environment["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"]
    return environment


def terminate(process: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL if `process` has not exited within `timeout` seconds; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_until_healthy(process: subprocess.Popen, url: str, name: str, log_tail, timeout: float) -> None:
    """Until `url` answers 200; fails with the log's tail if `process` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} not ready after {timeout}s:\n{log_tail()}")


class TritonServer:
    """`admin_key`: close the admin APIs behind it, as `make run` does (mstriton.serve); by default every API is
    open, as plain `tritonserver` leaves them."""

    def __init__(self, repository: Path, log: Path, admin_key: str | None = None):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        binary = Path(sys.prefix) / "bin" / "tritonserver"
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: run `make install`")
        self.log, self.repository = log, repository
        self.admin_key = admin_key
        self.shm_before = shared_memory_regions()
        self.process = subprocess.Popen(
            [str(binary), "--model-repository", str(repository), "--http-port", str(self.http_port),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
             # tritonserver's default, above the decode model's default shutdown_grace_seconds (20)
             "--exit-timeout-secs", "30", *(restricted_api_args(admin_key) if admin_key else [])],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env=python_environment())

    @property
    def http(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"localhost:{self.grpc_port}"

    def wait_ready(self, timeout: float = 300) -> None:
        wait_until_healthy(self.process, f"http://{self.http}/v2/health/ready", "tritonserver", self.tail, timeout)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://localhost:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            # SIGTERM to the server alone, as `docker stop` or Kubernetes send it; the server stops its
            # python-backend processes itself. (Signalling the whole group would kill them mid-request.)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        wait_group_gone(self.process.pid)  # its model processes map their regions until they are gone
        self.remove_orphaned_shared_memory()
        return self.process.returncode

    def remove_orphaned_shared_memory(self) -> None:
        """A killed tritonserver leaves its python-backend regions in /dev/shm (64 MiB each, about 14 per
        server here): remove those this server made that no live process still maps."""
        remove_unmapped_regions(shared_memory_regions() - self.shm_before)


@contextlib.contextmanager
def running_server(repository: Path, log: Path, admin_key: str | None = None):
    """A ready TritonServer, stopped at the end with SIGTERM; fails if it did not exit with 0 then (unless a
    test stopped it itself and set `stopped_by_test`). The log's tail is printed for the test report."""
    server = TritonServer(repository, log, admin_key)
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
        print(server.tail(30))
        if not getattr(server, "stopped_by_test", False):
            assert code == 0, f"tritonserver exited with {code} on SIGTERM"


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class FrontendServer:
    """The HTTP frontend (`python -m mstriton.frontend`) in front of a TritonServer, on a free port, given the
    server's admin key when it has one (as mstriton.serve gives it: in the environment)."""

    def __init__(self, triton: TritonServer, log: Path, api_key: str | None = None):
        self.port = free_port()
        self.log = log
        command = [sys.executable, "-m", "mstriton.frontend", "--triton-grpc", triton.grpc,
                   "--triton-metrics", f"http://localhost:{triton.metrics_port}/metrics",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        environment = python_environment()
        environment.pop(API_KEY_VARIABLE, None)
        if api_key:  # in its environment, as mstriton.serve gives it: never on a command line
            environment[API_KEY_VARIABLE] = api_key
        if triton.admin_key:
            environment[ADMIN_KEY_VARIABLE] = triton.admin_key
        self.process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True, env=environment)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until_healthy(self.process, f"{self.url}/health", "the frontend",
                           lambda: self.log.read_text(errors="replace")[-3000:], timeout)

    def stop(self) -> int:
        return terminate(self.process, timeout=20)


@contextlib.contextmanager
def running_frontend(triton: TritonServer, log: Path, api_key: str | None = None):
    frontend = FrontendServer(triton, log, api_key)
    try:
        frontend.wait_ready()
        yield frontend
    finally:
        frontend.stop()
