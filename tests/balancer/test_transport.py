"""FastUpstream over real sockets against a scripted HTTP/1.1 server: keep-alive, streamed
bodies, every timeout, the per-backend cap, idle expiry, backpressure, concurrent use and
every way a backend can drop the connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from comeapi.balancer.transport import FastUpstream
from comeapi.balancer.upstream import Timeouts

pytestmark = pytest.mark.anyio

BLOCK = b"x" * 65536
BIG = 64 * 1024 * 1024  # far more than the kernel's socket buffers hold
TIMEOUTS = Timeouts(connect=5.0, read=1.0, write=1.0, pool=1.0)
OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok": 1}\r\n'


@dataclass
class Server:
    """Answers by path: the test decides what each path does to the connection."""

    url: str = ""
    connections: int = 0
    open_now: int = 0  # connections open at this moment
    most_open: int = 0
    sent: int = 0  # bytes of /big written so far
    requests: list[bytes] = field(default_factory=list)
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
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
            self.open_now -= 1
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
        elif path == b"/slow":
            await self.release.wait()
            writer.write(OK)
        elif path == b"/big":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
            for _ in range(BIG // len(BLOCK)):
                writer.write(BLOCK)
                await writer.drain()
                self.sent += len(BLOCK)
        elif path.startswith(b"/echo/"):
            await asyncio.sleep(0.01)
            text = path[len(b"/echo/") :]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(text), text))
        elif path == b"/garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        return True


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[tuple[Server, FastUpstream]]:
    server = Server()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    upstream = FastUpstream(options.pop("timeouts", TIMEOUTS), **options)
    try:
        yield server, upstream
    finally:
        server.release.set()
        await upstream.aclose()
        listener.close()


async def post(upstream: FastUpstream, url: str, body: bytes = b"") -> tuple[int, bytes]:
    response = await upstream.post(url, body, [(b"x-test", b"yes")])
    try:
        return response.status, b"".join([chunk async for chunk in response.chunks()])
    finally:
        await response.aclose()


async def test_requests_share_a_kept_alive_connection() -> None:
    async with serving() as (server, upstream):
        for _ in range(5):
            assert await post(upstream, server.url + "/ok") == (200, b'{"ok": 1}\r\n')
    assert server.connections == 1
    assert len(server.requests) == 5


async def test_the_request_body_and_headers_arrive() -> None:
    async with serving() as (server, upstream):
        assert await post(upstream, server.url + "/echo-length", b"x" * 100_000) == (
            200,
            b"100000",
        )
    head = server.requests[0].split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"post /echo-length http/1.1\r\n")
    assert b"x-test: yes" in head
    assert b"content-length: 100000" in head
    assert b"host: 127.0.0.1:" in head


async def test_a_chunked_body_is_delivered_as_it_arrives() -> None:
    async with serving() as (server, upstream):
        response = await upstream.post(server.url + "/chunked", b"", [])
        chunks = response.chunks()
        assert await anext(chunks) == b"first"  # before the server sent the rest
        server.release.set()
        assert b"".join([chunk async for chunk in chunks]) == b"second"
        await response.aclose()
        assert (await post(upstream, server.url + "/ok"))[0] == 200
    assert server.connections == 1  # the finished chunked exchange left the connection reusable


async def test_a_body_delimited_by_close_is_complete() -> None:
    async with serving() as (server, upstream):
        assert await post(upstream, server.url + "/until-close") == (200, b"all of it")
        assert (await post(upstream, server.url + "/ok"))[0] == 200
    assert server.connections == 2


async def test_leaving_a_stream_early_drops_the_connection() -> None:
    async with serving() as (server, upstream):
        response = await upstream.post(server.url + "/chunked", b"", [])
        await anext(response.chunks())
        await response.aclose()
        server.release.set()  # the server writes the rest, then finds the connection gone
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
        assert upstream.connections(server.url) == 0


async def test_connection_refused_is_a_connect_error() -> None:
    async with serving() as (server, upstream):
        closed = server.url + "/ok"
    upstream = FastUpstream(TIMEOUTS)  # the listener is gone now
    with pytest.raises(httpx.ConnectError):
        await upstream.post(closed, b"", [])
    assert upstream.connections(closed) == 0


async def test_a_connect_that_hangs_is_a_connect_timeout() -> None:
    # A listener that never accepts, its backlog full: the kernel drops further SYNs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/ok"
        fillers = []
        try:
            for _ in range(8):  # enough to fill any backlog the kernel rounds 0 up to
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(listener.getsockname())
                fillers.append(filler)
            upstream = FastUpstream(Timeouts(connect=0.3, read=5.0, write=5.0, pool=5.0))
            started = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                await upstream.post(url, b"", [])
            assert time.monotonic() - started < 3.0
            assert upstream.connections(url) == 0
        finally:
            for filler in fillers:
                filler.close()


async def test_no_answer_is_a_read_timeout_and_the_connection_is_dropped() -> None:
    async with serving(timeouts=Timeouts(connect=5.0, read=0.2, write=5.0, pool=5.0)) as (
        server,
        upstream,
    ):
        with pytest.raises(httpx.ReadTimeout):
            await upstream.post(server.url + "/silent", b"", [])
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
        assert upstream.connections(server.url) == 0


async def test_a_backend_that_reads_nothing_is_a_write_timeout() -> None:
    accepted: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/ok"
        upstream = FastUpstream(Timeouts(connect=5.0, read=30.0, write=0.3, pool=5.0))
        started = time.monotonic()
        with pytest.raises(httpx.WriteTimeout):
            # Accepted by the kernel, never read: the body fills every buffer on the way.
            await upstream.post(url, b"x" * BIG, [])
        assert time.monotonic() - started < 10.0  # the write limit, not the read one (30 s)
        assert upstream.connections(url) == 0
        with contextlib.suppress(BlockingIOError):
            accepted.append(listener.accept()[0])
    for conn in accepted:
        conn.close()


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/close-now", httpx.RemoteProtocolError),
        ("/cut-body", httpx.ReadError),
        ("/garbage", httpx.RemoteProtocolError),
    ],
)
async def test_a_broken_answer_is_an_httpx_error(path: str, error: type[Exception]) -> None:
    async with serving() as (server, upstream):
        with pytest.raises(error):
            await post(upstream, server.url + path)
        assert (await post(upstream, server.url + "/ok"))[0] == 200  # on a new connection
        assert upstream.connections(server.url) == 1


async def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    async with serving() as (server, upstream):
        assert (await post(upstream, server.url + "/ok-then-close"))[0] == 200
        await asyncio.sleep(0.05)
        # The server closed that connection after answering; the next request must not fail.
        assert (await post(upstream, server.url + "/ok"))[0] == 200
    assert server.connections == 2


async def test_an_idle_connection_expires() -> None:
    async with serving(keepalive_expiry=0.2) as (server, upstream):
        assert (await post(upstream, server.url + "/ok"))[0] == 200
        assert (await post(upstream, server.url + "/ok"))[0] == 200
        assert server.connections == 1  # reused within the expiry
        await asyncio.sleep(0.4)
        assert (await post(upstream, server.url + "/ok"))[0] == 200
        assert server.connections == 2  # past it: a fresh connection
        # ... and the expired one was closed by us, not left open.
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
        assert upstream.connections(server.url) == 1


async def test_a_slow_reader_holds_the_backend_back() -> None:
    """Backpressure: the body is not read ahead into memory while nobody consumes it."""
    async with serving() as (server, upstream):
        response = await upstream.post(server.url + "/big", b"", [])
        chunks = response.chunks()
        received = len(await anext(chunks))
        await asyncio.sleep(0.5)  # a client that does not read for a while
        stalled_at = server.sent
        await asyncio.sleep(0.3)
        assert server.sent == stalled_at  # the backend is blocked, not still writing
        assert stalled_at < BIG // 4  # kernel buffers and ours hold a few MB, not 64
        async for chunk in chunks:
            received += len(chunk)
        await response.aclose()
        assert received == BIG
        assert (await post(upstream, server.url + "/ok"))[0] == 200
        assert server.connections == 1


async def test_concurrent_requests_each_get_their_own_answer() -> None:
    async with serving() as (server, upstream):
        paths = [f"/echo/{i}" for i in range(40)]
        answers = await asyncio.gather(*(post(upstream, server.url + p) for p in paths))
        assert [body for _, body in answers] == [str(i).encode() for i in range(40)]
        assert server.most_open <= 40
        assert upstream.connections(server.url) == server.open_now


async def test_connections_per_backend_are_capped() -> None:
    async with serving(max_connections=3) as (server, upstream):
        paths = [f"/echo/{i}" for i in range(30)]
        answers = await asyncio.gather(*(post(upstream, server.url + p) for p in paths))
        assert [body for _, body in answers] == [str(i).encode() for i in range(30)]
        assert server.most_open == 3
        assert server.connections == 3  # waiting requests took the freed connections


async def test_waiting_for_a_connection_past_the_pool_timeout_fails() -> None:
    timeouts = Timeouts(connect=5.0, read=30.0, write=5.0, pool=0.2)
    async with serving(max_connections=1, timeouts=timeouts) as (server, upstream):
        busy = asyncio.create_task(post(upstream, server.url + "/slow"))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(httpx.PoolTimeout):
            await upstream.post(server.url + "/ok", b"", [])
        assert time.monotonic() - started < 5.0
        server.release.set()
        assert (await busy)[0] == 200
        assert (await post(upstream, server.url + "/ok"))[0] == 200  # room again
    assert server.connections == 1
