"""A backend that hangs (SIGSTOP) while the gateway is in front of it: requests move to a
live backend, a started stream ends with an error event, and the hung one is marked down
at once. Real ``comeapi backend`` processes running the bundled model."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.test_balancer_e2e import Node, start_backend, start_gateway, wait_healthy
from tests.helpers import Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

Spawn = Callable[..., Proc]
STALL = 2.0  # --stall-timeout
# The regular probe comes every 30 s here, so only the stall logic can notice the hang.
FLAGS = ("--stall-timeout", str(STALL), "--health-timeout", "1", "--health-interval", "30")
BODY = {"prompt": "Hi", "max_tokens": 4, "temperature": 0}


def backend_status(gateway: Node, url: str) -> dict[str, Any]:
    status = httpx.get(gateway.url + "/status", timeout=5).json()
    [entry] = [b for b in status["backends"] if b["url"] == url]
    return entry


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """PIDs the test SIGSTOPs; each gets SIGCONT afterwards so it can be stopped normally."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_requests_to_a_hung_backend_move_to_a_live_one(
    spawn: Spawn, model_dir: Path, stopped: list[int]
) -> None:
    backends = [start_backend(spawn, model_dir) for _ in range(2)]
    gateway = start_gateway(spawn, backends, *FLAGS)
    wait_healthy(gateway, 2)
    hung = backends[0]
    os.kill(hung.proc.pid, signal.SIGSTOP)
    stopped.append(hung.proc.pid)

    elapsed = []
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        for _ in range(4):  # round robin: the hung backend is picked first or second
            started = time.monotonic()
            response = client.post("/generate", json=BODY)
            elapsed.append(time.monotonic() - started)
            assert response.status_code == 200, response.text
    # One request waited out the stall (2 s) and a 1 s probe, then moved; none held on.
    assert max(elapsed) < STALL + 1 + 10, elapsed
    entry = backend_status(gateway, hung.url)
    assert entry["healthy"] is False
    assert entry["reason"] in ("stalled", "timeout"), entry

    os.kill(hung.proc.pid, signal.SIGCONT)
    stopped.clear()
    deadline = time.monotonic() + 30
    while not backend_status(gateway, hung.url)["healthy"]:
        assert time.monotonic() < deadline, "the resumed backend never came back"
        time.sleep(0.2)


def test_a_stream_from_a_backend_that_hangs_midway_ends_with_an_error_event(
    spawn: Spawn, model_dir: Path, stopped: list[int]
) -> None:
    backend = start_backend(spawn, model_dir)
    gateway = start_gateway(spawn, [backend], *FLAGS)
    wait_healthy(gateway, 1)
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0, "stream": True}
    received = b""
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", gateway.url + "/generate", json=body) as response,
    ):
        assert response.status_code == 200
        chunks = response.iter_raw()
        received += next(chunks)
        os.kill(backend.proc.pid, signal.SIGSTOP)
        stopped.append(backend.proc.pid)
        stopped_at = time.monotonic()
        for chunk in chunks:
            received += chunk
        ended = time.monotonic() - stopped_at
    assert ended < STALL + 1 + 10, ended
    assert b'"code":"backend_failed"' in received and b"stalled" in received
    assert received.endswith(b"data: [DONE]\n\n")
    entry = backend_status(gateway, backend.url)
    assert entry["healthy"] is False and entry["reason"] in ("stalled", "timeout")


def test_an_idle_hung_backend_is_marked_down_within_seconds_by_default(
    spawn: Spawn, model_dir: Path, stopped: list[int]
) -> None:
    """Fault: a hung backend was marked down only 16 s later (probes every 30 s). With the
    default settings it is out within health_interval + health_timeout (5 + 2 s)."""
    backend = start_backend(spawn, model_dir)
    port = free_port()
    gateway = Node(
        f"http://127.0.0.1:{port}",
        port,
        spawn(comeapi_argv("serve", "--port", str(port), "--backend", backend.url), name="gw"),
    )
    wait_healthy(gateway, 1)
    os.kill(backend.proc.pid, signal.SIGSTOP)
    stopped.append(backend.proc.pid)
    started = time.monotonic()
    while backend_status(gateway, backend.url)["healthy"]:
        assert time.monotonic() - started < 5 + 2 + 5, "still healthy"
        time.sleep(0.2)
    assert backend_status(gateway, backend.url)["reason"] == "timeout"
