"""Start and stop the servers the benchmarks and the soak measure, on free ports: tritonserver (TritonServer,
running_server), the HTTP frontend in front of it (FrontendServer, running_frontend), all of it through
`python -m mstriton.serve` (ServeProcess), and the environment a server started from a benchmark gets
(python_environment: not what importing MindSpore left in the C environment).

tritonserver and the frontend are started by mstriton/server_process.py, which the integration tests use too;
this module is the benchmarks' one door to it."""

from __future__ import annotations

from pathlib import Path

from mstriton.server_process import (MINDSPORE_C_VARIABLES, FrontendServer, TritonServer, free_port,  # noqa: F401
                                     metric_value, python_environment, running_frontend, running_server, terminate,
                                     wait_until_healthy)


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
