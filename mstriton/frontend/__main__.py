"""python -m mstriton.frontend --triton-grpc localhost:8001 --port 9000 [--api-key-file FILE]

Keys come from the environment ($MSTRITON_API_KEY, $MSTRITON_ADMIN_KEY) or files, never from the command line."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from ..serve import ADMIN_KEY_VARIABLE, API_KEY_VARIABLE, add_key_options, read_key
from ..params import LIMIT_VARIABLES, LIMITS
from .app import create_app
from .triton import Triton



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mstriton.frontend", description=(
        "OpenAI, MindSpore Serving and TGI HTTP APIs in front of a running tritonserver that serves mstriton "
        "models (talks to it over gRPC)."))
    parser.add_argument("--triton-grpc", default="localhost:8001", help="tritonserver's gRPC address")
    parser.add_argument("--triton-metrics", default=None,
                        help="tritonserver's metrics URL (default: http://HOST:8002/metrics of --triton-grpc)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9000)
    add_key_options(parser, "--api-key", API_KEY_VARIABLE, "require 'Authorization: Bearer KEY' on every route but "
                    "/health and /metrics (none: open); it is also sent to tritonserver, whose inference may want it")
    add_key_options(parser, "--triton-admin-key", ADMIN_KEY_VARIABLE, "the key of tritonserver's admin APIs, which "
                    "the frontend reads the models from (`python -m mstriton.serve` sets the variable)")
    parser.add_argument("--default-model", default=None,
                        help="the model TGI's routes serve (default: the first LLM the server serves)")
    parser.add_argument("--max-body-bytes", type=int, default=LIMITS.max_body_bytes,
                        help=f"refuse request bodies larger than this with 413 (default: "
                             f"${LIMIT_VARIABLES['max_body_bytes']}, else {LIMITS.max_body_bytes}); the other limits "
                             f"(prompt bytes, stop strings, messages) are set by the environment variables "
                             f"{', '.join('$' + v for k, v in LIMIT_VARIABLES.items() if k != 'max_body_bytes')}")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        api_key = read_key(args.api_key_file, API_KEY_VARIABLE, "the API key")
        admin_key = read_key(args.triton_admin_key_file, ADMIN_KEY_VARIABLE, "the admin key")
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    app = create_app(Triton(args.triton_grpc, args.triton_metrics, admin_key, api_key=api_key),
                     api_key=api_key,
                     default_model=args.default_model)
    logging.getLogger("mstriton.frontend").info(
        "serving OpenAI /v1, MindSpore Serving /models and TGI /generate on %s:%d for tritonserver at %s%s",
        args.host, args.port, args.triton_grpc, " (API key required)" if api_key else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
