"""python -m mstriton.frontend --triton-grpc localhost:8001 --port 9000 [--api-key KEY]"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

import uvicorn

from ..serve import ADMIN_KEY_VARIABLE
from ..params import LIMIT_VARIABLES, LIMITS
from .app import create_app
from .triton import Triton

API_KEY_VARIABLE = "MSTRITON_API_KEY"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mstriton.frontend", description=(
        "OpenAI, MindSpore Serving and TGI HTTP APIs in front of a running tritonserver that serves mstriton "
        "models (talks to it over gRPC)."))
    parser.add_argument("--triton-grpc", default="localhost:8001", help="tritonserver's gRPC address")
    parser.add_argument("--triton-metrics", default=None,
                        help="tritonserver's metrics URL (default: http://HOST:8002/metrics of --triton-grpc)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                             f"(default: ${API_KEY_VARIABLE}; none: open)")
    parser.add_argument("--triton-admin-key", default=os.environ.get(ADMIN_KEY_VARIABLE),
                        help=f"the key of tritonserver's admin APIs, which the frontend reads the models from "
                             f"(default: ${ADMIN_KEY_VARIABLE}, as `python -m mstriton.serve` sets it)")
    parser.add_argument("--default-model", default=None,
                        help="the model TGI's routes serve (default: the first LLM the server serves)")
    parser.add_argument("--max-body-bytes", type=int, default=LIMITS.max_body_bytes,
                        help=f"refuse request bodies larger than this with 413 (default: "
                             f"${LIMIT_VARIABLES['max_body_bytes']}, else {LIMITS.max_body_bytes}); the other limits "
                             f"(prompt bytes, stop strings, messages) are set by the environment variables "
                             f"{', '.join('$' + v for k, v in LIMIT_VARIABLES.items() if k != 'max_body_bytes')}")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    app = create_app(Triton(args.triton_grpc, args.triton_metrics, args.triton_admin_key or None),
                     api_key=args.api_key or None,
                     default_model=args.default_model)
    logging.getLogger("mstriton.frontend").info(
        "serving OpenAI /v1, MindSpore Serving /models and TGI /generate on %s:%d for tritonserver at %s%s",
        args.host, args.port, args.triton_grpc, " (API key required)" if args.api_key else "")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
