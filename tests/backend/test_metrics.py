"""BackendMetrics and MeteredEngine over a stand-in engine (the real one is scraped in
tests/backend/test_http.py): what each event adds, slots and queue, early close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from prometheus_client.parser import text_string_to_metric_families

from comeapi.backend.engine import Event, Finished, TextDelta
from comeapi.backend.metrics import BackendMetrics, MeteredEngine
from comeapi.protocol.requests import parse_request
from comeapi.protocol.responses import Usage

REQUEST = parse_request("generate", {"prompt": "Hi"}, max_tokens_limit=100)


class StandIn:
    """An engine whose generations are three pieces and a Finished, with counters set by
    the test."""

    def __init__(self, capacity: int = 4, in_flight: int = 0):
        self.capacity = capacity
        self.in_flight = in_flight
        self.ready = True
        self.closed_early = 0

    def loaded_models(self) -> list[str]:
        return ["m.gguf"]

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, request: object, model_name: str) -> AsyncIterator[Event]:
        finished = False
        try:
            for piece in ("a", "b", "c"):
                await asyncio.sleep(0.01)
                yield TextDelta(piece)
            finished = True
            yield Finished("length", Usage(prompt_tokens=5, completion_tokens=3))
        finally:
            self.closed_early += not finished


def samples(metrics: BackendMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_generation_adds_its_tokens_and_first_token_time() -> None:
    engine = StandIn()
    metrics = BackendMetrics(engine)
    metered = MeteredEngine(engine, metrics)

    async def run() -> list[Event]:
        return [event async for event in metered.generate(REQUEST, "m.gguf")]

    events = asyncio.run(run())
    assert [type(e) for e in events] == [TextDelta, TextDelta, TextDelta, Finished]
    got = samples(metrics)
    assert got["comeapi_tokens_generated_total"] == 3
    assert got["comeapi_prompt_tokens_total"] == 5
    assert got["comeapi_time_to_first_token_seconds_count"] == 1
    assert 0.005 < got["comeapi_time_to_first_token_seconds_sum"] < 5
    assert got["comeapi_decode_seconds_total"] > 0.01  # two more pieces after the first
    assert got["comeapi_last_decode_tokens_per_second"] > 0


def test_a_generation_closed_early_adds_no_tokens_and_closes_the_engines() -> None:
    engine = StandIn()
    metrics = BackendMetrics(engine)
    metered = MeteredEngine(engine, metrics)

    async def run() -> None:
        events = metered.generate(REQUEST, "m.gguf")
        await anext(events)
        await events.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
    got = samples(metrics)
    assert engine.closed_early == 1
    assert got["comeapi_tokens_generated_total"] == 0
    assert got["comeapi_time_to_first_token_seconds_count"] == 1


def test_slots_and_queue_are_read_from_the_engine_at_scrape_time() -> None:
    engine = StandIn(capacity=4, in_flight=6)
    metrics = BackendMetrics(engine)
    got = samples(metrics)
    assert (got["comeapi_slots_busy"], got["comeapi_slots_capacity"]) == (4, 4)
    assert got["comeapi_queue_depth"] == 2
    engine.in_flight = 1
    got = samples(metrics)
    assert (got["comeapi_slots_busy"], got["comeapi_queue_depth"]) == (1, 0)


def test_each_app_has_its_own_registry() -> None:
    first, second = BackendMetrics(StandIn()), BackendMetrics(StandIn())
    first.observe("/generate", 200, 0.1)
    assert 'route="/generate"' in first.render().decode()
    assert 'route="/generate"' not in second.render().decode()
