"""`make run`: tritonserver and the HTTP frontend side by side, started and stopped together; with `--no-frontend`,
tritonserver alone (the command of the container images and of the KServe runtime).

    python -m mstriton.serve --model-repository model_repository [--frontend-port 9000] [--api-key KEY]
        [--admin-key KEY] [--open-api GROUP[,GROUP...]|all] [--no-frontend] [other tritonserver options]

tritonserver's admin APIs (the groups in ADMIN_APIS: model repository, model config, shared memory, statistics,
trace, logging) are closed behind an admin key, over HTTP and gRPC alike; inference, health and metadata stay
open. A request to a closed group needs the HTTP header `admin-key: KEY`, or over gRPC the metadata
`triton-grpc-protocol-admin-key: KEY` (tritonserver prefixes the names of gRPC keys); without it tritonserver
answers HTTP 403 or gRPC UNAVAILABLE. The key is --admin-key, else $MSTRITON_ADMIN_KEY, else a new random one
printed once at start. `--open-api model-config,statistics` leaves those groups open, `--open-api all` every
group. The frontend, which reads the repository index and model configs, is given the key. Options this
launcher does not know go to tritonserver as they are.

tritonserver runs under mstriton.supervisor's Supervisor, with or without the frontend: when a model process
(a Python-backend stub) or tritonserver itself dies, tritonserver is killed, its shared memory removed and it is
started again; more than --max-restarts restarts within --restart-window seconds and this process exits 1, for
the container runtime to restart it. SIGINT or SIGTERM stops both (tritonserver drains its running streams first)
and the exit status is tritonserver's (0). If the frontend exits on its own, tritonserver is stopped too and the
exit status is the frontend's.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from pathlib import Path

from .supervisor import Supervisor, SupervisedTriton

ADMIN_KEY_VARIABLE = "MSTRITON_ADMIN_KEY"
ADMIN_HEADER = "admin-key"
# tritonserver 2.51 checks a gRPC restricted protocol's key under this prefix (its refusal names the header).
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# The groups `tritonserver --help` lists for --http-restricted-api / --grpc-restricted-protocol, less the three
# every client needs (health, metadata, inference): these read or change the server's state, not a model's output.
ADMIN_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
# A key goes into an HTTP header, gRPC metadata and tritonserver's command line: visible ASCII, no spaces.
_KEY = re.compile(r"[\x21-\x7e]+")


def http_admin_headers(key: str | None) -> dict[str, str]:
    """The HTTP headers that open the admin APIs (none without a key)."""
    return {ADMIN_HEADER: key} if key else {}


def grpc_admin_headers(key: str | None) -> dict[str, str]:
    """The gRPC metadata that opens the admin APIs (none without a key)."""
    return {GRPC_ADMIN_HEADER: key} if key else {}


def closed_apis(open_apis=()) -> list[str]:
    return [api for api in ADMIN_APIS if api not in open_apis]


def restricted_api_args(key: str, open_apis=()) -> list[str]:
    """tritonserver's options that close every admin API not in `open_apis` behind `key` (header ADMIN_HEADER)."""
    if not _KEY.fullmatch(key):
        raise ValueError("the admin key must be printable ASCII without spaces")
    closed = ",".join(closed_apis(open_apis))
    if not closed:
        return []
    return [f"--http-restricted-api={closed}:{ADMIN_HEADER}={key}",
            f"--grpc-restricted-protocol={closed}:{ADMIN_HEADER}={key}"]


