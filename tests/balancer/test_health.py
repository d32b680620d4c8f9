"""HealthChecker: active probes with their own timeout, passive reports, quick recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from comeapi.balancer.health import HealthChecker
from comeapi.balancer.pool import BackendPool
from tests.balancer.fakes import FakeCluster, eventually
from tests.balancer.scripted import Backend as ScriptedBackend

pytestmark = pytest.mark.anyio


Env = tuple[FakeCluster, BackendPool, HealthChecker]


@pytest.fixture
async def cluster() -> AsyncIterator[Env]:
    fakes = FakeCluster(2, capacity=3, models=("a.gguf", "b.gguf"))
    pool = BackendPool(fakes.urls)
    async with httpx.AsyncClient(transport=fakes.transport()) as client:
        checker = HealthChecker(pool, client, interval=30.0, timeout=0.2)
        yield fakes, pool, checker
        await checker.stop()


async def test_a_probe_reads_capacity_and_models(cluster: Env) -> None:
    _, pool, checker = cluster
    await checker.probe(pool.backends[0])
    backend = pool.backends[0]
    assert backend.healthy
    assert backend.capacity == 3
    assert backend.models == {"a.gguf", "b.gguf"}
    assert backend.loaded_models == ("a.gguf",)
    assert backend.latency is not None and backend.last_check is not None
    assert backend.reason is None


async def test_a_loading_backend_is_not_healthy_and_not_failed(cluster: Env) -> None:
    fakes, pool, checker = cluster
    fakes.backends[0].loading = True
    await checker.probe(pool.backends[0])
    backend = pool.backends[0]
    assert not backend.healthy
    assert backend.reason == "loading"
    assert backend.failures == 0
    assert backend.models == {"a.gguf", "b.gguf"}  # known, so the model is not "unknown"


async def test_a_refused_probe_marks_the_backend_down(cluster: Env) -> None:
    fakes, pool, checker = cluster
    await checker.probe(pool.backends[0])
    fakes.backends[0].up = False
    await checker.probe(pool.backends[0])
    backend = pool.backends[0]
    assert not backend.healthy
    assert backend.reason == "connection refused"
    assert backend.failures == 1


async def test_a_probe_has_its_own_timeout(cluster: Env) -> None:
    fakes, pool, checker = cluster
    fakes.backends[0].health_delay = 5.0
    async with asyncio.timeout(3.0):
        await checker.probe(pool.backends[0])
    assert not pool.backends[0].healthy
    assert pool.backends[0].reason == "timeout"


async def test_a_busy_backend_survives_one_slow_probe(cluster: Env) -> None:
    fakes, pool, checker = cluster
    backend = pool.backends[0]
    await checker.probe(backend)
    await pool.acquire()
    fakes.backends[0].health_delay = 5.0
    await checker.probe(backend)
    assert backend.healthy  # one late answer while generating is not death
    await checker.probe(backend)
    assert not backend.healthy
    assert backend.reason == "timeout"


async def test_start_probes_everything_before_returning(cluster: Env) -> None:
    fakes, pool, checker = cluster
    fakes.backends[1].up = False
    await checker.start()
    assert [b.healthy for b in pool.backends] == [True, False]


async def test_a_backend_reported_down_is_back_soon_without_waiting_the_interval(
    cluster: Env,
) -> None:
    fakes, pool, checker = cluster
    await checker.start()
    backend = pool.backends[0]
    fakes.backends[0].up = False
    checker.report_failure(backend, httpx.ConnectError("refused"))
    assert not backend.healthy
    assert backend.reason == "connection refused"
    fakes.backends[0].up = True
    await eventually(lambda: backend.healthy)  # the interval is 30 s


async def test_a_backend_down_at_start_comes_back_by_itself(cluster: Env) -> None:
    fakes, pool, checker = cluster
    fakes.backends[1].up = False
    await checker.start()
    await asyncio.sleep(0.6)
    probes_while_down = fakes.backends[1].health_checks
    assert not pool.backends[1].healthy
    fakes.backends[1].up = True
    await eventually(lambda: pool.backends[1].healthy)
    assert fakes.backends[1].health_checks > probes_while_down


async def test_a_backend_answering_503_is_unready_not_failed(cluster: Env) -> None:
    _, pool, checker = cluster
    await checker.start()
    backend = pool.backends[0]
    checker.report_unready(backend, "loading")
    assert not backend.healthy
    assert backend.failures == 0
    await eventually(lambda: backend.healthy)


async def test_a_kept_alive_connection_closed_as_a_probe_reuses_it_is_not_a_failure() -> None:
    """A backend's keep-alive timeout (uvicorn's 5 s) can end just as the next probe reuses
    the connection (the default interval is 5 s too): the backend is fine, and was marked
    down for half a second, failing the requests of that moment with 503 (seen in the
    Docker warmup). The probe asks again on a new connection."""
    backend = ScriptedBackend("a", health_drops_reused=True)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    backend.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = BackendPool([backend.url])
    try:
        async with httpx.AsyncClient() as client:
            checker = HealthChecker(pool, client, interval=30.0, timeout=2.0)
            assert await checker.probe(pool.backends[0])
            assert await checker.probe(pool.backends[0])  # the kept-alive connection drops
            assert pool.backends[0].healthy, pool.backends[0].reason
            assert pool.backends[0].failures == 0
            assert backend.probes == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_a_backend_that_drops_every_probe_is_marked_down() -> None:
    """The second attempt is for a kept-alive connection only: a backend that accepts and
    closes every connection is down."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = BackendPool([url])
    try:
        async with httpx.AsyncClient() as client:
            checker = HealthChecker(pool, client, interval=30.0, timeout=2.0)
            assert not await checker.probe(pool.backends[0])
            assert not pool.backends[0].healthy
            assert pool.backends[0].reason == "connection lost"
    finally:
        server.close()
        await server.wait_closed()
