"""Later answers (``answer_later``): a request ``answer_now`` leaves is answered by a task of
the server's own, or by ``Pending`` work through ``request.reply``, with no ASGI cycle, in
one write; in order with pipelined requests, and cancelled when the client goes. A small app
stands in for the gateway here (the protocol's logic); ``tests/gateway`` runs the gateway's
forwarded misses through it for real."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from uvicorn.server import ServerState

from comeapi.http.immediate import ImmediateRequest, Later, Pending
from comeapi.http.protocol import HttpProtocol
from comeapi.http.server import ServerConfig
from tests.http.test_immediate import MemoryTransport, http_request

pytestmark = pytest.mark.anyio


class Work:
    """``Pending`` work: the test answers it (``answer``), or the server cancels it."""

    def __init__(self, request: ImmediateRequest) -> None:
        assert request.reply is not None
        self.reply = request.reply
        self.body = request.body
        self.cancelled: list[Any] = []

    def cancel(self, msg: Any = None) -> bool:
        self.cancelled.append(msg)
        # As the forwarder does: told later, never from inside cancel().
        asyncio.get_running_loop().call_soon(self.reply, None)
        return True

    def answer(self) -> None:
        self.reply((202, b"x-path: pending\r\n", b"pending:" + self.body))


class App:
    """``/now`` is answered at once, ``/later`` when ``release`` is set, ``/pending`` when the
    test answers its ``Work``, the rest by ASGI."""

    immediate_paths = frozenset({"/now", "/later", "/pending", "/asgi"})

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = False
        self.fail = False
        self.work: list[Work] = []

    def answer_now(self, request: ImmediateRequest) -> tuple[bytes, bytes] | None:
        if request.path == "/now":
            return b"x-path: now\r\n", b"now"
        return None

    def answer_later(
        self, request: ImmediateRequest
    ) -> Coroutine[Any, Any, Later] | Pending | None:
        if request.path == "/pending":
            self.work.append(Work(request))
            return self.work[-1]
        if request.path != "/later":
            return None
        return self._later(request.body)

    async def _later(self, body: bytes) -> Later:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise RuntimeError("a bug in the app")
        return 201, b"x-path: later\r\n", b"later:" + body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # What ``answer_now`` would answer, the same way (a request queued behind another
        # comes here); anything else as 202.
        await receive()
        name = scope["path"].strip("/").encode()
        status = 200 if name == b"now" else 202
        headers = [(b"content-length", b"%d" % len(name)), (b"x-path", name)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": name})


class Connection:
    def __init__(self, app: App) -> None:
        config = ServerConfig(
            app, header_timeout=10, body_timeout=10, lifespan="off", log_level="warning"
        )
        config.load()
        self.app = app
        self.state = ServerState()
        self.protocol = HttpProtocol(
            config=config, server_state=self.state, app_state={}, _loop=asyncio.get_running_loop()
        )
        self.transport = MemoryTransport()
        self.protocol.connection_made(self.transport)

    async def settle(self) -> bytes:
        for _ in range(50):
            await asyncio.sleep(0)
        return bytes(self.transport.out)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def connection() -> AsyncIterator[Connection]:
    opened = Connection(App())
    yield opened
    if not opened.transport.closed:
        opened.protocol.connection_lost(None)


def statuses(written: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", written)


async def test_a_later_answer_is_written_whole_when_ready(connection: Connection) -> None:
    connection.protocol.data_received(http_request("/later", b"hi"))
    await connection.app.started.wait()
    assert await connection.settle() == b""  # not before the work is done
    connection.transport.writes = 0
    connection.app.release.set()
    written = await connection.settle()
    head, _, body = written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"\r\nx-path: later\r\n" in head and b"content-length: 8" in head
    assert b"connection: close" not in head and not connection.transport.closed
    assert body == b"later:hi"
    assert connection.transport.writes == 1
    assert connection.state.total_requests == 1
    assert not connection.state.tasks  # the task is the server's, and it is over
    # The connection is kept alive: the next request is answered on it.
    connection.transport.out.clear()
    connection.protocol.data_received(http_request("/now", b""))
    assert statuses(await connection.settle()) == [b"200"]


async def test_pipelined_requests_wait_for_a_later_answer(connection: Connection) -> None:
    data = http_request("/later", b"1") + http_request("/now", b"") + http_request("/asgi", b"")
    connection.protocol.data_received(data)
    await connection.app.started.wait()
    assert await connection.settle() == b""  # the immediate one waits its turn
    connection.app.release.set()
    written = await connection.settle()
    assert statuses(written) == [b"201", b"200", b"202"], written
    assert re.findall(rb"x-path: (\w+)", written) == [b"later", b"now", b"asgi"]


async def test_a_lost_connection_cancels_the_work(connection: Connection) -> None:
    connection.protocol.data_received(http_request("/later", b"x"))
    await connection.app.started.wait()
    connection.protocol.connection_lost(ConnectionResetError())
    await connection.settle()
    assert connection.app.cancelled
    assert not connection.state.tasks
    assert connection.transport.out == b""


async def test_a_server_stopping_lets_the_answer_finish_then_closes(
    connection: Connection,
) -> None:
    connection.protocol.data_received(http_request("/later", b"x"))
    await connection.app.started.wait()
    connection.protocol.shutdown()
    assert not connection.transport.closed  # the answer is on its way
    connection.app.release.set()
    written = await connection.settle()
    assert statuses(written) == [b"201"] and b"connection: close\r\n" in written
    assert connection.transport.closed


async def test_work_that_fails_is_a_500_in_openais_shape(connection: Connection) -> None:
    connection.app.fail = True
    connection.app.release.set()
    connection.protocol.data_received(http_request("/later", b"x"))
    written = await connection.settle()
    head, _, body = written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ") and b"content-type: application/json" in head
    assert json.loads(body)["error"]["message"] == "internal server error"
    assert not connection.transport.closed and not connection.state.tasks


async def test_pending_work_is_written_whole_when_it_replies(connection: Connection) -> None:
    connection.protocol.data_received(http_request("/pending", b"hi"))
    (work,) = connection.app.work
    assert await connection.settle() == b""
    assert list(connection.state.tasks) == [work]  # held as a task: shutdown waits for it
    connection.transport.writes = 0
    work.answer()
    written = bytes(connection.transport.out)  # at once, not a loop turn later
    head, _, body = written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202 Accepted\r\n")
    assert b"\r\nx-path: pending\r\n" in head and b"content-length: 10" in head
    assert body == b"pending:hi" and connection.transport.writes == 1
    assert not connection.transport.closed
    assert connection.state.total_requests == 1 and not connection.state.tasks
    connection.transport.out.clear()
    connection.protocol.data_received(http_request("/now", b""))
    assert statuses(await connection.settle()) == [b"200"]


async def test_pipelined_requests_wait_for_pending_work(connection: Connection) -> None:
    data = http_request("/pending", b"1") + http_request("/now", b"") + http_request("/asgi", b"")
    connection.protocol.data_received(data)
    assert await connection.settle() == b""
    connection.app.work[0].answer()
    written = await connection.settle()
    assert statuses(written) == [b"202", b"200", b"202"], written
    assert re.findall(rb"x-path: (\w+)", written) == [b"pending", b"now", b"asgi"]


async def test_a_lost_connection_cancels_pending_work(connection: Connection) -> None:
    connection.protocol.data_received(http_request("/pending", b"x"))
    (work,) = connection.app.work
    connection.protocol.connection_lost(ConnectionResetError())
    assert work.cancelled == [None]
    await connection.settle()
    assert not connection.state.tasks
    assert connection.transport.out == b""


async def test_a_server_stopping_lets_pending_work_finish_then_closes(
    connection: Connection,
) -> None:
    connection.protocol.data_received(http_request("/pending", b"x"))
    connection.protocol.shutdown()
    assert not connection.transport.closed
    connection.app.work[0].answer()
    written = await connection.settle()
    assert statuses(written) == [b"202"] and b"connection: close\r\n" in written
    assert connection.transport.closed
