"""Start and stop the servers the benchmarks and the soak measure, on free ports: tritonserver (TritonServer,
running_server), the HTTP frontend in front of it (FrontendServer, running_frontend; frontend_running starts an
exited one again), all of it through `python -m mstriton.serve` (ServeProcess), and the environment a server
started from a benchmark gets (python_environment: not what importing MindSpore left in the C environment).

tritonserver and the frontend are started by mstriton/server_process.py, which the integration tests use too;
this module is the benchmarks' one door to it."""

from __future__ import annotations

import dataclasses
import http.client
import secrets
import subprocess
import sys
from pathlib import Path

from mstriton.serve import ADMIN_KEY_VARIABLE
from mstriton.server_process import (MINDSPORE_C_VARIABLES, FrontendServer, TritonServer, free_port,  # noqa: F401
                                     metric_value, python_environment, running_frontend, running_server, terminate,
                                     wait_until_healthy)


def metrics_text(port: int) -> str:
    """The Prometheus text a server answers on http://127.0.0.1:PORT/metrics (tritonserver's metrics port, or the
    frontend's), in a connection of its own, closed at once."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def frontend_running(frontend: FrontendServer, triton: TritonServer, log: Path,
                     timeout: float = 120) -> tuple[FrontendServer, str | None]:
    """`frontend` while it runs; else (something else on a shared machine may end it) a new one in front of
    `triton`, logging to LOG with the restart's number, and what happened."""
    code = frontend.process.poll()
    if code is None:
        return frontend, None
    restarts = getattr(frontend, "restarts", 0) + 1
    again = FrontendServer(triton, log.with_name(f"{log.stem}.restart{restarts}{log.suffix}"))
    again.restarts = restarts
    again.wait_ready(timeout)
    return again, f"the frontend had exited (code {code}) and was started again"


@dataclasses.dataclass
class Ports:
    http: int
    grpc: int
    metrics: int
    frontend: int


class ServeProcess:
    """`python -m mstriton.serve` (tritonserver and the frontend, under its supervisor) on free ports, with an admin
    key (a random one unless given) in its environment, never on a command line (mstriton.serve refuses one). `env`:
    variables set on top of that environment, which tritonserver and its model processes inherit (e.g.
    MSTRITON_KERNEL_ACTIVATIONS for the kernels in the decode model's process)."""

    def __init__(self, repository: Path, log: Path, admin_key: str | None = None, env: dict[str, str] | None = None):
        self.ports = Ports(http=free_port(), grpc=free_port(), metrics=free_port(), frontend=free_port())
        self.log = log
        command = [sys.executable, "-m", "mstriton.serve", "--model-repository", str(repository),
                   "--http-port", str(self.ports.http), "--grpc-port", str(self.ports.grpc),
                   "--metrics-port", str(self.ports.metrics), "--frontend-port", str(self.ports.frontend)]
        environment = {**python_environment(), **(env or {}),
                       ADMIN_KEY_VARIABLE: admin_key or secrets.token_urlsafe(24)}
        self.process = subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True, env=environment)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 900, frontend_timeout: float = 120) -> None:
        """Until tritonserver is ready (it compiles its graphs first: minutes) and then the frontend healthy."""
        wait_until_healthy(self.process, f"http://127.0.0.1:{self.ports.http}/v2/health/ready", "tritonserver",
                           self.tail, timeout)
        wait_until_healthy(self.process, f"http://127.0.0.1:{self.ports.frontend}/health", "the frontend",
                           self.tail, frontend_timeout)

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM (mstriton.serve passes it on and waits for tritonserver's drain), SIGKILL after `timeout`."""
        return terminate(self.process, timeout)
