"""The gateway in front of real ``comeapi backend`` processes running the bundled model:
failover under a SIGKILL, all backends down, recovery, streaming and disconnects."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from comeapi.cache.prompts import load_prompt_set
from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

Spawn = Callable[..., Proc]


@dataclass
class Node:
    url: str
    port: int
    proc: Proc


def start_backend(spawn: Spawn, model_dir: Path, port: int | None = None) -> Node:
    port = port or free_port()
    argv = comeapi_argv(
        "backend",
        "--model-dir", str(model_dir),
        "--port", str(port),
        "--threads", "1",
        "--ctx", "256",
    )  # fmt: skip
    return Node(f"http://127.0.0.1:{port}", port, spawn(argv, name=f"backend-{port}"))


def start_gateway(spawn: Spawn, backends: list[Node], *extra: str) -> Node:
    port = free_port()
    argv = comeapi_argv(
        "serve",
        "--port", str(port),
        *(arg for b in backends for arg in ("--backend", b.url)),
        "--health-interval", "0.5",
        "--health-timeout", "2",
        *extra,
    )  # fmt: skip
    return Node(f"http://127.0.0.1:{port}", port, spawn(argv, name="gateway"))


def wait_healthy(gateway: Node, count: int, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = httpx.get(gateway.url + "/status", timeout=2).json()
        except httpx.HTTPError:
            status = {}
        if status.get("healthy_backends") == count:
            return status
        if gateway.proc.popen.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"not {count} healthy backends: {status}\n{gateway.proc.log()[-3000:]}")


def metric(gateway: Node, prefix: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    ]
    return sum(values)


@dataclass
class Pair:
    backend: Node
    gateway: Node


@pytest.fixture(scope="module")
def pair(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """One backend and a gateway in front of it, shared by the read-only tests below."""
    procs: list[Proc] = []
    logs = tmp_path_factory.mktemp("pair")

    def spawn(argv: list[str], name: str = "proc") -> Proc:
        procs.append(Proc(argv, logs / f"{name}.log"))
        return procs[-1]

    try:
        backend = start_backend(spawn, model_dir)
        gateway = start_gateway(spawn, [backend])
        wait_healthy(gateway, 1)
        yield Pair(backend, gateway)
    finally:
        for proc in reversed(procs):
            proc.stop()


def sse_texts(response: httpx.Response, field: str) -> list[str]:
    texts = []
    for block in response.text.split("\n\n"):
        if not block.startswith("data: {"):
            continue
        event = json.loads(block[6:])
        if field == "response":
            texts.append(event.get("response", ""))
        else:
            texts.extend(choice.get("text", "") for choice in event["choices"])
    return texts


def test_streaming_through_the_gateway_gives_the_same_tokens_as_direct(pair: Pair) -> None:
    body = {
        "prompt": "The capital of France is",
        "max_tokens": 6,
        "temperature": 0,
        "seed": 42,
        "stream": True,
    }
    for path, field in (("/v1/completions", "text"), ("/generate", "response")):
        direct = httpx.post(pair.backend.url + path, json=body, timeout=60)
        proxied = httpx.post(
            pair.gateway.url + path, json=body, timeout=60, headers={"Cache-Control": "no-cache"}
        )
        assert direct.status_code == proxied.status_code == 200
        assert proxied.headers["content-type"].startswith("text/event-stream")
        assert sse_texts(proxied, field) == sse_texts(direct, field)
        assert len(sse_texts(proxied, field)) >= 2
        assert proxied.text.endswith("data: [DONE]\n\n")


def test_the_openai_client_works_through_the_gateway(pair: Pair) -> None:
    client = openai.OpenAI(base_url=pair.gateway.url + "/v1", api_key="unused", timeout=60)
    models = [m.id for m in client.models.list()]
    # The backend's model and the model of the shipped answers the default store holds.
    assert sorted(models) == sorted({BUNDLED_MODEL, load_prompt_set().model})
    chat = client.chat.completions.create(
        model=BUNDLED_MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=3,
        temperature=0,
    )
    assert chat.choices[0].finish_reason in {"length", "stop"}
    stream = client.completions.create(
        model=BUNDLED_MODEL, prompt="One, two,", max_tokens=3, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def test_a_client_leaving_a_stream_stops_the_backend(pair: Pair) -> None:
    before = pair.backend.proc.log().count("client gone")
    body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0, "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", pair.gateway.url + "/generate", json=body) as response,
    ):
        chunks = response.iter_bytes()
        next(chunks)
        next(chunks)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        health = httpx.get(pair.backend.url + "/health", timeout=5).json()
        if health["in_flight"] == 0 and pair.backend.proc.log().count("client gone") > before:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"backend still generating:\n{pair.backend.proc.log()[-2000:]}")
    log = pair.backend.proc.log()
    assert int(log.split("generation stopped after ")[-1].split()[0]) < 200
    status = httpx.get(pair.gateway.url + "/status", timeout=5).json()
    assert status["in_flight"] == 0


def test_a_client_leaving_a_whole_answer_stops_the_backend(pair: Pair) -> None:
    before = pair.backend.proc.log().count("client gone")
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0})
    request = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with socket.create_connection(("127.0.0.1", pair.gateway.port), timeout=10) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 10
        while httpx.get(pair.backend.url + "/health", timeout=5).json()["in_flight"] == 0:
            assert time.monotonic() < deadline, "the backend never started generating"
            time.sleep(0.02)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        health = httpx.get(pair.backend.url + "/health", timeout=5).json()
        if health["in_flight"] == 0 and pair.backend.proc.log().count("client gone") > before:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"backend still generating:\n{pair.backend.proc.log()[-2000:]}")
    log = pair.backend.proc.log()
    assert int(log.split("generation stopped after ")[-1].split()[0]) < 200
    status = httpx.get(pair.gateway.url + "/status", timeout=5).json()
    assert status["in_flight"] == 0
    assert metric(pair.gateway, 'comeapi_requests_total{route="/generate",status="499"') >= 1


def test_real_generations_show_in_the_metrics(pair: Pair) -> None:
    before = metric(pair.gateway, "comeapi_tokens_generated_total")
    response = httpx.post(
        pair.gateway.url + "/generate",
        json={"prompt": "Hello", "max_tokens": 3, "temperature": 0},
        timeout=60,
    )
    assert response.status_code == 200
    tokens = response.json()["usage"]["completion_tokens"]
    assert metric(pair.gateway, "comeapi_tokens_generated_total") == before + tokens
    assert metric(pair.gateway, 'comeapi_backend_healthy{backend="' + pair.backend.url) == 1.0


def test_a_malformed_request_is_stopped_at_the_gateway(pair: Pair) -> None:
    before = httpx.get(pair.backend.url + "/status", timeout=5).json()
    served_before = httpx.get(pair.gateway.url + "/status", timeout=5).json()["backends"][0]
    response = httpx.post(
        pair.gateway.url + "/generate", json={"prompt": "hi", "max_tokens": -1}, timeout=10
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"
    after = httpx.get(pair.gateway.url + "/status", timeout=5).json()["backends"][0]
    assert after["served"] == served_before["served"]
    assert httpx.get(pair.backend.url + "/status", timeout=5).json() == before


async def _fire(
    url: str, count: int, concurrency: int, on_done: Callable[[int], None]
) -> list[int]:
    gate = asyncio.Semaphore(concurrency)
    statuses: list[int] = []
    body = {"prompt": "Count: one, two,", "max_tokens": 6, "temperature": 0.7}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one() -> None:
            async with gate:
                try:
                    response = await client.post("/generate", json=body)
                    statuses.append(response.status_code)
                except httpx.HTTPError as exc:
                    statuses.append(-1)
                    raise AssertionError(f"request failed: {exc!r}") from exc
                on_done(len(statuses))

        await asyncio.gather(*(one() for _ in range(count)))
    return statuses


def test_sigkill_of_one_of_three_backends_fails_no_request(spawn: Spawn, model_dir: Path) -> None:
    backends = [start_backend(spawn, model_dir) for _ in range(3)]
    gateway = start_gateway(spawn, backends)
    wait_healthy(gateway, 3)
    victim = backends[1]
    killed_at: list[int] = []

    def on_done(done: int) -> None:
        if done == 8 and not killed_at:
            os.kill(victim.proc.pid, signal.SIGKILL)
            killed_at.append(done)

    statuses = asyncio.run(_fire(gateway.url, 50, 8, on_done))
    assert killed_at, "the backend was never killed"
    assert statuses.count(200) == 50, statuses
    status = httpx.get(gateway.url + "/status", timeout=5).json()
    by_url = {b["url"]: b for b in status["backends"]}
    assert by_url[victim.url]["healthy"] is False
    assert by_url[victim.url]["failures"] >= 1
    assert sum(b["served"] for b in status["backends"]) == 50
    # The victim was busy when it died (8 at a time on 3 slots): that request moved on.
    assert metric(gateway, "comeapi_backend_retries_total") >= 1


def test_all_down_is_a_fast_503_and_a_restarted_backend_is_used_again(
    spawn: Spawn, model_dir: Path
) -> None:
    backend = start_backend(spawn, model_dir)
    gateway = start_gateway(spawn, [backend])
    wait_healthy(gateway, 1)
    body = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
    assert httpx.post(gateway.url + "/generate", json=body, timeout=60).status_code == 200

    backend.proc.stop()
    elapsed = []
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        client.get("/health")  # connection to the gateway is open: time only the request
        for _ in range(5):
            started = time.perf_counter()
            response = client.post("/generate", json=body)
            elapsed.append(time.perf_counter() - started)
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "no_backend_available"
    # Decided at once, not after a wait: the median is the figure (a shared CI machine may
    # deschedule the gateway for one request), and none comes near a timeout.
    assert statistics.median(elapsed) <= 0.1, elapsed
    assert max(elapsed) < 1.0, elapsed

    restarted = start_backend(spawn, model_dir, port=backend.port)
    wait_healthy(gateway, 1, timeout=60)
    response = httpx.post(gateway.url + "/generate", json=body, timeout=60)
    assert response.status_code == 200
    assert restarted.proc.popen.poll() is None
    assert gateway.proc.popen.poll() is None  # the same gateway process all along


def test_shutdown_lets_in_flight_requests_finish_then_cancels_the_rest(
    spawn: Spawn, model_dir: Path
) -> None:
    backend = start_backend(spawn, model_dir)
    outcomes: dict[str, Any] = {}

    def generate(gateway: Node, max_tokens: int) -> threading.Thread:
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 1.0}

        def run() -> None:
            try:
                outcomes[gateway.url] = httpx.post(
                    gateway.url + "/generate", json=body, timeout=120
                )
            except httpx.HTTPError as exc:
                outcomes[gateway.url] = exc

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 30
        while httpx.get(gateway.url + "/status", timeout=5).json()["in_flight"] == 0:
            assert time.monotonic() < deadline, f"never in flight: {outcomes}"
            time.sleep(0.02)
        return worker

    # Within the grace period: the answer arrives, then the gateway exits cleanly.
    patient = start_gateway(spawn, [backend], "--shutdown-timeout", "60")
    wait_healthy(patient, 1)
    worker = generate(patient, 24)
    os.kill(patient.proc.pid, signal.SIGTERM)
    worker.join(120)
    response = outcomes[patient.url]
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 24
    assert patient.proc.popen.wait(30) == 0
    assert "Waiting for connections to close" in patient.proc.log()

    # Past the grace period: the request is cancelled (503), the backend stops generating.
    hasty = start_gateway(spawn, [backend], "--shutdown-timeout", "1")
    wait_healthy(hasty, 1)
    worker = generate(hasty, 200)
    os.kill(hasty.proc.pid, signal.SIGTERM)
    assert hasty.proc.popen.wait(30) == 0
    worker.join(30)
    response = outcomes[hasty.url]
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "shutting_down"
    assert "retry-after" in response.headers
    assert "timeout graceful shutdown exceeded" in hasty.proc.log()
    deadline = time.monotonic() + 10
    while httpx.get(backend.url + "/health", timeout=5).json()["in_flight"]:
        assert time.monotonic() < deadline, "the backend kept generating for a gone gateway"
        time.sleep(0.05)
    log = backend.proc.log()
    assert int(log.split("generation stopped after ")[-1].split()[0]) < 200
