"""`make run`: tritonserver and the HTTP frontend side by side, started and stopped together; with `--no-frontend`,
tritonserver alone (the command of the container images and of the KServe runtime).

    python -m mstriton.serve --model-repository model_repository [--frontend-port 9000] [--api-key-file FILE]
        [--admin-key-file FILE] [--open-api GROUP[,GROUP...]|all] [--expose-triton] [--no-frontend]
        [other tritonserver options]

Who can reach what. With the frontend, it is the public door (every address, port 9000) and tritonserver listens on
127.0.0.1 only (HTTP, gRPC and metrics): its inference ports do not check the API key, and its HTTP JSON parser
crashes on some bodies. `--expose-triton` (and `--no-frontend`, where tritonserver is the door) make tritonserver
listen on every address; then, when an API key is configured, its inference needs the key too, through
tritonserver's restricted-API groups: the HTTP header `Authorization: Bearer KEY` as at the frontend, over gRPC the
metadata `triton-grpc-protocol-authorization: Bearer KEY` (tritonserver prefixes the names of gRPC keys).

tritonserver's admin APIs (the groups in ADMIN_APIS: model repository, model config, shared memory, statistics,
trace, logging) are closed behind an admin key, over HTTP and gRPC alike; health and metadata stay open. A request
to a closed group needs the HTTP header `admin-key: KEY`, or over gRPC the metadata
`triton-grpc-protocol-admin-key: KEY`; without it tritonserver answers HTTP 403 or gRPC UNAVAILABLE. The key is
read from --admin-key-file, else $MSTRITON_ADMIN_KEY, else a new random one is printed once at start.
`--open-api model-config,statistics` leaves those groups open, `--open-api all` every group. The frontend, which
reads the repository index and model configs, is given the key. The API key is read from --api-key-file, else
$MSTRITON_API_KEY.

No key is ever on a command line (every local user can read /proc/PID/cmdline): the frontend gets its keys in its
environment; tritonserver, which takes its restricted-API keys only as options, gets placeholders there that
mstriton.argv_secrets fills from its environment before its main() runs. Options this launcher does not know go
to tritonserver as they are.

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

from . import argv_secrets
from .supervisor import Supervisor, SupervisedTriton

ADMIN_KEY_VARIABLE = "MSTRITON_ADMIN_KEY"
API_KEY_VARIABLE = "MSTRITON_API_KEY"
ADMIN_HEADER = "admin-key"
# tritonserver 2.51 checks a gRPC restricted protocol's key under this prefix (its refusal names the header).
GRPC_PREFIX = "triton-grpc-protocol-"
GRPC_ADMIN_HEADER = f"{GRPC_PREFIX}{ADMIN_HEADER}"
# An exposed tritonserver's inference, with an API key: the frontend's header, and its gRPC spelling.
INFERENCE_HEADER = "authorization"
GRPC_INFERENCE_HEADER = f"{GRPC_PREFIX}{INFERENCE_HEADER}"
LOOPBACK = "127.0.0.1"
ADDRESS_OPTIONS = ("--http-address", "--grpc-address", "--metrics-address")  # tritonserver's
# Where tritonserver's environment holds the keys that argv_secrets puts in place of its options' placeholders.
SECRET_VARIABLES = {"admin": "MSTRITON_SECRET_ADMIN_KEY", "api": "MSTRITON_SECRET_API_KEY"}
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


def grpc_inference_headers(api_key: str | None) -> dict[str, str]:
    """The gRPC metadata that an exposed tritonserver with an API key wants on inference (none without a key)."""
    return {GRPC_INFERENCE_HEADER: f"Bearer {api_key}"} if api_key else {}


def closed_apis(open_apis=()) -> list[str]:
    return [api for api in ADMIN_APIS if api not in open_apis]


def check_key(key: str, what: str = "the admin key") -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"{what} must be printable ASCII without spaces")
    return key


def restricted_api_args(key: str, open_apis=(), inference_key: str | None = None) -> list[str]:
    """tritonserver's options that close every admin API not in `open_apis` behind `key` (header ADMIN_HEADER)
    and, given `inference_key`, inference behind `Authorization: Bearer inference_key`. A key may be an
    argv_secrets placeholder."""
    closed = ",".join(closed_apis(open_apis))
    options = []
    if closed:
        check_key(key)
        options += [f"--http-restricted-api={closed}:{ADMIN_HEADER}={key}",
                    f"--grpc-restricted-protocol={closed}:{ADMIN_HEADER}={key}"]
    if inference_key:
        check_key(inference_key, "the API key")
        options += [f"--http-restricted-api=inference:{INFERENCE_HEADER}=Bearer {inference_key}",
                    f"--grpc-restricted-protocol=inference:{INFERENCE_HEADER}=Bearer {inference_key}"]
    return options


def api_groups(text: str) -> list[str]:
    """--open-api's value: admin API groups separated by commas, or `all`."""
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if groups == ["all"]:
        return list(ADMIN_APIS)
    unknown = [g for g in groups if g not in ADMIN_APIS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'all' or some of {', '.join(ADMIN_APIS)}")
    return groups


class _KeyOnCommandLine(argparse.Action):
    """--api-key KEY / --admin-key KEY: refused, naming the ways that keep the key off the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        variable = API_KEY_VARIABLE if option_string == "--api-key" else ADMIN_KEY_VARIABLE
        parser.error(f"{option_string} would put the key on the command line, which every local user can read "
                     f"(ps, /proc/PID/cmdline): give it in ${variable} or a file ({option_string}-file FILE)")


def add_key_options(parser: argparse.ArgumentParser, option: str, variable: str, what: str) -> None:
    """`option`-file FILE, and `option` KEY refused (see _KeyOnCommandLine)."""
    parser.add_argument(f"{option}-file", metavar="FILE", type=Path, default=None,
                        help=f"{what}: the first line of FILE (default: ${variable})")
    parser.add_argument(option, action=_KeyOnCommandLine, help=argparse.SUPPRESS)


def read_key(path: Path | None, variable: str, what: str) -> str | None:
    """The key in the file `path` (its first line), else in $variable, else None. ValueError names the file."""
    if path is None:
        key = os.environ.get(variable) or None
        return check_key(key, f"{what} in ${variable}") if key else None
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc}") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"{what}: {path} is empty")
    return check_key(lines[0].strip(), f"{what} in {path}")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """This launcher's options, and the rest, which go to tritonserver."""
    parser = argparse.ArgumentParser(prog="python -m mstriton.serve", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)  # whole names only: the rest is tritonserver's
    parser.add_argument("--model-repository", default="model_repository")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--frontend-port", type=int, default=9000)
    add_key_options(parser, "--api-key", API_KEY_VARIABLE, "the API key every door wants (as 'Authorization: "
                    "Bearer KEY')")
    add_key_options(parser, "--admin-key", ADMIN_KEY_VARIABLE, "the key of tritonserver's admin APIs (none: a new "
                    "one, printed once)")
    parser.add_argument("--open-api", type=api_groups, action="append", default=[], metavar="GROUP[,GROUP]|all",
                        help=f"leave these admin API groups open ({', '.join(ADMIN_APIS)}), or all of them")
    parser.add_argument("--expose-triton", action="store_true",
                        help="tritonserver's HTTP, gRPC and metrics ports listen on every address, not only "
                             "127.0.0.1 (with an API key, their inference needs it too)")
    parser.add_argument("--no-frontend", action="store_true",
                        help="run tritonserver alone, as the public door (implies --expose-triton)")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="restarts of tritonserver (after it or a model process died) allowed within "
                             "--restart-window; one more and this process exits 1 (default: 5)")
    parser.add_argument("--restart-window", type=float, default=600, metavar="SECONDS", help="(default: 600)")
    return parser.parse_known_args(argv)