def api_groups(text: str) -> list[str]:
    """--open-api's value: admin API groups separated by commas, or `all`."""
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if groups == ["all"]:
        return list(ADMIN_APIS)
    unknown = [g for g in groups if g not in ADMIN_APIS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'all' or some of {', '.join(ADMIN_APIS)}")
    return groups


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """This launcher's options, and the rest, which go to tritonserver."""
    parser = argparse.ArgumentParser(prog="python -m mstriton.serve", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)  # whole names only: the rest is tritonserver's
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--frontend-port", type=int, default=9000)
    parser.add_argument("--api-key", default=None, help="the frontend's API key (default: $MSTRITON_API_KEY)")
    parser.add_argument("--admin-key", default=os.environ.get(ADMIN_KEY_VARIABLE) or None,
                        help=f"the key of tritonserver's admin APIs (default: ${ADMIN_KEY_VARIABLE}; none: a new "
                             f"one, printed once)")
    parser.add_argument("--open-api", type=api_groups, action="append", default=[], metavar="GROUP[,GROUP]|all",
                        help=f"leave these admin API groups open ({', '.join(ADMIN_APIS)}), or all of them")
    parser.add_argument("--no-frontend", action="store_true", help="run tritonserver alone")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="restarts of tritonserver (after it or a model process died) allowed within "
                             "--restart-window; one more and this process exits 1 (default: 5)")
    parser.add_argument("--restart-window", type=float, default=600, metavar="SECONDS", help="(default: 600)")
    return parser.parse_known_args(argv)


def admin_restriction(args) -> tuple[str | None, list[str]]:
    """The admin key in use (None when every group is open) and tritonserver's options that apply it. A key made
    here is printed, once: it is nowhere else."""
    open_apis = {api for groups in args.open_api for api in groups}
    closed = closed_apis(open_apis)
    if not closed:
        print("mstriton.serve: every tritonserver API is open (--open-api)", flush=True)
        return None, []
    key = args.admin_key or secrets.token_urlsafe(32)
    options = restricted_api_args(key, open_apis)
    where = (f"given by --admin-key or ${ADMIN_KEY_VARIABLE}" if args.admin_key
             else f"none given (--admin-key, ${ADMIN_KEY_VARIABLE}), this one was made for this run: {key}")
    print(f"mstriton.serve: tritonserver's {', '.join(closed)} APIs need the admin key, in the HTTP header "
          f"'{ADMIN_HEADER}' or the gRPC metadata '{GRPC_ADMIN_HEADER}'; the key is {where}", flush=True)
    return key, options


def triton_command(args, restriction: list[str], passthrough: list[str]) -> list[str]:
    tritonserver = Path(sys.prefix) / "bin" / "tritonserver"
    return [str(tritonserver), "--model-repository", args.model_repository, "--http-port", str(args.http_port),
            "--grpc-port", str(args.grpc_port), "--metrics-port", str(args.metrics_port), *restriction, *passthrough]


def frontend_command(args) -> list[str]:
    command = [sys.executable, "-m", "mstriton.frontend", "--triton-grpc", f"localhost:{args.grpc_port}",
               "--triton-metrics", f"http://localhost:{args.metrics_port}/metrics", "--port", str(args.frontend_port)]
    if args.api_key:
        command += ["--api-key", args.api_key]
    return command


def environments(key: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """tritonserver's environment and the frontend's. The frontend gets the admin key in its environment rather
    than on its command line (which every local user can list); tritonserver has it in its options already, and
    its model processes have no use for it."""
    triton = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_VARIABLE}
    frontend = dict(triton, **({ADMIN_KEY_VARIABLE: key} if key else {}))
    return triton, frontend


def main(argv=None) -> int:
    args, passthrough = parse_args(argv)
    try:
        key, restriction = admin_restriction(args)
    except ValueError as exc:  # a key tritonserver could not be given
        sys.exit(f"mstriton.serve: {exc}")
    triton_env, frontend_env = environments(key)
    triton = SupervisedTriton(triton_command(args, restriction, passthrough), triton_env, log)
    frontend = None if args.no_frontend else frontend_command(args)
    log(f"tritonserver (HTTP {args.http_port}, gRPC {args.grpc_port}, metrics {args.metrics_port})"
        + ("" if args.no_frontend else
           f" and the HTTP frontend (OpenAI /v1, MindSpore Serving /models, TGI /generate on {args.frontend_port}); "
           f"the frontend's /health turns 200 once the models are loaded")
        + f"; tritonserver is restarted when it or one of its model processes dies (at most {args.max_restarts} "
          f"times in {args.restart_window:.0f} s)")
    return Supervisor(triton, frontend, frontend_env, max_restarts=args.max_restarts, window=args.restart_window,
                      log=log).run()


def log(message: str) -> None:
    print(f"mstriton.serve: {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
