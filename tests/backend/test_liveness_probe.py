"""The supervisor's liveness probe over a real socket: a kept-alive connection the backend
closes just as the next probe reuses it is not a failed probe (the 5 s probe interval meets
the backend's 5 s keep-alive timeout), and a backend that closes every connection is."""

from __future__ import annotations

import asyncio
import json

import pytest

from comeapi.backend.supervisor import _Child, _liveness_problem
from comeapi.protocol.health import probe_client

pytestmark = pytest.mark.anyio

HEALTH = json.dumps({"status": "ok", "capacity": 1, "instance": "abc"}).encode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _server(answers_per_connection: int) -> tuple[asyncio.Server, str]:
    """Answers /health ``answers_per_connection`` times per connection, then closes it as
    the next request comes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(answers_per_connection):
                await reader.readuntil(b"\r\n\r\n")
                head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                writer.write(head + b"content-length: %d\r\n\r\n" % len(HEALTH) + HEALTH)
                await writer.drain()
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_kept_alive_connection_closed_under_a_probe_is_not_a_failure() -> None:
    server, url = await _server(answers_per_connection=1)
    child = _Child(index=0, port=0, url=url, instance="abc")
    try:
        async with probe_client(2.0) as client:
            assert await _liveness_problem(client, child, 2.0) is None
            assert await _liveness_problem(client, child, 2.0) is None  # reused, dropped
    finally:
        server.close()
        await server.wait_closed()


async def test_a_backend_closing_every_connection_fails_the_probe() -> None:
    server, url = await _server(answers_per_connection=0)
    child = _Child(index=0, port=0, url=url, instance="abc")
    try:
        async with probe_client(2.0) as client:
            problem = await _liveness_problem(client, child, 2.0)
            assert problem is not None and "RemoteProtocolError" in problem, problem
    finally:
        server.close()
        await server.wait_closed()
