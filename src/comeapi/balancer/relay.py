"""Relaying a backend's answer to the client: a whole answer (``Forwarded``), the SSE stream
response, and the headers, token counts and errors that go with them.

The stream reports back through ``StreamOwner`` (the forwarder implements it), so this
module needs nothing from ``proxy.py``, which imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Protocol

import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from comeapi.balancer.backend import Backend
from comeapi.balancer.health import describe
from comeapi.balancer.stall import StallGuard
from comeapi.balancer.upstream import UpstreamResponse
from comeapi.errors import UnavailableError, UpstreamError
from comeapi.http.disconnect import DisconnectGuard
from comeapi.protocol.requests import KINDS, Kind
from comeapi.protocol.responses import Answer, read_answer, sse_error


class ForwardReport(Protocol):
    """Told the backend a forwarded request went to (the gateway's request log)."""

    backend: str | None


class Attempts:
    """The backends one request has tried, and why the last one failed."""

    __slots__ = ("backends", "last")

    def __init__(self) -> None:
        self.backends: list[Backend] = []
        self.last: str | None = None

    def add(self, backend: Backend, reason: str) -> None:
        self.backends.append(backend)
        self.last = f"{backend.url}: {reason}"


class StreamOwner(Protocol):
    """What a relayed stream needs from whoever opened it."""

    #: True once the server's grace period has begun (a cancellation is then a shutdown).
    stopping: bool

    def stall_guard(self, backend: Backend) -> StallGuard:
        """A guard that ends the wait for ``backend``'s next bytes if it has hung."""
        ...

    def stream_failed(self, backend: Backend, exc: BaseException) -> None:
        """``backend`` failed mid-stream (the client has part of the answer)."""
        ...

    def stream_done(self, backend: Backend, *, completed: bool, tokens: int) -> None:
        """The stream is over: give the backend's slot back, count the tokens."""
        ...


# Response headers the gateway sets itself (or that describe the upstream connection).
DROP_RESPONSE_HEADERS = frozenset(
    {
        *("connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"),
        # A backend's CORS answer is for its own callers; the gateway's CORS layer decides
        # for the gateway's.
        *("vary", "access-control-allow-origin", "access-control-allow-credentials"),
        "access-control-expose-headers",
    }
)
_DROP_RAW = frozenset(name.encode() for name in DROP_RESPONSE_HEADERS)
_UNREAD = object()


class Forwarded:
    """A backend's whole (not streamed) answer: its status, the headers worth passing on
    (lower-case names, ``raw_headers``) and its body, which is decoded once, the first time
    ``answer`` is asked for (the metrics, the request log and the cache all read it)."""

    __slots__ = ("_answer", "_lines", "body", "headers", "path", "status_code")

    def __init__(
        self, status_code: int, headers: list[tuple[bytes, bytes]], body: bytes, path: str = ""
    ):
        self.status_code = status_code
        self.headers = headers
        self.body = body
        self.path = path  # the route it answers: the kind of answer the body holds
        self._answer: object = _UNREAD
        self._lines: bytes | None = None  # ``header_lines(headers)``, made once

    @property
    def answer(self) -> Answer | None:
        """The body read as an answer to the route's kind; None if it is not JSON or the
        status is not 200 (an error's body is no answer)."""
        answer = self._answer
        if answer is _UNREAD:
            answer = self._answer = (
                read_answer(KINDS.get(self.path), self.body) if self.status_code == 200 else None
            )
        return answer  # type: ignore[return-value]

    def set_header(self, name: bytes, value: bytes) -> None:
        """Set ``name`` (lower case) to ``value``, replacing the backend's own."""
        set_header(self.headers, name, value)
        self._lines = None

    def lines(self) -> bytes:
        """The headers as ``header_lines``, made once (a forward makes them while the body
        is still on its way: ``balancer.direct``)."""
        lines = self._lines
        if lines is None:
            lines = self._lines = header_lines(self.headers)
        return lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send it as an ASGI response (the length is this body's; the backend's is dropped)."""
        headers = [*self.headers, (b"content-length", b"%d" % len(self.body))]
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


class UpstreamStream(Response):
    """An ASGI response relaying a backend's SSE stream; owns the backend's slot until done."""

    #: What the stream carried (tokens, usage), once it is being sent: the request log reads it.
    events: _EventCounter | None = None

    def __init__(
        self,
        owner: StreamOwner,
        backend: Backend,
        upstream: UpstreamResponse,
        chunks: AsyncIterator[bytes],
        first: bytes,
        path: str = "",
    ):
        self.owner = owner
        self.path = path
        self.backend = backend
        self.upstream = upstream
        self.chunks = chunks
        self.first = first
        self.status_code = upstream.status
        self.background = None
        self.raw_headers = raw_headers(upstream.headers)

    def set_header(self, name: bytes, value: bytes) -> None:
        """Set ``name`` (lower case) to ``value``, replacing the backend's own."""
        set_header(self.raw_headers, name, value)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        completed = False
        events = self.events = _EventCounter(KINDS.get(self.path))
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
                    with self.owner.stall_guard(self.backend) as stall:
                        while chunk:
                            events.feed(chunk)
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                            stall.touch()
                            chunk = await anext(self.chunks, b"")
                except httpx.TransportError as exc:  # a lost connection, or a stall
                    # Too late to retry: the client has part of the answer. Say so in-band.
                    self.owner.stream_failed(self.backend, exc)
                    error = UpstreamError(f"the backend failed mid-stream: {describe(exc)}")
                    await send({"type": "http.response.body", "body": sse_error(error)})
                    return
                except asyncio.CancelledError:
                    if not self.owner.stopping:
                        raise
                    uncancel()
                    closing = sse_error(shutting_down())
                    await send({"type": "http.response.body", "body": closing})
                    return
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                completed = True
        finally:
            await close_quietly(self.upstream)
            self.owner.stream_done(self.backend, completed=completed, tokens=events.tokens())


class _EventCounter:
    """Tokens in a relayed stream: the usage the backend reports at the end, else one per
    text event (SSE events carry one decoded piece of text each)."""

    __slots__ = ("answer", "events", "kind")

    def __init__(self, kind: Kind | None) -> None:
        self.kind = kind
        self.events = 0
        #: The event that carried a usage, read (the model and the token counts), if one did.
        self.answer: Answer | None = None

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(b"data: {")
        if b'"usage"' in chunk:
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage"' in line:
                    answer = read_answer(self.kind, line[6:])
                    if answer is not None and answer.completion_tokens:
                        self.answer = answer

    def tokens(self) -> int:
        if self.answer is not None and self.answer.completion_tokens is not None:
            return self.answer.completion_tokens
        return max(0, self.events - 1)  # the last event carries the finish reason, no text


def shutting_down() -> UnavailableError:
    return UnavailableError(
        "the gateway is shutting down; retry shortly", retry_after=5, code="shutting_down"
    )


def uncancel() -> None:
    """We handle this cancellation (by answering), so it must not linger on the task."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def set_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> None:
    """Set ``name`` (lower case) in ``headers`` to ``value``, replacing any it had."""
    if any(k == name for k, _ in headers):
        headers[:] = [(k, v) for k, v in headers if k != name]
    headers.append((name, value))


def header_lines(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``name: value\\r\\n`` lines, without Content-Length (the server writes its own)."""
    lines = []
    for pair in headers:  # a loop, not a generator: no frame made per answer
        if pair[0] != b"content-length":
            lines.append(b"%s: %s\r\n" % pair)
    return b"".join(lines)


def raw_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The backend's response headers worth passing on, names in lower case."""
    kept = []
    for name, value in headers:
        name = name.lower()
        if name not in _DROP_RAW:
            kept.append((name, value))
    return kept


async def close_quietly(response: UpstreamResponse) -> None:
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
