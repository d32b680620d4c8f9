"""A forward done with callbacks, for the common case: a whole (not streamed) answer, a
backend with a free slot now and an idle kept-alive connection to it (``Forwarder.forward_soon``).

No task, future, async generator or per-wait timer: the request is written at once, and
the connection calls ``_progress`` once per arrival of bytes. The answer's head is made ready
as soon as it is in (a backend that writes its head and body apart leaves the body's arrival
only the client's write to do); once the body is complete, ``done`` has the answer first (it
writes it to the client), and only then is the backend's slot released, the answer counted
and the connection put back in the pool. Every other case stays on the coroutine path
(``Forwarder.forward``), and so does whatever goes wrong here before the answer is complete:
a failure, a stall, a read timeout or a 503 is accounted as there (the backend marked down,
the slot released, the attempt remembered) and the request goes on as a task on that path,
with the same ``tried``. The same timeouts hold here (``Watchdog``): no bytes for ``read``
seconds ends the exchange, and no bytes for ``stall_timeout`` asks the backend's /health
(``stall.py``'s rule), on one timer for all these forwards rather than two per request.

Why: measured against the coroutine path for this case (docs/balancer.md, with the
commands and the load), 0.77x the instructions per forwarded request and about a third less
of the latency the gateway adds beyond nginx ``proxy_pass``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import httpx

from comeapi.balancer.backend import Backend
from comeapi.balancer.relay import (
    Attempts,
    Forwarded,
    ForwardReport,
    UpstreamStream,
    shutting_down,
)
from comeapi.balancer.stall import BackendStalled
from comeapi.balancer.transport import FastUpstream, Origin, UpstreamConnection

#: What became of a forward: the backend's answer, an error to answer with (a
#: ``ComeapiError``; anything else is a 500), or None: cancelled, the client has gone.
Outcome = Forwarded | BaseException | None
Done = Callable[[Outcome], None]
#: A watchdog ticks this many times per shortest timeout: a timeout is noticed at most a
#: quarter of it late.
TICKS_PER_TIMEOUT = 4

log = logging.getLogger("comeapi.balancer")


class Releases(Protocol):
    """Gives a backend's slot back (``BackendPool.release``)."""

    def release(self, backend: Backend, *, served: bool = True) -> None: ...


class DirectOwner(Protocol):
    """What a ``DirectForward`` needs from the forwarder that started it
    (``balancer.proxy.Forwarder``), as ``relay.StreamOwner`` is for a stream."""

    #: True once the server's grace period has begun (a cancellation is then a shutdown).
    stopping: bool

    @property
    def pool(self) -> Releases: ...

    def direct_answered(self, forward: DirectForward, forwarded: Forwarded) -> None:
        """The backend's whole answer, already given to ``done``: its slot back, counted."""
        ...

    def direct_refused(self, forward: DirectForward, forwarded: Forwarded) -> None:
        """The backend answered 503 (nothing generated): on to the coroutine path."""
        ...

    def answer_head(
        self,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        path: str,
        set_headers: Sequence[tuple[bytes, bytes]],
    ) -> Forwarded:
        """The answer as far as its head (``Forwarder.answer_head``)."""
        ...

    def direct_failed(self, forward: DirectForward, exc: Exception, *, stale: bool) -> None:
        """Nothing reached the client: on to the coroutine path."""
        ...

    async def forward(
        self,
        path: str,
        raw: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        model: str | None,
        stream: bool,
        report: ForwardReport | None = None,
        tried: Attempts | None = None,
    ) -> Forwarded | UpstreamStream:
        """The coroutine path (``Forwarder.forward``)."""
        ...


