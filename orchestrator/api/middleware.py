"""Pure ASGI middleware: per-route request counts and latency for /metrics."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.telemetry import Telemetry


class HttpMetrics:
    def __init__(self, app: ASGIApp, telemetry: Telemetry):
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # The route template, not the raw path, keeps label cardinality bounded.
            path = getattr(route, "path", None) or "<unmatched>"
            self.telemetry.http_requests.labels(scope["method"], path, str(code)).inc()
            self.telemetry.http_latency.labels(scope["method"], path).observe(time.perf_counter() - started)
