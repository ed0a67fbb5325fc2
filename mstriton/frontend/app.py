"""The frontend's FastAPI app: the three doors, the API key, errors in each door's format, /health, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..params import LIMITS, RequestLimits
from . import mindspore_serving_api, openai_api, responses_api, tgi_api
from .generation import ClientDisconnected
from .errors import ApiError
from .gateway_metrics import DecodeGaugeCollector, RequestTimings
from .metrics import FrontendMetrics, MetricsMiddleware
from .triton import Triton

# Routes anyone may call, with or without the API key.
OPEN_PATHS = {"/health", "/metrics"}


def create_app(triton: Triton, *, api_key: str | None = None, default_model: str | None = None,
               limits: RequestLimits = LIMITS) -> FastAPI:
    """`limits`: what one request may hold (params.RequestLimits: by default as the environment sets them)."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await triton.close()

    app = FastAPI(title="mstriton", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.triton, app.state.default_model, app.state.limits = triton, default_model, limits
    metrics = FrontendMetrics()
    # vLLM's names beside ours: the inference gateway's endpoint picker and KEDA read them (gateway_metrics.py)
    triton.timings = RequestTimings(metrics.registry)
    metrics.registry.register(DecodeGaugeCollector(triton.metrics_url, triton.timings))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(request, exc)

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, exc: ClientDisconnected):
        # nobody reads it; 499 (nginx's "client closed request") is what the request counter records
        return Response(status_code=499)

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return error_response(request, ApiError(404, f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return error_response(request, ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.get("/health")
    async def health():
        """200 when tritonserver is ready and serves at least one LLM; 503 otherwise."""
        if await triton.ready() and await triton.llms():
            return Response(status_code=200)
        return Response(status_code=503)

    @app.get("/metrics")
    async def prometheus():
        # in a thread: the decode gauges are read from tritonserver's metrics port at each scrape
        text = await asyncio.to_thread(generate_latest, metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    for door in (openai_api, responses_api, mindspore_serving_api, tgi_api):
        app.include_router(door.router)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: it counts the refused requests too
    return app


class ApiKeyMiddleware:
    """Every route but OPEN_PATHS needs 'Authorization: Bearer KEY' (a plain ASGI middleware: streamed
    responses pass through it untouched)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                request = Request(scope)
                response = error_response(request, ApiError(
                    401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key"))
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def error_response(request: Request, error: ApiError) -> JSONResponse:
    """OpenAI's error object on /v1 routes; TGI's {"error", "error_type"} on the others (MindSpore Serving's
    server has no error format of its own)."""
    message, param = _encodable(error.message), _encodable(error.param)
    if request.url.path.startswith("/v1/"):
        body = {"error": {"message": message, "type": error.kind, "param": param,
                          "code": error.code or str(error.status)}}
    else:
        body = {"error": message, "error_type": error.kind}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _encodable(text: str | None) -> str | None:
    """`text` as UTF-8 can hold it: an error may quote a client's field name or model name, and JSON's "\\ud800"
    gives Python a lone surrogate, which UTF-8 cannot encode (rendering the error failed with a 500)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if text is not None else None
