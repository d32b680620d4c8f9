"""Prometheus metrics of one backend, in a registry of its own (no module-level state).

Requests are counted by ``comeapi.http.metrics.MetricsMiddleware``. Tokens and timings come
from ``MeteredEngine``, which wraps the engine and reads each generation's events as they
pass: the time to the first token, and the token counts of the final ``Finished``. Slots
and queue are read from the engine when /metrics is scraped.

Tokens per second: ``rate(comeapi_tokens_generated_total[1m])`` is the backend's output
rate; ``comeapi_tokens_generated_total / comeapi_decode_seconds_total`` the decoding speed
of its generations, and ``comeapi_last_decode_tokens_per_second`` that of the last one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from comeapi.backend.engine import Engine, Event, Finished
from comeapi.http.metrics import RequestStats
from comeapi.protocol.requests import GenerationRequest

# A token is out within milliseconds on a GPU, or after a long prompt and a queue on a CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class BackendMetrics:
    """Every metric of one backend app; also the middleware's ``RequestObserver``."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = RequestStats()
        self.registry.register(self.requests)
        self.prompt_tokens = Counter(
            "comeapi_prompt_tokens",
            "Prompt tokens of finished generations.",
            registry=self.registry,
        )
        self.generated = Counter(
            "comeapi_tokens_generated",
            "Completion tokens of finished generations.",
            registry=self.registry,
        )
        self.decode_seconds = Counter(
            "comeapi_decode_seconds",
            "Time from the first token to the end, summed over finished generations.",
            registry=self.registry,
        )
        self.last_speed = Gauge(
            "comeapi_last_decode_tokens_per_second",
            "Tokens per second of the last finished generation, after its first token.",
            registry=self.registry,
        )
        self.first_token = Histogram(
            "comeapi_time_to_first_token_seconds",
            "Time from a generation's start (queue wait included) to its first token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineCollector(engine))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.record(route, status, seconds)

    def finished(self, done: Finished, decoding: float | None, prompt: bool = True) -> None:
        """A choice ended; ``prompt``: count its prompt's tokens (once per prompt, not per
        choice of it)."""
        if prompt:
            self.prompt_tokens.inc(done.usage.prompt_tokens)
        self.generated.inc(done.usage.completion_tokens)
        if decoding is not None:
            self.decode_seconds.inc(decoding)
            # The first token came before the clock started: count the ones after it.
            if decoding > 0 and done.usage.completion_tokens > 1:
                self.last_speed.set((done.usage.completion_tokens - 1) / decoding)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Slots in use, slots in all, and requests waiting for one, read at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        capacity, in_flight = self.engine.capacity, self.engine.in_flight
        yield GaugeMetricFamily(
            "comeapi_slots_busy", "Generations decoding now.", value=min(in_flight, capacity)
        )
        yield GaugeMetricFamily(
            "comeapi_slots_capacity", "Generations the engine decodes at once.", value=capacity
        )
        yield GaugeMetricFamily(
            "comeapi_queue_depth",
            "Generations waiting for a free slot.",
            value=max(0, in_flight - capacity),
        )
        yield GaugeMetricFamily(
            "comeapi_ready", "1 once the default model is loaded.", value=int(self.engine.ready)
        )


class MeteredEngine:
    """An ``Engine`` that reports each generation's tokens and timings to ``metrics``."""

    def __init__(self, engine: Engine, metrics: BackendMetrics):
        self._engine = engine
        self._metrics = metrics

    @property
    def capacity(self) -> int:
        return self._engine.capacity

    @property
    def in_flight(self) -> int:
        return self._engine.in_flight

    @property
    def ready(self) -> bool:
        return self._engine.ready

    def loaded_models(self) -> list[str]:
        return self._engine.loaded_models()

    async def start(self) -> None:
        await self._engine.start()

    async def close(self) -> None:
        await self._engine.close()

    async def generate(self, request: GenerationRequest, model_name: str) -> AsyncIterator[Event]:
        started = time.perf_counter()
        first: float | None = None
        events = self._engine.generate(request, model_name)
        try:
            async for event in events:
                if isinstance(event, Finished):
                    now = time.perf_counter()
                    decoding = None if first is None else now - first
                    self._metrics.finished(event, decoding, event.index % request.n == 0)
                elif first is None:
                    first = time.perf_counter()
                    self._metrics.first_token.observe(first - started)
                yield event
        finally:
            if isinstance(events, AsyncGenerator):
                await events.aclose()
