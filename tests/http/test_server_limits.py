"""The servers' read deadlines and connection cap, on a real `comeapi serve` process: half-open
connections are closed, a body that stops arriving gets 408, connections beyond the cap 503.
Before these limits a reliability run held 2000 half-open connections open for good."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Proc, comeapi_argv, free_port


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    argv = comeapi_argv(
        "serve",
        "--port", str(port),
        "--store", f"sqlite:{tmp_path / 'store.db'}",
        "--header-timeout", "1",
        "--body-timeout", "1",
        "--max-connections", "20",
    )  # fmt: skip
    proc = Proc(argv, tmp_path / "gateway.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield port
    finally:
        proc.stop()


def closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing ``sock`` within ``within`` s; None if still open."""
    sock.settimeout(within)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    return received


def test_connections_that_never_finish_their_headers_are_closed(gateway: int) -> None:
    silent = [socket.create_connection(("127.0.0.1", gateway), timeout=5) for _ in range(10)]
    slow = [socket.create_connection(("127.0.0.1", gateway), timeout=5) for _ in range(10)]
    for sock in slow:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    started = time.monotonic()
    try:
        for sock in silent + slow:
            assert closed_by_server(sock, within=15) == b""
        assert time.monotonic() - started < 15
        # The server is still answering.
        assert httpx.get(f"http://127.0.0.1:{gateway}/health", timeout=5).status_code == 200
    finally:
        for sock in silent + slow:
            sock.close()


def test_a_body_that_stops_arriving_gets_408(gateway: int) -> None:
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"prompt": "Hel'
        )
        answer = closed_by_server(sock, within=15)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head
    assert b'"code":"timeout"' in body.replace(b" ", b"")


def test_connections_beyond_the_cap_get_503(gateway: int) -> None:
    # 20 requests in progress (headers sent, body still coming) fill the cap of 20.
    held = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", gateway), timeout=5)
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            held.append(sock)
        time.sleep(0.2)
        r = httpx.get(f"http://127.0.0.1:{gateway}/health", timeout=5)
        assert r.status_code == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if httpx.get(f"http://127.0.0.1:{gateway}/health", timeout=5).status_code == 200:
            return
        time.sleep(0.1)
    pytest.fail("the gateway did not take requests again once the held ones were gone")


def test_a_malformed_request_is_answered_in_json(gateway: int) -> None:
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = closed_by_server(sock, within=10)
    assert answer is not None and answer.startswith(b"HTTP/1.1 400 "), answer
    assert b'"type": "invalid_request_error"' in answer or b'"invalid_request_error"' in answer
