"""Hostile and unusual HTTP against real `comeapi serve` and `comeapi backend` processes
(issue 22, items 1-3): requests pipelined behind an immediate hit, request heads too large
or too many, Transfer-Encoding nginx refuses, protocol upgrades, and one address re-opening
half-open connections to fill the connection table. Every error is JSON in OpenAI's shape.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO, Proc, comeapi_argv, free_port

SHIPPED = REPO / "src" / "comeapi" / "data" / "default-cache.jsonl"
MODELS = REPO / "models"


def cached_request() -> bytes:
    """A POST of the first shipped prompt (a hit), as bytes."""
    from comeapi.cache.prompts import load_prompt_set

    item = next(i for i in load_prompt_set().items if i.kind != "chat")
    body = item.request_body(0)
    body.pop("seed")
    return post("/generate", json.dumps(body).encode())


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json"]
    head += [f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class SlowBackend(ThreadingHTTPServer):
    """Stands in for a backend whose generations take ``delay`` seconds."""

    def __init__(self, delay: float):
        self.delay = delay
        super().__init__(("127.0.0.1", 0), _SlowHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _SlowHandler(BaseHTTPRequestHandler):
    server: SlowBackend
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        health = {"status": "ok", "capacity": 4, "in_flight": 0, "available": 4}
        self._json({**health, "models": ["gemma-3-270m-q4_k_m.gguf"], "loaded_models": []})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.server.delay)
        self._json({"response": "slowly generated", "finish_reason": "length", "usage": {}})

    def _json(self, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:{tmp_path_factory.mktemp('hostile') / 'store.db'}"
    subprocess.run(
        comeapi_argv("cache", "import", "--store", url, str(SHIPPED)),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return url


@pytest.fixture(scope="module")
def slow_backend() -> Iterator[SlowBackend]:
    server = SlowBackend(delay=6.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def gateway(
    store: str, slow_backend: SlowBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    port = free_port()
    argv = comeapi_argv(
        "serve",
        "--port", str(port),
        "--store", store,
        "--backend", slow_backend.url,
        "--body-timeout", "8",
        "--log-level", "warning",
    )  # fmt: skip
    proc = Proc(argv, tmp_path_factory.mktemp("gw") / "gateway.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield port
    finally:
        proc.stop()


def read_responses(sock: socket.socket, count: int, within: float) -> list[tuple[int, bytes]]:
    """(status, body) of ``count`` responses read from ``sock`` within ``within`` s."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    data = b""
    out: list[tuple[int, bytes]] = []
    while len(out) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode("latin-1")
            length = int(
                next(
                    line.split(":", 1)[1]
                    for line in head.split("\r\n")
                    if line.lower().startswith("content-length:")
                )
            )
            if len(data) >= head_end + 4 + length:
                out.append((int(head.split()[1]), data[head_end + 4 : head_end + 4 + length]))
                data = data[head_end + 4 + length :]
                continue
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return out


def error_code(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    return str(doc["error"]["code"])


def test_a_miss_pipelined_behind_a_hit_is_answered(gateway: int) -> None:
    miss = post("/generate", json.dumps({"prompt": "not cached", "max_tokens": 250}).encode())
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(cached_request() + miss)
        answers = read_responses(sock, 2, within=20)
    # The miss takes 6.5 s; the keep-alive limit (5 s) must not cut it.
    assert [status for status, _ in answers] == [200, 200], answers
    assert json.loads(answers[1][1])["response"] == "slowly generated"


def test_a_body_still_arriving_behind_a_hit_gets_its_408(gateway: int) -> None:
    slow = post("/generate", b'{"prompt": "the rest never comes"}')[:-10]
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(cached_request() + slow)
        started = time.monotonic()
        answers = read_responses(sock, 2, within=20)
        waited = time.monotonic() - started
    assert [status for status, _ in answers] == [200, 408], answers
    assert error_code(answers[1][1]) == "timeout" and waited > 7.5


def test_too_many_or_too_large_headers_get_431(gateway: int) -> None:
    body = json.dumps({"prompt": "x"}).encode()
    many = post("/generate", body, *(f"X-Filler-{i}: {i}" for i in range(200)))
    large = post("/generate", body, "X-Large: " + "a" * 9000)
    for request in (many, large):
        with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
            sock.sendall(request)
            answers = read_responses(sock, 1, within=10)
        assert [s for s, _ in answers] == [431], answers
        assert error_code(answers[0][1]) in {"too_many_headers", "header_too_large"}


def test_a_header_without_end_is_refused_before_it_fills_memory(gateway: int) -> None:
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        with pytest.raises(OSError):  # the server closes while more keeps coming
            while sent < 32 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
                time.sleep(0.001)
        assert sent <= 8 * 1024 * 1024  # what socket buffers hold before the server reads


def test_a_long_url_gets_414(gateway: int) -> None:
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(f"GET /{'a' * 10000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answers = read_responses(sock, 1, within=10)
    assert [s for s, _ in answers] == [414] and error_code(answers[0][1]) == "url_too_long"


def test_transfer_codings_other_than_chunked_get_501_as_from_nginx(gateway: int) -> None:
    request = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(request)
        answers = read_responses(sock, 1, within=10)
    assert [s for s, _ in answers] == [501], answers
    assert error_code(answers[0][1]) == "unsupported_transfer_encoding"


def test_a_websocket_upgrade_gets_a_json_400(gateway: int) -> None:
    request = (
        b"GET /generate HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(request)
        answers = read_responses(sock, 1, within=10)
    assert [s for s, _ in answers] == [400], answers
    assert error_code(answers[0][1]) == "upgrade_not_supported"


def test_the_backend_has_the_same_head_limits(tmp_path: Path) -> None:
    port = free_port()
    argv = comeapi_argv("backend", "--port", str(port), "--model-dir", str(MODELS))
    proc = Proc(argv, tmp_path / "backend.log")
    try:
        # The limits hold while the model loads (/health: 503) as after.
        deadline = time.monotonic() + 120
        while True:
            assert proc.popen.poll() is None and time.monotonic() < deadline, proc.log()
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        many = post("/generate", b"{}", *(f"X-Filler-{i}: {i}" for i in range(200)))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(many)
            answers = read_responses(sock, 1, within=10)
        assert [s for s, _ in answers] == [431] and error_code(answers[0][1])
    finally:
        proc.stop()


def test_one_address_cannot_fill_the_connection_table(store: str, tmp_path: Path) -> None:
    port = free_port()
    argv = comeapi_argv(
        "serve",
        "--port", str(port),
        "--store", store,
        "--max-connections", "40",
        "--header-timeout", "60",
        "--log-level", "warning",
    )  # fmt: skip
    proc = Proc(argv, tmp_path / "gateway.log")
    held: list[socket.socket] = []
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        # Another loopback address stands for another client.
        for _ in range(60):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(sock)
        time.sleep(0.5)
        statuses = []
        for _ in range(30):
            try:
                statuses.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)  # type: ignore[arg-type]
        assert statuses == [200] * 30, statuses
    finally:
        for sock in held:
            sock.close()
        proc.stop()


def test_an_http2_offer_is_answered_in_http1(gateway: int) -> None:
    # curl --http2 on http:// offers h2c; like nginx, the server answers in HTTP/1.1.
    request = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(request)
        answers = read_responses(sock, 1, within=10)
    assert [s for s, _ in answers] == [200], answers
