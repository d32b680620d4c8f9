"""Hung backends: a request that hears nothing for ``stall_timeout`` and whose backend does
not answer a health probe either moves to another backend, or (a stream already started)
ends with an error event; a backend that is merely slow is left alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from comeapi.balancer.health import HealthChecker
from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder
from comeapi.balancer.relay import UpstreamStream
from comeapi.balancer.stall import BackendStalled, StallGuard
from tests.balancer.fakes import FakeCluster
from tests.balancer.test_proxy import PLAIN_BODY, STREAM_BODY, Client, Env, forward

pytestmark = pytest.mark.anyio

STALL = 0.3
PROBE_TIMEOUT = 0.2


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    fakes = FakeCluster(2)
    pool = BackendPool(fakes.urls)
    transport = fakes.transport()
    async with httpx.AsyncClient(transport=transport) as client:
        health = HealthChecker(pool, client, interval=30.0, timeout=PROBE_TIMEOUT)
        await health.start()
        forwarder = Forwarder(pool, health, fakes.upstream(), stall_timeout=STALL)
        yield Env(fakes, pool, forwarder)
        await health.stop()


async def test_a_hung_backend_fails_over_before_the_first_byte(env: Env) -> None:
    hung = env.fakes.backends[0]
    hung.hung = True  # SIGSTOP: the request and /health both go unanswered
    started = time.monotonic()
    response = await forward(env, Client(), PLAIN_BODY, stream=False)
    elapsed = time.monotonic() - started
    assert response.status_code == 200  # type: ignore[attr-defined]
    assert b"backend-1" in response.body  # type: ignore[attr-defined]
    assert elapsed < 5.0  # stall + probe timeout, not the 600 s read timeout
    backend = env.pool.backends[0]
    assert not backend.healthy and backend.reason == "stalled"
    assert backend.in_flight == 0


async def test_a_hung_stream_before_its_first_chunk_fails_over(env: Env) -> None:
    env.fakes.backends[0].hung = True
    client = Client()
    response = await forward(env, client, STREAM_BODY, stream=True)
    assert isinstance(response, UpstreamStream)
    await response({"type": "http"}, client.receive, client.send)
    assert client.body().endswith(b"data: [DONE]\n\n")
    assert b"error" not in client.body()
    assert env.fakes.backends[1].generations == 1
    assert not env.pool.backends[0].healthy


async def test_a_stream_that_hangs_midway_ends_with_an_error_event(env: Env) -> None:
    fake = env.fakes.backends[0]
    fake.hang_after = 1  # one chunk, then silence (and /health silent too)
    client = Client()
    response = await forward(env, client, STREAM_BODY, stream=True)
    started = time.monotonic()
    await asyncio.wait_for(response({"type": "http"}, client.receive, client.send), 10)  # type: ignore[operator]
    assert time.monotonic() - started < 5.0
    body = client.body()
    assert body.startswith(b'data: {"response": "Hel"}\n\n')
    assert b'"code":"backend_failed"' in body and b"stalled" in body
    assert body.endswith(b"data: [DONE]\n\n")
    assert client.sent[-1].get("more_body", False) is False
    assert env.fakes.backends[1].generations == 0  # too late to retry
    backend = env.pool.backends[0]
    assert not backend.healthy and backend.reason == "stalled" and backend.in_flight == 0


async def test_a_slow_backend_that_answers_its_probes_is_not_stalled(env: Env) -> None:
    for fake in env.fakes.backends:
        fake.generate_delay = STALL * 4  # silent for four stall periods, but alive
    response = await forward(env, Client(), PLAIN_BODY, stream=False)
    assert response.status_code == 200  # type: ignore[attr-defined]
    assert env.fakes.total_generations() == 1
    assert all(b.healthy for b in env.pool.backends)
    assert env.fakes.backends[0].health_checks >= 3  # asked after each quiet period


async def test_requests_waiting_on_one_backend_share_its_probe(env: Env) -> None:
    env.pool.backends[0].capacity = 4
    env.pool.backends[1].capacity = 4
    for fake in env.fakes.backends:
        fake.generate_delay = STALL * 2.5
    before = env.fakes.backends[0].health_checks
    results = await asyncio.gather(
        *(forward(env, Client(), PLAIN_BODY, stream=False) for _ in range(6))
    )
    assert all(r.status_code == 200 for r in results)  # type: ignore[attr-defined]
    probes = env.fakes.backends[0].health_checks - before
    assert 1 <= probes <= 3  # two quiet periods, one probe each, not one per request


async def test_the_guard_is_off_without_a_timeout() -> None:
    with StallGuard(None, lambda: asyncio.sleep(0, result=False)) as guard:
        await asyncio.sleep(0.05)
    assert not guard.stalled


async def test_someone_elses_cancellation_wins() -> None:
    async def never_alive() -> bool:
        return False

    async def wait() -> None:
        with StallGuard(0.05, never_alive):
            await asyncio.sleep(10)

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    task = asyncio.create_task(wait())
    with pytest.raises(BackendStalled):
        await task
