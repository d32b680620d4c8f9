"""Forward one generation request to a backend of the pool, failing over while it is safe.

A request may be retried on another backend as long as nothing has been sent to the client:
for a plain answer that is until the whole body has arrived, for a stream until its first
chunk has. After that a failure ends the stream with an SSE error event. A backend that
hangs counts as failed once it has been silent for ``stall_timeout`` and misses a health
probe (``stall.py``). Streams pass through chunk by chunk; a client that disconnects closes
the upstream response, so the backend stops generating. The common case (a whole answer, a
free backend, an idle connection to it) is done with callbacks instead (``forward_soon``,
``direct.py``), and goes on here when anything else happens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Protocol

import httpx
import orjson
from starlette.types import Receive

from comeapi.balancer.backend import Backend
from comeapi.balancer.direct import DirectForward, Done, Watchdog
from comeapi.balancer.health import HealthChecker, describe
from comeapi.balancer.pool import BackendPool
from comeapi.balancer.relay import (
    Attempts,
    Forwarded,
    ForwardReport,
    StreamOwner,
    UpstreamStream,
    close_quietly,
    raw_headers,
    shutting_down,
    uncancel,
)
from comeapi.balancer.stall import StallGuard
from comeapi.balancer.transport import FastUpstream
from comeapi.balancer.upstream import Upstream, UpstreamResponse
from comeapi.errors import UnavailableError
from comeapi.http.disconnect import DisconnectGuard

# Request headers worth passing on; everything else (host, cookies, hop-by-hop) stays here.
FORWARD_REQUEST_HEADERS = ("content-type", "authorization", "accept")
_FORWARD_RAW = frozenset(name.encode() for name in FORWARD_REQUEST_HEADERS)
#: Header names and values as sent (names in lower case), as servers and clients hold them.
RawHeaders = Sequence[tuple[bytes, bytes]]
# Bodies are relayed byte for byte: they must arrive as the backend sent them.
_IDENTITY = (b"accept-encoding", b"identity")


class ProxyObserver(Protocol):
    """What the proxy reports for metrics."""

    def retried(self, backend: Backend, reason: str) -> None: ...

    def tokens(self, count: int) -> None: ...


class Forwarder(StreamOwner):
    """Sends requests to the pool's backends through one shared ``Upstream`` client."""

    def __init__(
        self,
        pool: BackendPool,
        health: HealthChecker,
        upstream: Upstream,
        *,
        stall_timeout: float | None = None,
        observer: ProxyObserver | None = None,
    ):
        self.pool = pool
        self.health = health
        self.upstream = upstream
        self.observer = observer
        #: Silence from a backend (s) after which it is asked whether it is alive.
        self.stall_timeout = stall_timeout
        #: Set when the server's grace period begins: requests it then cancels get a 503
        #: (or an SSE error event) instead of a dropped connection.
        self.stopping = False
        self._urls: dict[tuple[str, str], str] = {}
        self._direct = upstream if isinstance(upstream, FastUpstream) else None
        self._watchdog = Watchdog(
            self._direct.timeouts.read if self._direct is not None else None,
            stall_timeout,
            health.confirm_alive,
        )

    async def forward(
        self,
        path: str,
        raw: bytes,
        headers: RawHeaders,
        *,
        model: str | None,
        stream: bool,
        receive: Receive | None = None,
        report: ForwardReport | None = None,
        tried: Attempts | None = None,
    ) -> Forwarded | UpstreamStream:
        """The backend's answer to ``raw`` POSTed at ``path`` with ``headers``
        (``forward_headers``); the backend that answered (or was tried last) goes into
        ``report``. With ``receive`` (an ASGI request's), a client that disconnects ends the
        wait, and the answer is a 499 nobody reads; without it, the caller cancels the
        task when its client goes. ``tried``: backends already tried (``forward_soon``)."""
        tried = Attempts() if tried is None else tried
        try:
            if receive is None:
                return await self._open(path, raw, headers, model, stream, report, tried)
            async with DisconnectGuard(receive) as guard:
                return await self._open(path, raw, headers, model, stream, report, tried)
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            uncancel()
            raise shutting_down() from None
        assert guard.disconnected
        return Forwarded(499, [], b"")  # nobody is listening any more

    async def _open(
        self,
        path: str,
        raw: bytes,
        headers: RawHeaders,
        model: str | None,
        stream: bool,
        report: ForwardReport | None,
        tried: Attempts,
    ) -> Forwarded | UpstreamStream:
        while True:
            backend = await self._acquire(model, tried)
            if report is not None:
                report.backend = backend.url
            upstream: UpstreamResponse | None = None
            try:
                with self.stall_guard(backend) as stall:
                    upstream = await self.upstream.post(self._url(backend, path), raw, headers)
                    stall.touch()
                    chunks = upstream.chunks()
                    if stream and upstream.status == 200:
                        first = await anext(chunks, b"")
                        return UpstreamStream(self, backend, upstream, chunks, first, path)
                    parts: list[bytes] = []
                    async for chunk in chunks:
                        stall.touch()
                        parts.append(chunk)
                    body = parts[0] if len(parts) == 1 else b"".join(parts)
            except httpx.TransportError as exc:  # includes BackendStalled
                if upstream is not None:
                    await close_quietly(upstream)
                self._failed(backend, exc, tried)
                continue
            except BaseException:
                if upstream is not None:
                    await close_quietly(upstream)
                self.pool.release(backend, served=False)
                raise
            await upstream.aclose()  # the body is all in: the connection goes back to the pool
            if upstream.status == 503:
                self._refused(backend, body, tried)
                continue
            self.pool.release(backend)
            forwarded = Forwarded(upstream.status, raw_headers(upstream.headers), body, path)
            if self.observer is not None and upstream.status == 200:
                answer = forwarded.answer
                tokens = answer.completion_tokens if answer is not None else None
                self.observer.tokens(tokens or 0)
            return forwarded

    # --- the common case, with callbacks (``direct.py``) -----------------------------------

    def forward_soon(
        self,
        path: str,
        raw: bytes,
        headers: RawHeaders,
        *,
        model: str | None,
        report: ForwardReport | None,
        done: Done,
        set_headers: RawHeaders = (),
    ) -> DirectForward | None:
        """``forward`` of a whole answer, started now and told to ``done`` when over, if a
        backend has a free slot now and an idle connection to it: then no task is made (a
        failure goes on as one). None otherwise: nothing was done, ``forward`` it. The
        answer ``done`` gets has ``set_headers`` set (``Forwarded.set_header``)."""
        upstream = self._direct
        if upstream is None or self.stopping:
            return None
        backend = self.pool.take(model)
        if backend is None:
            return None
        sent = upstream.send_now(self._url(backend, path), raw, headers)
        if sent is None:
            self.pool.untake(backend)
            return None
        if report is not None:
            report.backend = backend.url
        origin, conn = sent
        return DirectForward(
            self,
            upstream,
            backend,
            origin,
            conn,
            path,
            raw,
            headers,
            model,
            report,
            done,
            self._watchdog,
            set_headers,
        )

    def direct_answered(self, forward: DirectForward, forwarded: Forwarded) -> None:
        """The backend's whole answer to ``forward``, after its client has it: the slot back
        (a queued request waits the few microseconds of that write), the tokens counted."""
        self.pool.release(forward.backend)
        if self.observer is not None and forwarded.status_code == 200:
            answer = forwarded.answer
            tokens = answer.completion_tokens if answer is not None else None
            self.observer.tokens(tokens or 0)

    def answer_head(
        self, status: int, headers: RawHeaders, path: str, set_headers: RawHeaders
    ) -> Forwarded:
        """A backend's answer as far as its head, body to come: the headers worth passing on
        (``raw_headers``), ``set_headers`` set, their lines made."""
        forwarded = Forwarded(status, raw_headers(headers), b"", path)
        for name, value in set_headers:
            forwarded.set_header(name, value)
        forwarded.lines()
        return forwarded

    def direct_refused(self, forward: DirectForward, forwarded: Forwarded) -> None:
        """A 503 to ``forward`` (the backend's queue is full, or its model is loading):
        nothing was generated, so it goes on to another backend, as a task."""
        tried = Attempts()
        self._refused(forward.backend, forwarded.body, tried)
        forward.fall_back(tried)

    def direct_failed(self, forward: DirectForward, exc: Exception, *, stale: bool) -> None:
        """Nothing reached the client: on to the coroutine path, which retries (on the same
        backend for a ``stale`` kept-alive connection, else on another)."""
        tried = Attempts()
        if stale:
            self.pool.release(forward.backend, served=False)
        else:
            assert isinstance(exc, httpx.TransportError)
            self._failed(forward.backend, exc, tried)
        forward.fall_back(tried)

    # --- StreamOwner ---------------------------------------------------------------------

    def stall_guard(self, backend: Backend) -> StallGuard:
        return StallGuard(self.stall_timeout, lambda: self.health.confirm_alive(backend))

    def stream_failed(self, backend: Backend, exc: BaseException) -> None:
        self.health.report_failure(backend, exc)

    def stream_done(self, backend: Backend, *, completed: bool, tokens: int) -> None:
        self.pool.release(backend, served=completed)
        if self.observer is not None:
            self.observer.tokens(tokens)

    # --- internals -----------------------------------------------------------------------

    def _url(self, backend: Backend, path: str) -> str:
        url = self._urls.get((backend.url, path))
        if url is None:
            url = self._urls[backend.url, path] = backend.url + path
        return url

    async def _acquire(self, model: str | None, tried: Attempts) -> Backend:
        try:
            return await self.pool.acquire(model, tried.backends)
        except UnavailableError as exc:
            if tried.last and type(exc) is UnavailableError:
                raise UnavailableError(
                    f"{exc.message}; last failure: {tried.last}", retry_after=exc.retry_after
                ) from None
            raise

    def _failed(self, backend: Backend, exc: httpx.TransportError, tried: Attempts) -> None:
        """Nothing was sent to the client yet: mark the backend down and try another."""
        self.pool.release(backend, served=False)
        self.health.report_failure(backend, exc)
        tried.add(backend, describe(exc))
        if self.observer is not None:
            self.observer.retried(backend, describe(exc))

    def _refused(self, backend: Backend, body: bytes, tried: Attempts) -> None:
        """The backend answered 503 (its own queue is full, or its model is loading): nothing
        was generated, so another backend may take the request."""
        self.pool.release(backend, served=False)
        code = _error_code(body) or "unavailable"
        if code != "queue_full":
            self.health.report_unready(backend, code)
        tried.add(backend, f"answered 503 ({code})")
        if self.observer is not None:
            self.observer.retried(backend, code)


def _error_code(body: bytes) -> str | None:
    """``error.code`` of an OpenAI-shaped error body, if it is one."""
    try:
        code = orjson.loads(body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def forward_headers(
    headers: Iterable[tuple[bytes, bytes]], api_key: str | None = None
) -> RawHeaders:
    """The client's headers (raw, names in lower case) worth passing to the backend, as
    they came. With ``api_key`` (the backends' key) that is sent instead of the client's
    Authorization, which was for the gateway."""
    found = [_IDENTITY]
    seen: set[bytes] = set()
    for name, value in headers:  # the first value wins
        if name in _FORWARD_RAW and name not in seen:
            if name == b"authorization" and api_key:
                continue
            seen.add(name)
            found.append((name, value))
    if api_key:
        found.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
    return found
