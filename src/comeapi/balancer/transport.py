"""FastUpstream: the forwarder's HTTP/1.1 client, on asyncio protocols and httptools, with a
keep-alive pool capped per backend and every timeout (connect, read, write, pool).

Why a client of our own where libraries exist: the project keeps own code in a library's
place only for a measured reason, written next to it with the command that measured it, and
only while the reason holds. Measured side by side with the libraries, interleaved in one run
(``benchmarks/balancer_overhead.py``; figures and load average in docs/balancer.md), the
gateway adds less than half the latency forwarding with it than with aiohttp's client, the
fastest library, and spends about 0.5 ms less CPU per request; httpx's default transport
(httpcore) is slower still. The issue's rule keeps own code only at 1.5x or more over the
best library. Re-run the benchmark when aiohttp, httpx or Python change: when the gap
closes, ``benchmarks/aiohttp_upstream.py`` is the replacement.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

import httptools
import httpx

from comeapi.balancer.upstream import Timeouts
from comeapi.protocol.health import KEEPALIVE_EXPIRY

MAX_CONNECTIONS_PER_BACKEND = 64
HIGH_WATER = 256 * 1024  # bytes buffered from the server before reading pauses
MAX_KEPT_HEADS = 256  # request heads kept formatted (``FastUpstream._head``)

Origin = tuple[str, str, int]

log = logging.getLogger("comeapi.balancer")


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection; carries one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        #: The event loop it runs on, known from ``connection_made`` on: asked once per
        #: connection, not per request (CPython 3.11's ``asyncio.get_running_loop`` makes a
        #: getpid system call each time, to notice a fork).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.discarded = False  # no longer counted by the pool
        self.write_paused = False
        self.idle_since = 0.0
        self.used = False  # has carried an exchange before (so the server may drop it)
        #: Called instead of waking a waiter, by a forward done with callbacks (``direct``).
        self.watcher: Callable[[], None] | None = None
        #: Sent bytes with no request outstanding: a broken server, closed (``_unasked``).
        self.unasked = False
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.interim = False  # between an interim response's head and its end
        self.status = 0
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.error: Exception | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[bool] | None = None  # its result: timed out

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._notify()

    def data_received(self, data: bytes) -> None:
        if self.complete:  # the answer is all in and no request is outstanding
            self._unasked(idle=True)
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}"))
            self.close()
            return
        except httptools.HttpParserUpgrade:  # a 101: no request of ours asks for one
            self._fail(httpx.RemoteProtocolError("the server switched protocols unasked"))
            self.close()
            return
        if self.unasked:
            self._unasked(idle=False)
        # A watcher hears once per arrival: at the answer's end, from inside the parser
        # (``on_message_complete``), so bytes after it cannot change the answer; else here,
        # after the parser has taken all it could (a head, part of a body). A small answer's
        # head, body and end come in one piece: one wake-up, not three.
        if self.watcher is not None and not self.complete:
            self.watcher()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self.complete and self._ends_at_close():
            self.complete = True  # a body delimited by the connection closing
            self._notify()
        elif not self.complete:
            reason = f": {exc}" if exc else ""
            if self.headers_done:
                self._fail(httpx.ReadError(f"connection closed mid-response{reason}"))
            else:
                self._fail(
                    httpx.RemoteProtocolError(f"server disconnected without a response{reason}")
                )

    # --- httptools callbacks -------------------------------------------------------------

    # Each ignores a response that follows a complete answer in the same read (the parser
    # goes on through it): the answer keeps its own status, headers and body.

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self.unasked = True
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            self.unasked = True
            return
        status = self.parser.get_status_code()
        # An interim response (103 Early Hints; RFC 9110 15.2): the answer comes after it. A
        # 101 ends the parse (HttpParserUpgrade), which ``data_received`` answers.
        if status < 200:
            self.interim = True
            self.headers.clear()
            return
        self.headers_done = True
        # Asked now: once the message is complete the parser has reset its state.
        self.keep_alive = self.parser.should_keep_alive()
        self.status = status
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.unasked = True
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.complete:
            self.unasked = True
            return
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._notify()

    # --- used by the transport -----------------------------------------------------------

    def send(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(head + body)
        # Made ready after the write, while the server reads: no answer can arrive before
        # the event loop runs again, and this is off the request's way to the backend.
        self._reset()
        self.parser = httptools.HttpResponseParser(self)

    async def drain(self, write_timeout: float | None) -> None:
        """Until the request has left for the network: asyncio keeps what the kernel would
        not take yet, and a backend that reads nothing must not hold us for ever."""
        while self.write_paused and not self.headers_done:
            await self.wait(write_timeout, httpx.WriteTimeout)

    async def wait(
        self,
        limit: float | None,
        timed_out: type[httpx.TimeoutException] = httpx.ReadTimeout,
    ) -> None:
        """Until something happens (headers, a chunk, the end, an error, room to write)."""
        if self.error is not None:
            raise self.error
        loop = self.loop
        assert loop is not None  # waited on only once a request was written
        waiter = self.waiter = loop.create_future()
        # A bare timer, not asyncio.timeout(): this runs once or twice per forwarded request.
        timer = None if limit is None else loop.call_later(limit, _expire, waiter)
        try:
            expired = await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        if expired:
            self.close()
            raise timed_out(f"no progress within {limit:g} s")
        if self.error is not None:
            raise self.error

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= HIGH_WATER // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def reusable(self) -> bool:
        return self.complete and not self.closed and self.keep_alive

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _ends_at_close(self) -> bool:
        names = {name.lower() for name, _ in self.headers}
        return b"content-length" not in names and b"transfer-encoding" not in names

    def _unasked(self, *, idle: bool) -> None:
        """Bytes after the answer, before another request: the server is out of step, and
        whatever it sends next could be read as the next request's answer. Closed, as nginx
        closes a kept-alive upstream connection that becomes readable while idle; the pool
        drops it when it next looks (it drops closed connections). A second response in
        the answer's own read is a broken server (a warning); bytes on an idle connection
        may be a server's parting 408 before it closes (a debug line)."""
        if not self.closed:
            peer = self.transport.get_extra_info("peername") if self.transport else None
            log.log(
                logging.DEBUG if idle else logging.WARNING,
                "a backend (%s) sent bytes no request asked for: connection closed",
                peer,
            )
            self.close()

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._notify()

    def _wake(self) -> None:
        """From the parser's callbacks before the end: a waiting task goes on (a watcher is
        told at the end of ``data_received``)."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def _notify(self) -> None:
        """The answer's end, an error, the connection's end or room to write: the watcher,
        or a waiting task."""
        if self.watcher is not None:
            self.watcher()
        else:
            self._wake()


class _Response:
    """The answer on ``conn``; its body is read from the connection as it arrives."""

    __slots__ = ("_conn", "_done", "_origin", "_pool", "_timeout", "headers", "status")

    def __init__(self, pool: FastUpstream, origin: Origin, conn: UpstreamConnection):
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self._timeout = pool.timeouts.read
        self._done = False
        self.status = conn.status
        self.headers = conn.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
            elif conn.complete:
                break
            else:
                await conn.wait(self._timeout)

    async def aclose(self) -> None:
        if self._done:
            return
        self._done = True
        if self._conn.reusable() and not self._conn.chunks:
            self._pool._release(self._origin, self._conn)
        else:
            self._pool._discard(self._origin, self._conn)


class FastUpstream:
    """HTTP/1.1 with keep-alive on asyncio and httptools, at most ``max_connections`` per
    backend (a request waits up to ``timeouts.pool`` for one to come free)."""

    def __init__(
        self,
        timeouts: Timeouts,
        *,
        max_connections: int = MAX_CONNECTIONS_PER_BACKEND,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._open: dict[Origin, int] = {}  # connections counted against the cap
        self._waiting: dict[Origin, deque[asyncio.Future[None]]] = {}
        self._heads: dict[str, tuple[Origin, bytes]] = {}
        # The head of a request up to its Content-Length, by URL and headers: the gateway
        # forwards few distinct header sets, and formatting them was a measurable share.
        self._fields: dict[tuple[object, ...], bytes] = {}
        self._ssl = ssl_context
        self._closed = False

    def connections(self, url: str) -> int:
        """Open connections (busy or idle) to the backend of ``url``."""
        return self._open.get(_target(url)[0], 0)

    async def post(
        self, url: str, body: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> _Response:
        origin, head = self._head(url, body, headers)
        conn = await self._acquire(origin)
        try:
            try:
                await self._exchange(conn, head, body)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                if not conn.used or conn.got_bytes:
                    raise
                # A kept-alive connection the server closed as we wrote: nothing was
                # processed, so the request goes again on a fresh connection.
                self._discard(origin, conn)
                conn = await self._connect(origin)
                await self._exchange(conn, head, body)
        except BaseException:
            self._discard(origin, conn)
            raise
        conn.used = True
        return _Response(self, origin, conn)

    def send_now(
        self, url: str, body: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> tuple[Origin, UpstreamConnection] | None:
        """The request written on an idle kept-alive connection to ``url``'s backend, at once,
        without a task or a future (``balancer.direct`` reads the answer through the
        connection's ``watcher`` and hands the connection back with ``finish``); None when
        no connection is idle (``post`` then connects, or waits for one)."""
        origin, head = self._head(url, body, headers)
        idle = self._idle.get(origin)
        if not idle:
            return None
        conn = idle.pop()
        transport = conn.transport
        if (
            conn.closed
            or transport is None
            or transport.is_closing()  # closed by the backend, not yet told (connection_lost)
            or time.monotonic() - conn.idle_since >= self.keepalive_expiry
        ):
            self._discard(origin, conn)
            return None
        try:
            conn.send(head, body)
        except RuntimeError:  # uvloop: the handle closed meanwhile
            self._discard(origin, conn)
            return None
        conn.used = True
        return origin, conn

    def finish(self, origin: Origin, conn: UpstreamConnection) -> None:
        """Done with ``conn`` after ``send_now``: back to the pool if its answer was read to
        the end, else closed (so the backend notices and stops generating)."""
        conn.watcher = None
        if conn.reusable() and not conn.chunks:
            self._release(origin, conn)
        else:
            self._discard(origin, conn)

    async def aclose(self) -> None:
        self._closed = True
        for origin, conns in self._idle.items():
            for conn in conns:
                self._discard(origin, conn)
        self._idle.clear()

    def _head(
        self, url: str, body: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> tuple[Origin, bytes]:
        known = self._heads.get(url)
        if known is None:
            known = self._heads[url] = _target(url)
        origin, start = known
        key = (url, *headers)
        fields = self._fields.get(key)
        if fields is None:
            if len(self._fields) >= MAX_KEPT_HEADS:
                self._fields.clear()
            fields = start + b"".join(b"%s: %s\r\n" % pair for pair in headers)
            self._fields[key] = fields
        return origin, b"%scontent-length: %d\r\n\r\n" % (fields, len(body))

    async def _exchange(self, conn: UpstreamConnection, head: bytes, body: bytes) -> None:
        conn.send(head, body)
        if conn.write_paused:
            await conn.drain(self.timeouts.write)
        while not conn.headers_done:
            await conn.wait(self.timeouts.read)

    # --- the pool ------------------------------------------------------------------------

    async def _acquire(self, origin: Origin) -> UpstreamConnection:
        """An idle connection to ``origin``, else a new one, else the first to come free."""
        deadline: float | None = None
        while True:
            idle = self._idle.get(origin)
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.keepalive_expiry:
                    return conn
                self._discard(origin, conn)
            if self._open.get(origin, 0) < self.max_connections:
                return await self._connect(origin)
            if deadline is None:
                loop = asyncio.get_running_loop()
                pool = self.timeouts.pool
                deadline = loop.time() + pool if pool is not None else None
            await self._wait_for_room(origin, deadline)

    async def _wait_for_room(self, origin: Origin, deadline: float | None) -> None:
        room = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(origin, deque())
        waiting.append(room)
        try:
            async with asyncio.timeout_at(deadline):
                await room
        except TimeoutError:
            raise httpx.PoolTimeout(
                f"all {self.max_connections} connections to {origin[1]}:{origin[2]} stayed "
                f"busy for {self.timeouts.pool:g} s"
            ) from None
        finally:
            if room in waiting:
                waiting.remove(room)

    def _room(self, origin: Origin) -> None:
        """A connection came free or went away: the longest waiter may go."""
        waiting = self._waiting.get(origin)
        while waiting:
            room = waiting.popleft()
            if not room.done():
                room.set_result(None)
                return

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        scheme, host, port = origin
        context = None
        if scheme == "https":
            context = self._ssl or ssl.create_default_context()
        loop = asyncio.get_running_loop()
        self._open[origin] = self._open.get(origin, 0) + 1
        try:
            async with asyncio.timeout(self.timeouts.connect):
                _, conn = await loop.create_connection(UpstreamConnection, host, port, ssl=context)
        except TimeoutError:
            self._forget(origin)
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            self._forget(origin)
            raise httpx.ConnectError(f"{host}:{port}: {exc.strerror or exc}") from exc
        except BaseException:
            self._forget(origin)
            raise
        return conn

    def _release(self, origin: Origin, conn: UpstreamConnection) -> None:
        if self._closed:
            self._discard(origin, conn)
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(origin, []).append(conn)
        self._room(origin)

    def _discard(self, origin: Origin, conn: UpstreamConnection) -> None:
        """Close ``conn`` and stop counting it (once)."""
        if not conn.discarded:
            conn.discarded = True
            conn.close()
            self._forget(origin)

    def _forget(self, origin: Origin) -> None:
        self._open[origin] -= 1
        self._room(origin)


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


def _target(url: str) -> tuple[Origin, bytes]:
    """The origin of ``url`` and the start of a POST's head to it."""
    parsed = httpx.URL(url)
    scheme = parsed.scheme
    port = parsed.port or (443 if scheme == "https" else 80)
    start = b"POST " + parsed.raw_path + b" HTTP/1.1\r\nhost: " + parsed.netloc + b"\r\n"
    return (scheme, parsed.host, port), start


def default_upstream(timeouts: Timeouts) -> FastUpstream:
    return FastUpstream(timeouts)
