"""The gateway's forwards done with callbacks, through its real HTTP server on a loopback
port, to a scripted backend over a real socket: once a backend has an idle connection, a
whole answer no longer goes through ``Forwarder.forward`` (the coroutine path), and the
answer, the request log, the metrics, ``X-Cache: MISS`` and a client leaving are as there."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.balancer.pool import BackendPool
from comeapi.balancer.proxy import Forwarder
from comeapi.gateway.app import Gateway, create_app
from comeapi.gateway.server import build_cache, gateway_server
from comeapi.settings import Settings
from tests.balancer.fakes import eventually
from tests.balancer.scripted import Backend, answer_of
from tests.helpers import free_port

pytestmark = pytest.mark.anyio

BYPASS = {"content-type": "application/json", "cache-control": "no-cache"}
BODY = b'{"prompt": "hi", "max_tokens": 1}'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Env:
    url: str
    backend: Backend
    gateway: Gateway
    coroutine_forwards: list[str]


@contextlib.asynccontextmanager
async def running(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    backend = Backend("a")
    listener = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    backend.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    settings = Settings(
        port=free_port(),
        backends=[backend.url],
        store=f"sqlite:{tmp / 'store.db'}",
        health_interval=30.0,
        log_level="warning",
    )
    calls: list[str] = []
    coroutine_path = Forwarder.forward

    async def forward(self: Forwarder, path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(path)
        return await coroutine_path(self, path, *args, **kwargs)

    monkeypatch.setattr(Forwarder, "forward", forward)
    pool = BackendPool.from_settings(settings)
    app = create_app(settings, pool, build_cache(settings))
    server = gateway_server(settings, app)
    serving = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{settings.port}"
    try:
        await eventually(lambda: server.started and pool.backends[0].healthy)
        yield Env(url, backend, app.state.gateway, calls)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        listener.close()


async def test_whole_answers_go_direct_once_a_connection_is_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, monkeypatch) as env, httpx.AsyncClient(timeout=5) as client:
        for _ in range(5):
            response = await client.post(env.url + "/generate", content=BODY, headers=BYPASS)
            assert response.status_code == 200
            assert response.content == answer_of("a")
        assert env.coroutine_forwards == ["/generate"]  # the first only: it connected
        assert env.backend.connections == 1 and env.backend.generations == 5
        records = list(env.gateway.requests.latest(5))
        assert [r["status"] for r in records] == [200] * 5
        assert {r["backend"] for r in records} == {env.backend.url}
        assert {r["completion_tokens"] for r in records} == {1}
        metrics = (await client.get(env.url + "/metrics")).text
        assert "comeapi_tokens_generated_total 5.0" in metrics
        assert 'comeapi_requests_total{route="/generate",status="200"} 5.0' in metrics
        status = (await client.get(env.url + "/status")).json()
        assert status["in_flight"] == 0


async def test_a_cache_miss_goes_direct_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, monkeypatch) as env, httpx.AsyncClient(timeout=5) as client:
        headers = {"content-type": "application/json"}
        body = json.dumps({"prompt": "a prompt nobody stored", "max_tokens": 1})
        for _ in range(2):
            response = await client.post(env.url + "/generate", content=body, headers=headers)
            assert response.status_code == 200 and response.headers["x-cache"] == "MISS"
        assert env.coroutine_forwards == ["/generate"]
        assert [r["cache"] for r in env.gateway.requests.latest(2)] == ["MISS", "MISS"]
        cache = env.gateway.cache
        assert cache is not None and cache.misses == 2


async def test_a_client_leaving_mid_forward_frees_the_slot_and_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(tmp_path, monkeypatch) as env, httpx.AsyncClient(timeout=5) as client:
        await client.post(env.url + "/generate", content=BODY, headers=BYPASS)  # connects
        env.backend.script = ["hang"]
        host, port = env.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        head = "POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        head += f"cache-control: no-cache\r\ncontent-length: {len(BODY)}\r\n\r\n"
        writer.write(head.encode() + BODY)
        await eventually(lambda: env.backend.generations == 2)
        writer.close()
        await asyncio.wait_for(env.backend.closed_by_client.wait(), 5)
        pool = env.gateway.pool
        await eventually(lambda: pool.backends[0].in_flight == 0)
        await eventually(lambda: next(env.gateway.requests.latest(1))["status"] == 499)
        assert env.coroutine_forwards == ["/generate"]
        # The backend is still fine, and answers the next request.
        response = await client.post(env.url + "/generate", content=BODY, headers=BYPASS)
        assert response.status_code == 200 and pool.backends[0].healthy
