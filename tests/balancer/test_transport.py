"""FastTransport over real sockets against a scripted HTTP/1.1 server: keep-alive, streamed
bodies, timeouts and every way a backend can drop the connection."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from comeapi.balancer.transport import FastTransport

pytestmark = pytest.mark.anyio

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok": 1}\r\n'


@dataclass
class Server:
    """Answers by path: the test decides what each path does to the connection."""

    url: str = ""
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                path = head.split(b" ")[1]
                if not await self.answer(path, writer, reader):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()

    async def answer(
        self, path: bytes, writer: asyncio.StreamWriter, reader: asyncio.StreamReader
    ) -> bool:
        """Write the answer for ``path``; False closes the connection."""
        if path == b"/ok":
            writer.write(OK)
        elif path == b"/echo-length":
            size = len(self.requests[-1].split(b"\r\n\r\n", 1)[1])
            text = str(size).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text))
        elif path == b"/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"5\r\nfirst\r\n")
            await writer.drain()
            await self.release.wait()
            writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        elif path == b"/until-close":
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
            await writer.drain()
            return False
        elif path == b"/close-now":
            return False
        elif path == b"/cut-body":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this")
            await writer.drain()
            return False
        elif path == b"/silent":
            await reader.read()  # never answers; returns when the client hangs up
            self.closed_by_client.set()
            return False
        elif path == b"/ok-then-close":
            writer.write(OK)
            await writer.drain()
            return False
        elif path == b"/garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        return True


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    server = Server()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    client = httpx.AsyncClient(transport=FastTransport(), timeout=httpx.Timeout(5, read=1))
    try:
        yield server, client
    finally:
        await client.aclose()
        listener.close()
        server.release.set()


async def test_requests_share_a_kept_alive_connection() -> None:
    async with serving() as (server, client):
        for _ in range(5):
            response = await client.get(server.url + "/ok")
            assert response.status_code == 200
            assert response.json() == {"ok": 1}
    assert server.connections == 1
    assert len(server.requests) == 5


async def test_the_request_body_and_headers_arrive() -> None:
    async with serving() as (server, client):
        response = await client.post(
            server.url + "/echo-length", content=b"x" * 100_000, headers={"x-test": "yes"}
        )
    assert response.text == "100000"
    head = server.requests[0].split(b"\r\n\r\n")[0].lower()
    assert b"x-test: yes" in head
    assert b"content-length: 100000" in head
    assert b"host: 127.0.0.1:" in head


async def test_a_chunked_body_is_delivered_as_it_arrives() -> None:
    async with (
        serving() as (server, client),
        client.stream("GET", server.url + "/chunked") as response,
    ):
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"first"  # before the server sent the rest
        server.release.set()
        assert b"".join([chunk async for chunk in chunks]) == b"second"
        await response.aclose()
        assert (await client.get(server.url + "/ok")).status_code == 200
    assert server.connections == 1  # the finished chunked exchange left the connection reusable


async def test_a_body_delimited_by_close_is_complete() -> None:
    async with serving() as (server, client):
        response = await client.get(server.url + "/until-close")
        assert response.text == "all of it"
        assert (await client.get(server.url + "/ok")).status_code == 200
    assert server.connections == 2


async def test_leaving_a_stream_early_drops_the_connection() -> None:
    async with (
        serving() as (server, client),
        client.stream("GET", server.url + "/chunked") as response,
    ):
        await anext(response.aiter_raw())
        await response.aclose()
        server.release.set()  # the server writes the rest, then finds the connection gone
        await asyncio.wait_for(server.closed_by_client.wait(), 5)


async def test_connection_refused_is_a_connect_error() -> None:
    async with serving() as (server, client):
        port = server.url.rsplit(":", 1)[1]
    closed = f"http://127.0.0.1:{port}/ok"  # the listener is gone now
    async with httpx.AsyncClient(transport=FastTransport()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(closed)


async def test_no_answer_is_a_read_timeout_and_the_connection_is_dropped() -> None:
    async with serving() as (server, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url + "/silent", timeout=httpx.Timeout(5, read=0.2))
        await asyncio.wait_for(server.closed_by_client.wait(), 5)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/close-now", httpx.RemoteProtocolError),
        ("/cut-body", httpx.ReadError),
        ("/garbage", httpx.RemoteProtocolError),
    ],
)
async def test_a_broken_answer_is_an_httpx_error(path: str, error: type[Exception]) -> None:
    async with serving() as (server, client):
        with pytest.raises(error):
            await client.get(server.url + path)
        assert (await client.get(server.url + "/ok")).status_code == 200  # on a new connection


async def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    async with serving() as (server, client):
        assert (await client.get(server.url + "/ok-then-close")).status_code == 200
        # The server closed that connection after answering; the next request must not fail.
        assert (await client.get(server.url + "/ok")).status_code == 200
    assert server.connections == 2
