"""Noticing that a backend has stopped answering in the middle of a request (hung, SIGSTOPped,
swapping), without mistaking a long generation for a hang.

A plain (non-streamed) answer arrives all at once when the generation ends, so silence alone
proves nothing. A request is stalled when its backend has sent nothing for ``stall_timeout``
seconds *and* does not answer a ``/health`` probe either: a live backend answers ``/health``
at once even while it generates (its event loop only reads counters).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

import httpx

log = logging.getLogger("comeapi.balancer")


class BackendStalled(httpx.ReadTimeout):
    """No bytes for ``stall_timeout`` seconds and no answer to a health probe."""


class StallGuard:
    """Cancel the enclosed waiting when the backend stalls; the block then raises
    ``BackendStalled``. Call ``touch()`` whenever bytes arrive.

    One timer per request, not one per chunk: ``touch()`` only records the time, and the
    timer, when it fires, re-arms itself for whatever is left of the quiet period.
    """

    def __init__(self, timeout: float | None, alive: Callable[[], Awaitable[bool]]):
        self.timeout = timeout
        self._alive = alive
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._timer: asyncio.TimerHandle | None = None
        self._probe: asyncio.Future[None] | None = None
        self.stalled = False

    def touch(self) -> None:
        self._last = self._loop.time()

    def __enter__(self) -> StallGuard:
        if self.timeout is not None:
            self._task = asyncio.current_task()
            assert self._task is not None
            self._cancelling = self._task.cancelling()
            self._last = self._loop.time()
            self._timer = self._loop.call_later(self.timeout, self._fire)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        # The cancellation is ours unless someone else cancelled the task too (theirs wins).
        if (
            self.stalled
            and exc_type is asyncio.CancelledError
            and self._task is not None
            and self._task.uncancel() <= self._cancelling
        ):
            raise BackendStalled(
                f"stalled: no bytes for {self.timeout:g} s and /health did not answer"
            ) from None

    def _fire(self) -> None:
        self._timer = None
        assert self.timeout is not None
        quiet = self._loop.time() - self._last
        if quiet < self.timeout:
            self._timer = self._loop.call_later(self.timeout - quiet, self._fire)
            return
        self._probe = asyncio.ensure_future(self._check())

    async def _check(self) -> None:
        try:
            alive = await self._alive()
        except Exception:  # a failing check must not end a request by itself
            log.exception("liveness check failed")
            alive = True
        self._probe = None
        if alive:  # silent but answering /health: a long generation, ask again later
            assert self.timeout is not None
            self._timer = self._loop.call_later(self.timeout, self._fire)
            return
        self.stalled = True
        assert self._task is not None
        self._task.cancel()
