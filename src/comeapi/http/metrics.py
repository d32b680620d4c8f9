"""Requests by route and status, timed to their last byte: the same for every comeapi app.

Each app keeps its metrics in a registry of its own (the gateway's ``GatewayMetrics``, the
backend's ``BackendMetrics``), with a ``RequestStats`` in it: two dict updates per request,
turned into Prometheus families only when /metrics is scraped (prometheus_client's labelled
Counter and Histogram cost about 5 us per request, as much as the rest of a cache hit).
``MetricsMiddleware`` reports to it; the gateway's generation routes record their own.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter as Tally
from collections.abc import Collection, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import compile_path
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


class RequestStats(Collector):
    """Requests by route and status, and their latency by route, as plain counts."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts: Tally[tuple[str, int]] = Tally()
        # Per route: one count per bucket (the last is +Inf), and the sum of seconds.
        self.histograms: dict[str, list[float]] = {}

    def record(self, route: str, status: int, seconds: float) -> None:
        self.counts[(route, status)] += 1
        histogram = self.histograms.get(route)
        if histogram is None:
            histogram = self.histograms[route] = [0.0] * (len(self.buckets) + 2)
        histogram[bisect.bisect_left(self.buckets, seconds)] += 1
        histogram[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "comeapi_requests",
            "HTTP requests answered, by route and status code.",
            labels=["route", "status"],
        )
        for (route, status), n in sorted(self.counts.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        latency = HistogramMetricFamily(
            "comeapi_request_duration_seconds",
            "Time from request to the last byte of the answer, by route.",
            labels=["route"],
        )
        for route, histogram in sorted(self.histograms.items()):
            cumulative: list[tuple[str, float]] = []
            running = 0.0
            for bound, count in zip((*self.buckets, float("inf")), histogram[:-1], strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            latency.add_metric([route], cumulative, sum_value=histogram[-1])
        yield latency


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class RequestObserver(Protocol):
    def observe(self, route: str, status: int, seconds: float) -> None: ...


class MetricsMiddleware:
    """Counts every HTTP request by route and status, and times it to its last byte.

    Only known routes become label values (anything else is "other"), so a scanner probing
    random paths cannot blow up the number of series; a route with a parameter is labelled
    by its template ("/v1/models/{model}").
    """

    def __init__(self, app: ASGIApp, metrics: RequestObserver, routes: Collection[str]):
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(r for r in routes if "{" not in r)
        self.templates = [compile_path(r)[:2] for r in routes if "{" in r]

    def route(self, path: str) -> str:
        """The label of ``path``: itself, its route's template, or "other"."""
        if path in self.routes:
            return path
        for regex, template in self.templates:
            if regex.match(path):
                return template
        return "other"

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
            self.metrics.observe(self.route(scope["path"]), status, time.perf_counter() - started)
