"""Cache hits answered by the server before any ASGI task (``http.server``): the answer is
written while the request's bytes are being read, a miss is forwarded by a task of the
server's (``answer_later``, tests/http/test_later.py), and everything else (errors,
pipelined, chunked, 100-continue and HTTP/1.0 requests, forwarded clients) comes out as it
does on the ASGI path.

The first tests drive uvicorn's real protocol with the real gateway app over an in-memory
transport, so they can tell which path answered: an immediate answer is in the transport
when ``data_received`` returns, before the event loop runs anything. The last ones talk to
a real ``comeapi serve`` over sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from uvicorn.lifespan.on import LifespanOn
from uvicorn.server import ServerState

from comeapi.balancer.pool import BackendPool
from comeapi.cache.prompts import load_prompt_set
from comeapi.gateway.app import create_app
from comeapi.gateway.server import build_cache, uvicorn_config
from comeapi.http.protocol import HttpProtocol
from comeapi.settings import load_settings
from tests.helpers import REPO, Proc, comeapi_argv, free_port

SHIPPED = REPO / "src" / "comeapi" / "data" / "default-cache.jsonl"


def cached_bodies() -> list[tuple[str, bytes]]:
    """(path, body) of each shipped prompt, as a client sends it."""
    out = []
    for item in load_prompt_set().items:
        body = item.request_body(0)
        body.pop("seed")
        path = "/v1/chat/completions" if item.kind == "chat" else "/generate"
        out.append((path, json.dumps(body).encode()))
    return out


def http_request(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    head = [f"POST {path} HTTP/{version}", "Host: x", "Content-Type: application/json"]
    head += [f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:{tmp_path_factory.mktemp('immediate') / 'store.db'}"
    subprocess.run(
        comeapi_argv("cache", "import", "--store", url, str(SHIPPED)),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return url


class MemoryTransport(asyncio.Transport):
    """What the protocol writes, kept in memory; the peer is a trusted local proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.writes = 0  # system calls a socket would have made

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Connection:
    def __init__(self, protocol: HttpProtocol, transport: MemoryTransport, app: Any):
        self.protocol = protocol
        self.transport = transport
        self.app = app

    def feed(self, data: bytes) -> bytes:
        """What the server wrote while reading ``data``, before the event loop ran."""
        before = len(self.transport.out)
        self.protocol.data_received(data)
        return bytes(self.transport.out[before:])

    async def settle(self) -> bytes:
        """Everything written so far, once the tasks started have finished."""
        for _ in range(200):
            await asyncio.sleep(0)
        return bytes(self.transport.out)


@contextlib.asynccontextmanager
async def open_connection(store: str, **options: Any) -> AsyncIterator[Connection]:
    """A connection to a gateway app over ``store``, from 127.0.0.1 (a trusted proxy)."""
    # The backend's port is closed: a miss is a quick 5xx (from a task: ``answer_later``).
    settings = load_settings(None, store=store, log_level="warning", **options)
    pool = BackendPool.from_settings(settings, [f"http://127.0.0.1:{free_port()}"])
    app = create_app(settings, pool, build_cache(settings))
    config = uvicorn_config(settings, app)
    config.load()
    lifespan = LifespanOn(config)
    await lifespan.startup()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config,
        server_state=ServerState(),
        app_state={},
        _loop=asyncio.get_running_loop(),
    )
    assert isinstance(protocol, HttpProtocol)
    transport = MemoryTransport()
    protocol.connection_made(transport)
    try:
        yield Connection(protocol, transport, app)
    finally:
        protocol.connection_lost(None)
        await lifespan.shutdown()


@pytest.fixture
async def connection(store: str) -> AsyncIterator[Connection]:
    async with open_connection(store) as opened:
        yield opened


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_hit_is_written_before_the_event_loop_runs(connection: Connection) -> None:
    gateway = connection.app.state.gateway
    for path, body in cached_bodies():
        written = connection.feed(http_request(path, body))
        head, _, payload = written.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), written[:200]
        assert b"\r\nx-cache: HIT\r\n" in head
        assert f"content-length: {len(payload)}".encode() in head
        json.loads(payload)
    # Counted as the ASGI path counts a hit.
    assert gateway.cache.hits == len(cached_bodies())
    metrics = gateway.metrics.render().decode()
    assert 'route="/generate",status="200"' in metrics.replace("code=", "status=")


@pytest.mark.anyio
async def test_errors_take_the_asgi_path_a_miss_a_task_and_a_miss_counts_once(
    connection: Connection,
) -> None:
    gateway = connection.app.state.gateway
    path, body = cached_bodies()[0]
    invalid = json.dumps({**json.loads(body), "max_tokens": -1}).encode()
    assert connection.feed(http_request(path, invalid)) == b""  # a task will answer
    written = await connection.settle()
    assert written.startswith(b"HTTP/1.1 400 "), written[:200]
    assert b'"param":"max_tokens"' in written.replace(b" ", b"")

    unknown = json.dumps({"prompt": "nobody asked this yet", "max_tokens": 4}).encode()
    connection.transport.out.clear()
    connection.transport.writes = 0
    assert connection.feed(http_request("/generate", unknown)) == b""  # a task will answer
    written = await connection.settle()
    # No backend is up: the miss goes to the pool, which has nobody to give it to.
    assert written.startswith(b"HTTP/1.1 503 "), written[:300]
    assert b'"code":"no_backend_available"' in written
    assert connection.transport.writes == 1
    assert gateway.cache.misses == 1


