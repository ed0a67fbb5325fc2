"""`make run`: tritonserver and the HTTP frontend side by side, started and stopped together.

    python -m mstriton.serve --model-repository model_repository [--frontend-port 9000] [--api-key KEY]

SIGINT or SIGTERM stops both (tritonserver drains its running streams first); if either exits on its own, the
other is stopped too and the exit status is the one that exited first, so that a supervisor sees the failure.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mstriton.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--frontend-port", type=int, default=9000)
    parser.add_argument("--api-key", default=None, help="the frontend's API key (default: $MSTRITON_API_KEY)")
    args = parser.parse_args(argv)

    tritonserver = Path(sys.prefix) / "bin" / "tritonserver"
    triton = subprocess.Popen([str(tritonserver), "--model-repository", args.model_repository,
                               "--http-port", str(args.http_port), "--grpc-port", str(args.grpc_port),
                               "--metrics-port", str(args.metrics_port)])
    frontend_command = [sys.executable, "-m", "mstriton.frontend", "--triton-grpc", f"localhost:{args.grpc_port}",
                        "--triton-metrics", f"http://localhost:{args.metrics_port}/metrics",
                        "--port", str(args.frontend_port)]
    if args.api_key:
        frontend_command += ["--api-key", args.api_key]
    frontend = subprocess.Popen(frontend_command)
    print(f"mstriton.serve: tritonserver (HTTP {args.http_port}, gRPC {args.grpc_port}, metrics "
          f"{args.metrics_port}) and the HTTP frontend (OpenAI /v1, MindSpore Serving /models, TGI /generate on "
          f"{args.frontend_port}); the frontend's /health turns 200 once the models are loaded", flush=True)

    def stop(*_):
        for process in (frontend, triton):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while triton.poll() is None and frontend.poll() is None:
        time.sleep(0.5)
    first = triton if triton.poll() is not None else frontend
    code = first.returncode
    stop()
    for process in (frontend, triton):
        process.wait()
    name = "tritonserver" if first is triton else "the frontend"
    print(f"mstriton.serve: {name} exited with {code}; both are stopped", flush=True)
    return 0 if code in (-signal.SIGTERM, -signal.SIGINT) else code


if __name__ == "__main__":
    sys.exit(main())
