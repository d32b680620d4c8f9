"""Forward one generation request to a backend of the pool, failing over while it is safe.

A request may be retried on another backend as long as nothing has been sent to the client:
for a plain answer that is until the whole body has arrived, for a stream until its first
chunk has. After that a failure ends the stream with an SSE error event. Streams pass
through chunk by chunk; a client that disconnects closes the upstream response, so the
backend stops generating.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Protocol

import httpx
import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from comeapi.balancer.backend import Backend
from comeapi.balancer.health import HealthChecker, describe
from comeapi.balancer.pool import BackendPool
from comeapi.errors import UnavailableError, UpstreamError
from comeapi.protocol.responses import sse_error

# Request headers worth passing on; everything else (host, cookies, hop-by-hop) stays here.
FORWARD_REQUEST_HEADERS = ("content-type", "authorization", "accept")
# Response headers the gateway sets itself (or that describe the upstream connection).
DROP_RESPONSE_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
)


class ProxyObserver(Protocol):
    """What the proxy reports for metrics."""

    def retried(self, backend: Backend, reason: str) -> None: ...

    def tokens(self, count: int) -> None: ...


class Forwarder:
    """Sends requests to the pool's backends through one shared httpx transport.

    Requests go straight to ``transport.handle_async_request``: httpx.AsyncClient's extras
    (cookies, redirects, auth, URL merging) cost more CPU per request than the whole
    forwarding path may add, and a proxy needs none of them.
    """

    def __init__(
        self,
        pool: BackendPool,
        health: HealthChecker,
        transport: httpx.AsyncBaseTransport,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 600.0,
        observer: ProxyObserver | None = None,
    ):
        self.pool = pool
        self.health = health
        self.transport = transport
        self.observer = observer
        #: Set when the server's grace period begins: requests it then cancels get a 503
        #: (or an SSE error event) instead of a dropped connection.
        self.stopping = False
        self._extensions = {
            "timeout": {
                "connect": connect_timeout,
                "read": read_timeout,
                "write": read_timeout,
                "pool": None,
            }
        }
        self._urls: dict[tuple[str, str], httpx.URL] = {}

    async def forward(
        self,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        *,
        model: str | None,
        stream: bool,
        receive: Receive,
    ) -> Response:
        """The backend's answer to ``raw`` POSTed at ``path``, as an ASGI response."""
        try:
            async with DisconnectGuard(receive) as guard:
                return await self._open(path, raw, headers, model, stream)
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            _uncancel()
            raise _shutting_down() from None
        assert guard.disconnected
        return Response(status_code=499)  # nobody is listening any more

    async def _open(
        self, path: str, raw: bytes, headers: dict[str, str], model: str | None, stream: bool
    ) -> Response:
        tried = _Attempts()
        while True:
            backend = await self._acquire(model, tried)
            upstream: httpx.Response | None = None
            try:
                upstream = await self.transport.handle_async_request(
                    self._request(backend, path, raw, headers)
                )
                chunks = _raw_chunks(upstream)
                if stream and upstream.status_code == 200:
                    first = await anext(chunks, b"")
                    return UpstreamStream(self, backend, upstream, chunks, first)
                body = b"".join([chunk async for chunk in chunks])
            except httpx.TransportError as exc:
                if upstream is not None:
                    await _close_quietly(upstream)
                self._failed(backend, exc, tried)
                continue
            except BaseException:
                if upstream is not None:
                    await _close_quietly(upstream)
                self.pool.release(backend, served=False)
                raise
            if upstream.status_code == 503:
                self._refused(backend, body, tried)
                continue
            self.pool.release(backend)
            if self.observer is not None and upstream.status_code == 200:
                self.observer.tokens(_usage_tokens(body))
            return Response(body, upstream.status_code, _response_headers(upstream))

    def _request(
        self, backend: Backend, path: str, raw: bytes, headers: dict[str, str]
    ) -> httpx.Request:
        url = self._urls.get((backend.url, path))
        if url is None:
            url = self._urls[backend.url, path] = httpx.URL(backend.url + path)
        # Bodies are relayed byte for byte: they must arrive as the backend sent them.
        headers = {**headers, "accept-encoding": "identity"}
        return httpx.Request("POST", url, headers=headers, content=raw, extensions=self._extensions)

    async def _acquire(self, model: str | None, tried: _Attempts) -> Backend:
        try:
            return await self.pool.acquire(model, tried.backends)
        except UnavailableError as exc:
            if tried.last and type(exc) is UnavailableError:
                raise UnavailableError(
                    f"{exc.message}; last failure: {tried.last}", retry_after=exc.retry_after
                ) from None
            raise

    def _failed(self, backend: Backend, exc: httpx.TransportError, tried: _Attempts) -> None:
        """Nothing was sent to the client yet: mark the backend down and try another."""
        self.pool.release(backend, served=False)
        self.health.report_failure(backend, exc)
        tried.add(backend, describe(exc))
        if self.observer is not None:
            self.observer.retried(backend, describe(exc))

    def _refused(self, backend: Backend, body: bytes, tried: _Attempts) -> None:
        """The backend answered 503 (its own queue is full, or its model is loading): nothing
        was generated, so another backend may take the request."""
        self.pool.release(backend, served=False)
        code = _error_code(body) or "unavailable"
        if code != "queue_full":
            self.health.report_unready(backend, code)
        tried.add(backend, f"answered 503 ({code})")
        if self.observer is not None:
            self.observer.retried(backend, code)


