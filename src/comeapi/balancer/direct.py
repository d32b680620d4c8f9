"""A forward done with callbacks, for the common case: a whole (not streamed) answer, a
backend with a free slot now and an idle kept-alive connection to it (``Forwarder.forward_soon``).

No task, future, async generator or per-wait timer: the request is written at once, the
connection's parser calls ``_progress`` as the answer arrives, and the answer goes to the
forwarder, which hands it to ``done``. Every other case stays on the coroutine path
(``Forwarder.forward``), and so does whatever goes wrong here before the answer is complete:
a failure, a stall, a read timeout or a 503 is accounted as there (the backend marked down,
the slot released, the attempt remembered) and the request goes on as a task on that path,
with the same ``tried``. Timeouts hold here too: ``read`` (no progress for that long) and
the stall guard (``stall.py``), each one timer per request, re-armed only when it fires.

Why: the coroutine path cost 0.31 ms of user CPU per forward and added 2.7x nginx
``proxy_pass``'s latency; this one costs about half (docs/balancer.md, with the commands).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from comeapi.balancer.backend import Backend
from comeapi.balancer.relay import Forwarded, shutting_down
from comeapi.balancer.stall import BackendStalled, StallGuard
from comeapi.balancer.transport import FastUpstream, Origin, _Connection

if TYPE_CHECKING:
    from comeapi.balancer.proxy import Attempts, Forwarder, ForwardReport

#: What became of a forward: the backend's answer, an error to answer with (a
#: ``ComeapiError``; anything else is a 500), or None: cancelled, the client has gone.
Outcome = Forwarded | BaseException | None
Done = Callable[[Outcome], None]


class DirectForward:
    """One request on its way to ``backend`` over ``conn`` (already written). ``cancel()``
    (the client went away, or the server's grace period ran out) ends it as a task's
    ``cancel()`` would: the connection closed, so the backend stops generating."""

    __slots__ = (
        "_ended",
        "_guard",
        "_last",
        "_loop",
        "_parts",
        "_task",
        "_timer",
        "backend",
        "conn",
        "done",
        "forwarder",
        "headers",
        "model",
        "origin",
        "path",
        "raw",
        "report",
        "upstream",
    )

    def __init__(
        self,
        forwarder: Forwarder,
        upstream: FastUpstream,
        backend: Backend,
        origin: Origin,
        conn: _Connection,
        path: str,
        raw: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        model: str | None,
        report: ForwardReport | None,
        done: Done,
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
        self._ended = False
        self._parts: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._loop = loop = asyncio.get_running_loop()
        self._last = loop.time()
        read = upstream.timeouts.read
        self._timer = None if read is None else loop.call_later(read, self._quiet)
        self._guard: StallGuard | None = None
        if forwarder.stall_timeout is not None:
            self._guard = forwarder.stall_guard(backend)
            self._guard.start(self._stalled)
        conn.watcher = self._progress
        if conn.closed or conn.error is not None:  # lost before the watcher was set
            self._loop.call_soon(self._progress)

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
        self._loop.call_soon(self.done, shutting_down() if self.forwarder.stopping else None)
        return True

    # --- the connection's callbacks --------------------------------------------------------

    def _progress(self) -> None:
        conn = self.conn
        if self._ended or self._task is not None:
            return
        if conn.error is not None:
            self._fail(conn.error)
            return
        while conn.chunks:  # taken as they come, so a large answer never pauses reading
            self._parts.append(conn.take())
        if conn.complete:
            self._stop()
            parts = self._parts
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            self.forwarder.direct_answered(self, conn.status, conn.headers, body)
            return
        self._last = self._loop.time()
        if self._guard is not None:
            self._guard.touch()

    def _quiet(self) -> None:
        """The read timer: no progress for ``timeouts.read`` seconds ends the exchange."""
        self._timer = None
        read = self.upstream.timeouts.read
        assert read is not None
        quiet = self._loop.time() - self._last
        if quiet < read:
            self._timer = self._loop.call_later(read - quiet, self._quiet)
            return
        self._fail(httpx.ReadTimeout(f"no progress within {read:g} s"))

    def _stalled(self) -> None:
        timeout = self.forwarder.stall_timeout
        self._fail(
            BackendStalled(f"stalled: no bytes for {timeout:g} s and /health did not answer")
        )

    # --- ends --------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        conn = self.conn
        # A kept-alive connection the server closed before reading the request: nothing was
        # processed, the backend is fine (``FastUpstream.post`` retries the same way).
        stale = not conn.got_bytes and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError)
        self._stop()
        self.forwarder.direct_failed(self, exc, stale=stale)

    def _stop(self) -> None:
        """Timers off, the connection back to the pool (or closed, if the answer is not all
        in)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._guard is not None:
            self._guard.stop()
        self.upstream.finish(self.origin, self.conn)

    def answer(self, outcome: Outcome) -> None:
        """The forward is over: tell ``done``."""
        self._ended = True
        self.done(outcome)

    def fall_back(self, tried: Attempts) -> None:
        """Go on as a task on the coroutine path, after the attempts in ``tried``."""
        self._task = self._loop.create_task(self._go_on(tried))

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
            outcome = forwarded
        except asyncio.CancelledError:
            outcome = None  # the client has gone (a shutdown's cancel is a 503 error)
        except Exception as exc:
            outcome = exc
        self.answer(outcome)
