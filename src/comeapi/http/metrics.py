"""Requests by route and status, timed to their last byte: the same for every comeapi app.

Each app keeps its metrics in a registry of its own (the gateway's ``GatewayMetrics``, the
backend's ``BackendMetrics``); this middleware only reports to it.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# From a cache hit (well under a millisecond) to a long generation (minutes).
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class RequestObserver(Protocol):
    def observe(self, route: str, status: int, seconds: float) -> None: ...


class MetricsMiddleware:
    """Counts every HTTP request by route and status, and times it to its last byte.

    Only known routes become label values (anything else is "other"), so a scanner probing
    random paths cannot blow up the number of series.
    """

    def __init__(self, app: ASGIApp, metrics: RequestObserver, routes: Collection[str]):
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            route = path if path in self.routes else "other"
            self.metrics.observe(route, status, time.perf_counter() - started)
