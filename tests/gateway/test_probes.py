"""The gateway's health probes over real sockets: httpx's own client (not the forwarder's),
each probe bounded by ``health_timeout`` whatever the backend does."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from comeapi.balancer.pool import BackendPool
from comeapi.gateway.app import Gateway, create_app
from comeapi.settings import load_settings

pytestmark = pytest.mark.anyio

HEALTH = (
    b'{"status": "ok", "capacity": 2, "in_flight": 0, "available": 2, '
    b'"models": ["m.gguf"], "loaded_models": ["m.gguf"]}'
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def backend(answer: bool) -> AsyncIterator[str]:
    """A backend on loopback that answers /health, or accepts and then says nothing."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            if answer:
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(HEALTH), HEALTH)
                )
                await writer.drain()
            await reader.read()  # until the prober hangs up
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def gateway_for(url: str) -> Gateway:
    settings = load_settings(None, backends=[url], health_timeout=0.3, health_interval=30.0)
    gateway: Gateway = create_app(settings, BackendPool.from_settings(settings)).state.gateway
    return gateway


async def test_probes_go_through_httpx_default_client() -> None:
    async with backend(answer=True) as url:
        gateway = gateway_for(url)
        try:
            assert isinstance(gateway.probe_client, httpx.AsyncClient)
            assert await gateway.health.probe(gateway.pool.backends[0])
            assert gateway.pool.backends[0].healthy
            assert gateway.pool.backends[0].capacity == 2
        finally:
            await gateway.shutdown()


async def test_a_silent_backend_fails_its_probe_within_the_health_timeout() -> None:
    async with backend(answer=False) as url:
        gateway = gateway_for(url)
        try:
            started = time.monotonic()
            assert not await gateway.health.probe(gateway.pool.backends[0], lenient=False)
            elapsed = time.monotonic() - started
            assert 0.25 <= elapsed < 3.0  # health_timeout (0.3 s), not request_timeout
            assert gateway.pool.backends[0].reason == "timeout"
            assert not gateway.pool.backends[0].healthy
        finally:
            await gateway.shutdown()
