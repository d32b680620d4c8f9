"""A backend that hangs (SIGSTOP) while the gateway is in front of it: requests move to a
live backend, a started stream ends with an error event, and the hung one is marked down
at once. Real ``comeapi backend`` processes running the bundled model."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.settings import Settings
from tests.gateway.test_balancer_e2e import (
    Node,
    metric,
    start_backend,
    start_gateway,
    wait_healthy,
)
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


def in_flight(gateway: Node) -> dict[str, int]:
    status = httpx.get(gateway.url + "/status", timeout=5).json()
    return {b["url"]: b["in_flight"] for b in status["backends"]}


def default_gateway(spawn: Spawn, backends: list[Node]) -> Node:
    """`comeapi serve` with the default stall, health and request settings."""
    port = free_port()
    argv = comeapi_argv(
        "serve", "--port", str(port), *(a for b in backends for a in ("--backend", b.url))
    )
    return Node(f"http://127.0.0.1:{port}", port, spawn(argv, name="gw"))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_no_request_waits_10_s_on_a_backend_that_hangs_under_it_by_default(
    spawn: Spawn, model_dir: Path, stopped: list[int], stream: bool
) -> None:
    """Issue 22: a request that started 1.5 s before its backend was SIGSTOPped finished
    14.7 s after the stop (stall 10 s, a probe, then the answer generated again). With the
    default settings it is answered by the other backend (or, a stream already started,
    ended with an error event) within 10 s of the stop, its regeneration included. The
    backend is stopped shortly after the request reached it, mid-answer: 96 tokens take
    about 2 s at one thread here, so the answer is still under way on a faster machine
    (48 tokens and a stop 1.5 s in were over before the stop once decoding got faster)."""
    backends = [start_backend(spawn, model_dir) for _ in range(2)]
    gateway = default_gateway(spawn, backends)
    wait_healthy(gateway, 2)
    body = {"prompt": "Once upon a time", "max_tokens": 96, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        client.post("/generate", json={**body, "stream": False}).raise_for_status()  # warm up
        client.post("/generate", json={**body, "stream": False}).raise_for_status()
        result: dict[str, Any] = {}

        def send() -> None:
            response = client.post("/generate", json=body)
            result["response"], result["done"] = response, time.monotonic()

        sender = threading.Thread(target=send)
        sender.start()
        started = time.monotonic()
        busy: list[str] = []
        while not busy:
            busy = [url for url, n in in_flight(gateway).items() if n]
            assert time.monotonic() - started < 10, "the request never reached a backend"
        time.sleep(0.3)
        [hung] = [b for b in backends if b.url == busy[0]]
        assert in_flight(gateway)[hung.url] == 1, "the request ended before the stop"
        os.kill(hung.proc.pid, signal.SIGSTOP)
        stopped.append(hung.proc.pid)
        stopped_at = time.monotonic()
        sender.join(60)
    response = result["response"]
    waited = result["done"] - stopped_at
    print(f"answered {waited:.1f} s after the stop")  # shown with pytest -s
    assert waited < 10, waited
    assert response.status_code == 200, response.text
    if stream and b"backend_failed" in response.content:  # the stream had started
        assert b"stalled" in response.content and response.content.endswith(b"data: [DONE]\n\n")
    else:
        assert b"backend_failed" not in response.content
    assert backend_status(gateway, hung.url)["healthy"] is False


def test_the_default_stall_timeout_leaves_a_busy_healthy_backend_alone(
    spawn: Spawn, model_dir: Path
) -> None:
    """Long plain answers (silent until they end, several stall timeouts long) from a backend
    that is busy with two of them at once: none is cut, the backend stays in the pool."""
    port = free_port()
    argv = comeapi_argv(
        "backend", "--model-dir", str(model_dir), "--port", str(port), "--threads", "2",
        "--slots", "2", "--ctx", "1024",
    )  # fmt: skip
    backend = Node(f"http://127.0.0.1:{port}", port, spawn(argv, name="busy-backend"))
    gateway = default_gateway(spawn, [backend])
    wait_healthy(gateway, 1)
    body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0, "seed": 1}
    results: list[tuple[httpx.Response, float]] = []

    def send() -> None:
        started = time.monotonic()
        response = httpx.post(gateway.url + "/generate", json=body, timeout=300)
        results.append((response, time.monotonic() - started))

    senders = [threading.Thread(target=send) for _ in range(2)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(300)
    stall = Settings().stall_timeout
    for response, took in results:
        assert response.status_code == 200, response.text
        assert took > 3 * stall, f"{took:.1f} s: not long enough to be probed several times"
    assert len(results) == 2
    assert metric(gateway, "comeapi_backend_retries_total") == 0
    assert backend_status(gateway, backend.url)["healthy"] is True