def triton_exposed(args, passthrough: list[str]) -> bool:
    """Whether tritonserver listens beyond loopback: without the frontend, with --expose-triton, or with an address
    option of tritonserver's own given through that is not a loopback one."""
    if args.no_frontend or args.expose_triton:
        return True
    for i, arg in enumerate(passthrough):
        name, _, value = arg.partition("=")
        if name in ADDRESS_OPTIONS:
            value = value or (passthrough[i + 1] if i + 1 < len(passthrough) else "")
            if not (value.startswith("127.") or value in ("localhost", "::1")):
                return True
    return False


def admin_restriction(args) -> tuple[str | None, list[str]]:
    """The admin key in use (None when every group is open) and tritonserver's options that apply it (the key as
    an argv_secrets placeholder). A key made here is printed, once: it is nowhere else."""
    open_apis = {api for groups in args.open_api for api in groups}
    closed = closed_apis(open_apis)
    if not closed:
        print("mstriton.serve: every tritonserver API is open (--open-api)", flush=True)
        return None, []
    given = read_key(args.admin_key_file, ADMIN_KEY_VARIABLE, "the admin key")
    key = given or secrets.token_urlsafe(32)
    options = restricted_api_args(argv_secrets.placeholder(SECRET_VARIABLES["admin"]), open_apis)
    where = (f"given in {args.admin_key_file or '$' + ADMIN_KEY_VARIABLE}" if given
             else f"none given (--admin-key-file, ${ADMIN_KEY_VARIABLE}), this one was made for this run: {key}")
    print(f"mstriton.serve: tritonserver's {', '.join(closed)} APIs need the admin key, in the HTTP header "
          f"'{ADMIN_HEADER}' or the gRPC metadata '{GRPC_ADMIN_HEADER}'; the key is {where}", flush=True)
    return key, options


