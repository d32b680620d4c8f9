"""Stand-in backends for unit tests of the routing logic, served through httpx.MockTransport.

Each fake answers /health, /models, /v1/models and the generation routes like
``comeapi backend`` does, counts what reached it, and can be stopped, made slow (a gate the
test opens) or made to fail.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from comeapi.balancer.upstream import HttpxUpstream, Timeouts
from comeapi.protocol.requests import KINDS

TIMEOUTS = Timeouts(connect=2.0, read=600.0, write=600.0, pool=2.0)
GENERATION_PATHS = tuple(KINDS)


async def eventually(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``predicate`` (state changed by other tasks) until true; fail after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class FakeBackend:
    def __init__(self, url: str, *, capacity: int = 1, models: tuple[str, ...] = ("m.gguf",)):
        self.url = url
        self.capacity = capacity
        self.models = models
        self.up = True
        self.loading = False
        self.health_delay = 0.0
        self.gate: asyncio.Event | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.generations = 0
        self.health_checks = 0
        self.bodies: list[dict[str, Any]] = []
        self.stream_closed = asyncio.Event()
        self.fail_after: int | None = None
        self.hold: asyncio.Event | None = None
        self.authorizations: list[tuple[str, str | None]] = []  # (path, Authorization)
        self._awake = asyncio.Event()
        self._awake.set()
        #: Hang after this many stream events (the stream then says nothing more).
        self.hang_after: int | None = None
        self.generate_delay = 0.0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        await self.unless_hung()
        path = request.url.path
        self.authorizations.append((path, request.headers.get("authorization")))
        if path == "/health":
            return await self._health()
        if path == "/models":
            return httpx.Response(
                200, json={"models": [{"name": m, "size_mb": 1.5} for m in self.models]}
            )
        if path == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 1, "owned_by": "comeapi"}
                for m in self.models
            ]
            return httpx.Response(200, json={"object": "list", "data": data})
        if path in GENERATION_PATHS:
            return await self._generate(request)
        return httpx.Response(404, json={"error": {"message": "no route", "code": "not_found"}})

    @property
    def hung(self) -> bool:
        """Hung (as if SIGSTOPped): nothing it is asked answers, /health included."""
        return not self._awake.is_set()

    @hung.setter
    def hung(self, value: bool) -> None:
        if value:
            self._awake.clear()
        else:
            self._awake.set()

    async def unless_hung(self) -> None:
        await self._awake.wait()

    async def _health(self) -> httpx.Response:
        self.health_checks += 1
        if self.health_delay:
            await asyncio.sleep(self.health_delay)
        body = {
            "status": "loading" if self.loading else "ok",
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "available": self.capacity - self.in_flight,
            "models": list(self.models),
            "loaded_models": list(self.models[:1]),
        }
        return httpx.Response(503 if self.loading else 200, json=body)

    async def _generate(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        self.generations += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.generate_delay:
                await asyncio.sleep(self.generate_delay)
            if body.get("prompt") == "reject me":
                return httpx.Response(
                    400,
                    json={
                        "error": {
                            "message": "bad prompt",
                            "type": "invalid_request_error",
                            "param": "prompt",
                            "code": "invalid_value",
                        }
                    },
                )
        finally:
            if not body.get("stream"):
                self.in_flight -= 1
        if body.get("stream"):
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                stream=self._events(["Hel", "lo"]),
            )
        return httpx.Response(
            200,
            json={
                "response": f"from {self.url}",
                "model": self.models[0],
                "finish_reason": "length",
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            },
        )

    def _events(self, pieces: list[str]) -> FakeStream:
        return FakeStream(self, pieces)


class FakeStream(httpx.AsyncByteStream):
    """SSE events of a generate stream. ``fail_after`` raises a read error after that many
    text events (the backend died mid-stream); ``hold`` waits before the closing event."""

    def __init__(self, backend: FakeBackend, pieces: list[str]):
        self.backend = backend
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        backend = self.backend
        for index, piece in enumerate(self.pieces):
            if backend.fail_after == index:
                raise httpx.ReadError("connection reset by peer")
            if backend.hang_after == index:
                backend.hung = True
            await backend.unless_hung()
            yield b"data: " + json.dumps({"response": piece}).encode() + b"\n\n"
            await asyncio.sleep(0)
        if backend.hold is not None:
            await backend.hold.wait()
        yield b'data: {"response": "", "done": true}\n\ndata: [DONE]\n\n'

    async def aclose(self) -> None:
        if not self.backend.stream_closed.is_set():
            self.backend.in_flight -= 1
            self.backend.stream_closed.set()


class FakeCluster:
    """Fakes at http://backend-0:8000, http://backend-1:8000, ..."""

    def __init__(self, count: int, **kwargs: Any):
        self.backends = [FakeBackend(f"http://backend-{i}:8000", **kwargs) for i in range(count)]
        self._by_host = {f"backend-{i}": b for i, b in enumerate(self.backends)}

    @property
    def urls(self) -> list[str]:
        return [b.url for b in self.backends]

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def upstream(self) -> HttpxUpstream:
        """The forwarder's client, reaching these fakes."""
        return HttpxUpstream(self.transport(), TIMEOUTS)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        return await self._by_host[request.url.host].handle(request)

    def total_generations(self) -> int:
        return sum(b.generations for b in self.backends)