class Watchdog:
    """The read and stall timeouts of every ``DirectForward`` of one forwarder, on one timer
    that ticks only while any is open. A forward that has heard nothing for ``read`` seconds
    fails with ReadTimeout; one silent for ``stall`` seconds has its backend's /health asked
    (``alive``), and fails with BackendStalled if that does not answer, as ``StallGuard``
    decides for a task (a live backend answers /health at once, even while it generates)."""

    def __init__(
        self,
        read: float | None,
        stall: float | None,
        alive: Callable[[Backend], Awaitable[bool]],
    ):
        self.read = read
        self.stall = stall
        self._alive = alive
        limits = [limit for limit in (read, stall) if limit is not None]
        self.tick = min(limits) / TICKS_PER_TIMEOUT if limits else None
        self.open: dict[DirectForward, None] = {}  # a set in the order they began
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, forward: DirectForward) -> None:
        if self.tick is None:
            return
        self.open[forward] = None
        if self._timer is None:
            self._timer = forward.loop.call_later(self.tick, self._check, forward.loop)

    def _check(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        read, stall = self.read, self.stall
        for forward in list(self.open):
            quiet = now - forward.last
            if read is not None and quiet >= read:
                forward.fail(httpx.ReadTimeout(f"no progress within {read:g} s"))
            elif (
                stall is not None
                and forward.probe is None
                and now - max(forward.last, forward.probed) >= stall
            ):
                forward.probe = probe = asyncio.ensure_future(self._alive(forward.backend))
                probe.add_done_callback(forward.probed_alive)
        if self.open and self.tick is not None:
            self._timer = loop.call_later(self.tick, self._check, loop)


class DirectForward:
    """One request on its way to ``backend`` over ``conn`` (already written). ``cancel()``
    (the client went away, or the server's grace period ran out) ends it as a task's
    ``cancel()`` would: the connection closed, so the backend stops generating."""

    __slots__ = (
        "_ended",
        "_head",
        "_parts",
        "_task",
        "backend",
        "conn",
        "done",
        "forwarder",
        "headers",
        "last",
        "loop",
        "model",
        "origin",
        "path",
        "probe",
        "probed",
        "raw",
        "report",
        "set_headers",
        "upstream",
        "watchdog",
    )

    def __init__(
        self,
        forwarder: DirectOwner,
        upstream: FastUpstream,
        backend: Backend,
        origin: Origin,
        conn: UpstreamConnection,
        path: str,
        raw: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        model: str | None,
        report: ForwardReport | None,
        done: Done,
        watchdog: Watchdog,
        set_headers: Sequence[tuple[bytes, bytes]] = (),
    ):
        self.forwarder = forwarder
        self.upstream = upstream
        self.backend = backend
        self.origin = origin
        self.conn = conn
        self.path = path
        self.raw = raw
        self.headers = headers
        self.model = model
        self.report = report
        self.done = done
        self.set_headers = set_headers
        self._ended = False
        #: The answer as far as its head, made as soon as the head is in.
        self._head: Forwarded | None = None
        self._parts: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        assert conn.loop is not None  # a connection made, as every pooled one is
        self.loop = loop = conn.loop
        #: When bytes last arrived (or the request was sent), and /health last answered.
        self.last = self.probed = loop.time()
        self.probe: asyncio.Future[bool] | None = None
        self.watchdog = watchdog
        watchdog.watch(self)
        conn.watcher = self._progress
        if conn.closed or conn.error is not None:  # lost before the watcher was set
            loop.call_soon(self._progress)

    # --- the pending answer, as the HTTP server holds it (``http.immediate.Pending``) ------

    def cancel(self, msg: Any = None) -> bool:
        if self._ended:
            return False
        if self._task is not None:
            return self._task.cancel(msg)
        self._stop()
        self.forwarder.pool.release(self.backend, served=False)
        self._ended = True
        # Told later: the server's shutdown cancels while it iterates over its tasks.
        self.loop.call_soon(self.done, shutting_down() if self.forwarder.stopping else None)
        return True

    # --- the connection's callbacks --------------------------------------------------------

    def _progress(self) -> None:
        conn = self.conn
        if self._ended or self._task is not None:
            return
        if conn.error is not None:
            self.fail(conn.error)
            return
        while conn.chunks:  # taken as they come, so a large answer never pauses reading
            self._parts.append(conn.take())
        head = self._head
        if head is None and conn.headers_done:
            # Ready before the body: a backend that writes its head and its body apart
            # (uvicorn does) leaves the body's arrival only the client's write to do.
            head = self._head = self.forwarder.answer_head(
                conn.status, conn.headers, self.path, self.set_headers
            )
        if conn.complete:
            assert head is not None
            parts = self._parts
            head.body = parts[0] if len(parts) == 1 else b"".join(parts)
            try:
                if head.status_code == 503:
                    self.forwarder.direct_refused(self, head)
                else:
                    self.answer(head)  # the client's answer first,
                    self.forwarder.direct_answered(self, head)  # then the slot and the counts
            finally:
                # The connection back to the pool, after the client's write too (no other
                # forward can ask for it meanwhile: this runs in one go).
                self._stop()
            return
        self.last = self.loop.time()

    def probed_alive(self, probe: asyncio.Future[bool]) -> None:
        """The watchdog's /health probe is back: silent but alive is a long generation."""
        self.probe = None
        if self._ended or self._task is not None or probe.cancelled():
            return
        exc = probe.exception()
        if exc is not None:  # a failing check must not end a request by itself
            log.error("liveness check failed", exc_info=exc)
        elif not probe.result():
            stall = self.watchdog.stall
            assert stall is not None
            self.fail(
                BackendStalled(f"stalled: no bytes for {stall:g} s and /health did not answer")
            )
            return
        self.probed = self.loop.time()

    # --- ends --------------------------------------------------------------------------

    def fail(self, exc: Exception) -> None:
        conn = self.conn
        # A kept-alive connection the server closed before reading the request: nothing was
        # processed, the backend is fine (``FastUpstream.post`` retries the same way).
        stale = not conn.got_bytes and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)
        self._stop()
        self.forwarder.direct_failed(self, exc, stale=stale)

    def _stop(self) -> None:
        """Unwatched, the connection back to the pool (or closed, if the answer is not all
        in)."""
        self.watchdog.open.pop(self, None)
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None
        self.upstream.finish(self.origin, self.conn)

    def answer(self, outcome: Outcome) -> None:
        """The forward is over: tell ``done``."""
        self._ended = True
        try:
            self.done(outcome)
        except Exception:  # it runs inside the connection's parser: keep it out of there
            log.exception("answering a forwarded request failed")

    def fall_back(self, tried: Attempts) -> None:
        """Go on as a task on the coroutine path, after the attempts in ``tried``."""
        self._task = self.loop.create_task(self._go_on(tried))

    async def _go_on(self, tried: Attempts) -> None:
        outcome: Outcome
        try:
            forwarded = await self.forwarder.forward(
                self.path,
                self.raw,
                self.headers,
                model=self.model,
                stream=False,
                report=self.report,
                tried=tried,
            )
            assert isinstance(forwarded, Forwarded)  # not a stream
            for name, value in self.set_headers:
                forwarded.set_header(name, value)
            outcome = forwarded
        except asyncio.CancelledError:
            outcome = None  # the client has gone (a shutdown's cancel is a 503 error)
        except Exception as exc:
            outcome = exc
        self.answer(outcome)