def inference_restriction(api_key: str | None, exposed: bool) -> list[str]:
    """With an API key, an exposed tritonserver's inference needs it too (a loopback one serves the frontend)."""
    if not (api_key and exposed):
        return []
    print(f"mstriton.serve: tritonserver's inference needs the API key too ('Authorization: Bearer KEY', over gRPC "
          f"the metadata '{GRPC_INFERENCE_HEADER}')", flush=True)
    return restricted_api_args("", ADMIN_APIS, inference_key=argv_secrets.placeholder(SECRET_VARIABLES["api"]))


def triton_command(args, restriction: list[str], passthrough: list[str]) -> list[str]:
    tritonserver = Path(sys.prefix) / "bin" / "tritonserver"
    given = {arg.partition("=")[0] for arg in passthrough}
    addresses = [] if triton_exposed(args, passthrough) else [
        word for option in ADDRESS_OPTIONS if option not in given for word in (option, LOOPBACK)]
    return [str(tritonserver), "--model-repository", args.model_repository, "--http-port", str(args.http_port),
            "--grpc-port", str(args.grpc_port), "--metrics-port", str(args.metrics_port), *addresses, *restriction,
            *passthrough]


def frontend_command(args) -> list[str]:
    """The frontend's command line: no key on it (they are in its environment)."""
    return [sys.executable, "-m", "mstriton.frontend", "--triton-grpc", f"{LOOPBACK}:{args.grpc_port}",
            "--triton-metrics", f"http://{LOOPBACK}:{args.metrics_port}/metrics", "--port", str(args.frontend_port)]


def environments(admin_key: str | None, api_key: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """tritonserver's environment and the frontend's. The frontend gets its keys in its environment, never on its
    command line (which every local user can list). tritonserver gets them under SECRET_VARIABLES, for
    argv_secrets to fill its options' placeholders (it then removes them: its model processes never see them)."""
    plain = {k: v for k, v in os.environ.items() if k not in (ADMIN_KEY_VARIABLE, API_KEY_VARIABLE)}
    secret = {SECRET_VARIABLES[kind]: key for kind, key in (("admin", admin_key), ("api", api_key)) if key}
    triton = argv_secrets.with_secrets(plain, "tritonserver", secret) if secret else plain
    frontend = dict(plain, **({ADMIN_KEY_VARIABLE: admin_key} if admin_key else {}),
                    **({API_KEY_VARIABLE: api_key} if api_key else {}))
    return triton, frontend


def main(argv=None) -> int:
    args, passthrough = parse_args(argv)
    try:
        api_key = read_key(args.api_key_file, API_KEY_VARIABLE, "the API key")
        key, restriction = admin_restriction(args)
        restriction += inference_restriction(api_key, triton_exposed(args, passthrough))
        triton_env, frontend_env = environments(key, api_key)
    except (ValueError, FileNotFoundError) as exc:  # a key tritonserver could not be given
        sys.exit(f"mstriton.serve: {exc}")
    triton = SupervisedTriton(triton_command(args, restriction, passthrough), triton_env, log)
    frontend = None if args.no_frontend else frontend_command(args)
    where = "every address" if triton_exposed(args, passthrough) else LOOPBACK
    log(f"tritonserver (HTTP {args.http_port}, gRPC {args.grpc_port}, metrics {args.metrics_port}, on {where})"
        + ("" if args.no_frontend else
           f" and the HTTP frontend (OpenAI /v1, MindSpore Serving /models, TGI /generate on {args.frontend_port}, "
           f"every address{', API key required' if api_key else ''}); the frontend's /health turns 200 once the "
           f"models are loaded")
        + f"; tritonserver is restarted when it or one of its model processes dies (at most {args.max_restarts} "
          f"times in {args.restart_window:.0f} s)")
    return Supervisor(triton, frontend, frontend_env, max_restarts=args.max_restarts, window=args.restart_window,
                      log=log).run()


def log(message: str) -> None:
    print(f"mstriton.serve: {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