@pytest.mark.anyio
async def test_an_asgi_answer_goes_out_in_one_write(connection: Connection) -> None:
    # uvicorn's cycle writes a response's head, then its body: two sends, two segments.
    path, body = cached_bodies()[0]
    invalid = json.dumps({**json.loads(body), "max_tokens": -1}).encode()
    connection.transport.writes = 0
    connection.feed(http_request(path, invalid))
    written = await connection.settle()
    assert written.startswith(b"HTTP/1.1 400 ") and written.endswith(b"}")
    assert connection.transport.writes == 1


@pytest.mark.anyio
async def test_pipelined_requests_are_answered_in_order(connection: Connection) -> None:
    (path, body), (path2, body2) = cached_bodies()[:2]
    bad = b'{"prompt": 5}'
    data = http_request(path, body) + http_request("/generate", bad) + http_request(path2, body2)
    first = connection.feed(data)
    # The first hit is immediate; the error holds the hit behind it until its task is done.
    assert first.count(b"HTTP/1.1 ") == 1 and b"x-cache: HIT" in first
    written = await connection.settle()
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", written)
    assert statuses == [b"200", b"400", b"200"], written
    assert written.count(b"x-cache: HIT") == 2


@pytest.mark.anyio
async def test_a_request_that_waits_for_100_continue_or_streams_its_body_uses_the_asgi_path(
    connection: Connection,
) -> None:
    path, body = cached_bodies()[0]
    assert connection.feed(http_request(path, body, "Expect: 100-continue")) == b""
    written = await connection.settle()
    assert b"HTTP/1.1 100 Continue" in written and b"x-cache: HIT" in written
    connection.transport.out.clear()
    chunked = (
        (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n"
        ).encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    assert connection.feed(chunked) == b""
    written = await connection.settle()
    assert written.startswith(b"HTTP/1.1 200 ") and b"x-cache: HIT" in written


@pytest.mark.anyio
async def test_with_cors_every_hit_takes_the_asgi_path_for_its_headers(store: str) -> None:
    origin = "https://app.example"
    async with open_connection(store, cors_origins=[origin]) as connection:
        path, body = cached_bodies()[0]
        assert connection.feed(http_request(path, body, f"Origin: {origin}")) == b""
        written = await connection.settle()
    assert b"x-cache: HIT" in written
    assert f"access-control-allow-origin: {origin}".encode() in written.lower()


# --- a real server ---------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, store: str) -> Iterator[tuple[int, Proc]]:
    port = free_port()
    argv = comeapi_argv(
        "serve",
        "--port", str(port),
        "--store", store,
        "--backend", f"http://127.0.0.1:{free_port()}",
        "--access-log", "json",
    )  # fmt: skip
    proc = Proc(argv, tmp_path / "gateway.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield port, proc
    finally:
        proc.stop()


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One response's head and body (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    assert len(rest) == length, "nothing may follow the body"
    return head, rest


def test_keep_alive_close_and_http_1_0_on_a_real_server(served: tuple[int, Proc]) -> None:
    port, proc = served
    bodies = cached_bodies()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for path, body in bodies * 2:
            sock.sendall(http_request(path, body, "X-Forwarded-For: 203.0.113.7"))
            head, payload = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and b"x-cache: HIT" in head
            assert b"\r\ndate: " in head and b"\r\nserver: uvicorn" in head
            json.loads(payload)
        path, body = bodies[0]
        sock.sendall(http_request(path, body, "Connection: close"))
        head, _ = read_response(sock)
        assert b"connection: close" in head
        assert sock.recv(10) == b""  # and the server closed it
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(http_request(path, body, version="1.0"))
        head, _ = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head
        assert sock.recv(10) == b""
    # A miss after hits on one connection, then a hit again.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert client.post(path, content=body).headers["x-cache"] == "HIT"
        missed = client.post("/generate", json={"prompt": "not cached", "max_tokens": 2})
        assert missed.status_code in (502, 503), missed.text
        assert client.post(path, content=body).headers["x-cache"] == "HIT"
    # The access log names the client the trusted proxy forwarded, as the ASGI path does.
    records = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    hits = [r for r in records if r["cache"] == "HIT"]
    assert len(hits) == len(bodies) * 2 + 4
    assert {r["client"] for r in hits[: len(bodies) * 2]} == {"203.0.113.7"}
    assert {r["client"] for r in hits[len(bodies) * 2 :]} == {"127.0.0.1"}
