"""`comeapi serve --workers 2` stopping with requests in flight (issue 22, item 7): as with one
worker, what the grace period cannot finish gets OpenAI's 503 ``shutting_down`` or, in a
stream already started, an error event and ``[DONE]``; and no new connection is accepted
once SIGTERM has arrived. The backend stands in for a slow generation (its answers take
longer than the grace period), so the test is about the gateway's processes only."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Proc, comeapi_argv, free_port

SLOW = 30.0  # seconds a generation would take


class SlowBackend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.active = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: SlowBackend
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "status": "ok",
                "capacity": 8,
                "in_flight": 0,
                "available": 8,
                "models": ["gemma-3-270m-q4_k_m.gguf"],
                "loaded_models": [],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.active += 1
        try:
            if request.get("stream"):
                self._stream()
            else:
                time.sleep(SLOW)
        except OSError:
            pass  # the gateway went away
        finally:
            with self.server.lock:
                self.server.active -= 1

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + SLOW
        while time.monotonic() < deadline:
            event = b'data: {"response": "word ", "model": "m"}\n\n'
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            time.sleep(0.1)


@pytest.fixture
def backend() -> Iterator[SlowBackend]:
    server = SlowBackend()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_two_workers_stop_like_one(backend: SlowBackend, tmp_path: Path) -> None:
    port = free_port()
    argv = comeapi_argv(
        "serve",
        "--port", str(port),
        "--workers", "2",
        "--store", f"sqlite:{tmp_path / 'store.db'}",
        "--backend", backend.url,
        "--shutdown-timeout", "2",
        "--health-interval", "0.5",
    )  # fmt: skip
    gateway = Proc(argv, tmp_path / "gateway.log")
    outcomes: dict[str, Any] = {}

    def call(name: str, stream: bool) -> None:
        body = {"prompt": f"not cached {name}", "max_tokens": 250, "stream": stream}
        try:
            with httpx.Client(timeout=60) as client:
                r = client.post(f"http://127.0.0.1:{port}/generate", json=body)
                outcomes[name] = (r.status_code, r.headers.get("content-type", ""), r.content)
        except httpx.HTTPError as exc:
            outcomes[name] = exc

    try:
        gateway.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        # Both workers know the backend is healthy (each has its own health checker).
        time.sleep(2)
        calls = [
            threading.Thread(target=call, args=(f"{kind}{i}", kind == "stream"))
            for kind in ("plain", "stream")
            for i in range(3)
        ]
        for thread in calls:
            thread.start()
        deadline = time.monotonic() + 30
        while backend.active < len(calls):
            assert time.monotonic() < deadline, (backend.active, outcomes, gateway.log())
            time.sleep(0.05)
        time.sleep(0.5)  # the streams have started
        os.kill(gateway.pid, signal.SIGTERM)
        sigterm = time.monotonic()
        while not refused(port):
            assert time.monotonic() - sigterm < 1.0, "new connections accepted after SIGTERM"
            time.sleep(0.05)
        for thread in calls:
            thread.join(60)
        assert gateway.popen.wait(30) == 0, gateway.log()
    finally:
        gateway.stop()
    for name, outcome in sorted(outcomes.items()):
        assert isinstance(outcome, tuple), (name, outcome)
        status, content_type, body = outcome
        if name.startswith("plain"):
            assert status == 503 and content_type == "application/json", (name, outcome)
            assert json.loads(body)["error"]["code"] == "shutting_down"
        else:
            assert status == 200, (name, outcome)
            events = [e for e in body.decode().split("\n\n") if e]
            assert events[-1] == "data: [DONE]", (name, events[-3:])
            last = json.loads(events[-2].removeprefix("data: "))
            assert last["error"]["code"] == "shutting_down", (name, events[-3:])
