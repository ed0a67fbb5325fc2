"""The frontend's own Prometheus metrics, on its /metrics: requests by route and status, requests in flight,
and request latency (to the end of the response, streams included)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class FrontendMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("mstriton_frontend_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.in_flight = Gauge("mstriton_frontend_requests_in_flight", "HTTP requests being answered",
                               registry=self.registry)
        self.latency = Histogram("mstriton_frontend_request_seconds", "Time from a request to the end of its "
                                 "response", ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)


class MetricsMiddleware:
    """A plain ASGI middleware: it sees a streamed response's last byte, which is when a request is done."""

    def __init__(self, app, metrics: FrontendMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), {"code": 500}
        self.metrics.in_flight.inc()

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.in_flight.dec()
            route = _route(scope)  # known once the router has matched
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - start)


def _route(scope) -> str:
    """The route's template (/models/{model}/generate), not the path: one series per route, not per model."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