class _Attempts:
    """The backends one request has tried, and why the last one failed."""

    __slots__ = ("backends", "last")

    def __init__(self) -> None:
        self.backends: list[Backend] = []
        self.last: str | None = None

    def add(self, backend: Backend, reason: str) -> None:
        self.backends.append(backend)
        self.last = f"{backend.url}: {reason}"


class UpstreamStream(Response):
    """An ASGI response relaying a backend's SSE stream; owns the backend's slot until done."""

    def __init__(
        self,
        forwarder: Forwarder,
        backend: Backend,
        upstream: httpx.Response,
        chunks: AsyncIterator[bytes],
        first: bytes,
    ):
        self.forwarder = forwarder
        self.backend = backend
        self.upstream = upstream
        self.chunks = chunks
        self.first = first
        self.status_code = upstream.status_code
        self.background = None
        self.raw_headers = _raw_headers(upstream)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        events = _EventCounter()
        try:
            async with DisconnectGuard(receive):
                await send(
                    {
                        "type": "http.response.start",
                        "status": self.status_code,
                        "headers": self.raw_headers,
                    }
                )
                chunk = self.first
                try:
                    while chunk:
                        events.feed(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        chunk = await anext(self.chunks, b"")
                except httpx.TransportError as exc:
                    # Too late to retry: the client has part of the answer. Say so in-band.
                    self.forwarder.health.report_failure(self.backend, exc)
                    error = UpstreamError(f"the backend failed mid-stream: {describe(exc)}")
                    await send({"type": "http.response.body", "body": sse_error(error)})
                    return
                except asyncio.CancelledError:
                    if not self.forwarder.stopping:
                        raise
                    _uncancel()
                    closing = sse_error(_shutting_down())
                    await send({"type": "http.response.body", "body": closing})
                    return
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                completed = True
        finally:
            await _close_quietly(self.upstream)
            self.forwarder.pool.release(self.backend, served=completed)
            observer = self.forwarder.observer
            if observer is not None:
                observer.tokens(events.tokens())


class DisconnectGuard:
    """Cancel the enclosed work when the client disconnects, and swallow that cancellation.

    After the request body has been read, the next ``receive()`` returns only when the
    client goes away (or the response is complete), so one small task can wait for it.
    """

    def __init__(self, receive: Receive):
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    async def __aenter__(self) -> DisconnectGuard:
        self._task = asyncio.current_task()
        self._watcher = asyncio.create_task(self._watch())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._watcher is not None and self._task is not None
        watcher, self._watcher = self._watcher, None
        watcher.cancel()
        if self.disconnected and exc_type is asyncio.CancelledError:
            self._task.uncancel()
            return True
        return False

    async def _watch(self) -> None:
        message: Message = await self._receive()
        while message["type"] != "http.disconnect":
            message = await self._receive()
        if self._watcher is not None and self._task is not None:
            self.disconnected = True
            self._task.cancel()


class _EventCounter:
    """Tokens in a relayed stream: the usage the backend reports at the end, else one per
    text event (SSE events carry one decoded piece of text each)."""

    __slots__ = ("events", "usage")

    def __init__(self) -> None:
        self.events = 0
        self.usage: int | None = None

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(b"data: {")
        if b'"usage"' in chunk:
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage"' in line:
                    count = _usage_tokens(line[6:])
                    if count:
                        self.usage = count

    def tokens(self) -> int:
        if self.usage is not None:
            return self.usage
        return max(0, self.events - 1)  # the last event carries the finish reason, no text


def _shutting_down() -> UnavailableError:
    return UnavailableError(
        "the gateway is shutting down; retry shortly", retry_after=5, code="shutting_down"
    )


def _uncancel() -> None:
    """We handle this cancellation (by answering), so it must not linger on the task."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as sent, chunk by chunk as it arrives."""
    if response.is_stream_consumed:  # built in memory (httpx.MockTransport handlers)
        return _once(response.content)
    return response.aiter_raw()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _usage_tokens(body: bytes) -> int:
    try:
        usage = orjson.loads(body).get("usage") or {}
        count = usage.get("completion_tokens", 0)
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return count if isinstance(count, int) else 0


def _error_code(body: bytes) -> str | None:
    """``error.code`` of an OpenAI-shaped error body, if it is one."""
    try:
        code = orjson.loads(body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _response_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in DROP_RESPONSE_HEADERS}


def _raw_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower(), v)
        for k, v in response.headers.raw
        if k.lower().decode("latin-1") not in DROP_RESPONSE_HEADERS
    ]


def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers worth passing to the backend."""
    return {name: headers[name] for name in FORWARD_REQUEST_HEADERS if name in headers}


async def _close_quietly(response: httpx.Response) -> None:
    # Shielded: this runs while a disconnect is cancelling us, and an unclosed upstream
    # response would keep the backend generating for nobody.
    close = asyncio.ensure_future(response.aclose())
    try:
        await asyncio.shield(close)
    except asyncio.CancelledError:
        await close
        raise
    except httpx.HTTPError:
        pass
