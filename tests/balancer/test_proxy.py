"""Forwarder: failover before the first byte, streams relayed as they come, and a client
disconnect closing the upstream response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from starlette.types import Message

from comeapi.balancer.health import HealthChecker
from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder
from comeapi.balancer.relay import UpstreamStream
from comeapi.errors import UnavailableError
from tests.balancer.fakes import FakeCluster, eventually

pytestmark = pytest.mark.anyio

STREAM_BODY = b'{"prompt": "hi", "max_tokens": 3, "stream": true}'
PLAIN_BODY = b'{"prompt": "hi", "max_tokens": 3}'


@dataclass
class Env:
    fakes: FakeCluster
    pool: BackendPool
    forwarder: Forwarder


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    fakes = FakeCluster(2)
    pool = BackendPool(fakes.urls)
    transport = fakes.transport()
    async with httpx.AsyncClient(transport=transport) as client:
        health = HealthChecker(pool, client, interval=30.0, timeout=1.0)
        await health.start()
        yield Env(fakes, pool, Forwarder(pool, health, fakes.upstream()))
        await health.stop()


class Client:
    """The ASGI side of one client: ``receive`` blocks until ``disconnect()``."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.gone = asyncio.Event()
        self.got_body = asyncio.Event()

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            self.got_body.set()

    def disconnect(self) -> None:
        self.gone.set()

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def forward(env: Env, client: Client, body: bytes, *, stream: bool) -> object:
    return await env.forwarder.forward(
        "/generate", body, {}, model=None, stream=stream, receive=client.receive
    )


async def test_a_stream_is_relayed_chunk_by_chunk(env: Env) -> None:
    client = Client()
    response = await forward(env, client, STREAM_BODY, stream=True)
    assert isinstance(response, UpstreamStream)
    await response({"type": "http"}, client.receive, client.send)
    bodies = [m["body"] for m in client.sent if m["type"] == "http.response.body"]
    assert bodies[:2] == [b'data: {"response": "Hel"}\n\n', b'data: {"response": "lo"}\n\n']
    assert bodies[-1] == b""
    assert client.sent[0]["status"] == 200
    assert sum(b.in_flight for b in env.pool.backends) == 0
    assert env.pool.backends[0].served == 1


async def test_a_failure_before_the_first_chunk_moves_to_another_backend(env: Env) -> None:
    env.fakes.backends[0].fail_after = 0
    client = Client()
    response = await forward(env, client, STREAM_BODY, stream=True)
    await response({"type": "http"}, client.receive, client.send)  # type: ignore[operator]
    assert client.body().endswith(b"data: [DONE]\n\n")
    assert b"error" not in client.body()
    assert not env.pool.backends[0].healthy
    assert env.fakes.backends[1].generations == 1


async def test_a_failure_mid_stream_ends_it_with_an_error_event(env: Env) -> None:
    env.fakes.backends[0].fail_after = 1
    client = Client()
    response = await forward(env, client, STREAM_BODY, stream=True)
    await response({"type": "http"}, client.receive, client.send)  # type: ignore[operator]
    body = client.body()
    assert body.startswith(b'data: {"response": "Hel"}\n\n')
    assert b'"code":"backend_failed"' in body
    assert body.endswith(b"data: [DONE]\n\n")
    assert client.sent[-1].get("more_body", False) is False
    assert env.fakes.backends[1].generations == 0  # too late to retry: the client had a byte
    assert not env.pool.backends[0].healthy
    assert env.pool.backends[0].in_flight == 0


async def test_a_client_leaving_mid_stream_closes_the_upstream(env: Env) -> None:
    fake = env.fakes.backends[0]
    fake.hold = asyncio.Event()  # the backend keeps "generating" until closed
    client = Client()
    response = await forward(env, client, STREAM_BODY, stream=True)
    relay = asyncio.create_task(response({"type": "http"}, client.receive, client.send))  # type: ignore[operator]
    await asyncio.wait_for(client.got_body.wait(), 5)
    assert not fake.stream_closed.is_set()
    client.disconnect()
    await asyncio.wait_for(relay, 5)
    assert fake.stream_closed.is_set()
    assert env.pool.backends[0].in_flight == 0
    assert env.pool.backends[0].served == 0


async def test_a_client_leaving_while_waiting_for_an_answer_frees_the_slot(env: Env) -> None:
    for fake in env.fakes.backends:
        fake.gate = asyncio.Event()
    client = Client()
    pending = asyncio.create_task(forward(env, client, PLAIN_BODY, stream=False))
    await eventually(lambda: env.fakes.total_generations() == 1)
    client.disconnect()
    response = await asyncio.wait_for(pending, 5)
    assert response.status_code == 499  # type: ignore[attr-defined]
    assert sum(b.in_flight for b in env.pool.backends) == 0


async def test_a_client_leaving_the_queue_frees_its_place(env: Env) -> None:
    for fake in env.fakes.backends:
        fake.gate = asyncio.Event()
    busy = [Client() for _ in range(2)]
    running = [asyncio.create_task(forward(env, c, PLAIN_BODY, stream=False)) for c in busy]
    await eventually(lambda: env.fakes.total_generations() == 2)
    waiting = Client()
    queued = asyncio.create_task(forward(env, waiting, PLAIN_BODY, stream=False))
    await eventually(lambda: env.pool.queue_depth == 1)
    waiting.disconnect()
    response = await asyncio.wait_for(queued, 5)
    assert response.status_code == 499  # type: ignore[attr-defined]
    assert env.pool.queue_depth == 0
    for fake in env.fakes.backends:
        assert fake.gate is not None
        fake.gate.set()
    for task in running:
        assert (await task).status_code == 200  # type: ignore[attr-defined]
    assert env.fakes.total_generations() == 2  # the one that left never reached a backend
    assert sum(b.in_flight for b in env.pool.backends) == 0


async def test_cancelled_by_shutdown_a_waiting_request_gets_503(env: Env) -> None:
    for fake in env.fakes.backends:
        fake.gate = asyncio.Event()
    client = Client()
    pending = asyncio.create_task(forward(env, client, PLAIN_BODY, stream=False))
    await eventually(lambda: env.fakes.total_generations() == 1)
    env.forwarder.stopping = True  # the server's grace period began
    pending.cancel()
    with pytest.raises(UnavailableError) as caught:
        await pending
    assert caught.value.code == "shutting_down"
    assert sum(b.in_flight for b in env.pool.backends) == 0


async def test_cancelled_by_shutdown_a_stream_ends_with_an_error_event(env: Env) -> None:
    fake = env.fakes.backends[0]
    fake.hold = asyncio.Event()
    client = Client()
    response = await forward(env, client, STREAM_BODY, stream=True)
    relay = asyncio.create_task(response({"type": "http"}, client.receive, client.send))  # type: ignore[operator]
    await asyncio.wait_for(client.got_body.wait(), 5)
    env.forwarder.stopping = True
    relay.cancel()
    await relay  # handled: no CancelledError escapes
    assert b'"code":"shutting_down"' in client.body()
    assert client.body().endswith(b"data: [DONE]\n\n")
    assert fake.stream_closed.is_set()
    assert env.pool.backends[0].in_flight == 0
