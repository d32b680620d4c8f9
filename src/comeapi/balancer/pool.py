"""The backend pool: which backend takes the next request, and the queue of those waiting.

A backend is given at most ``capacity`` requests at once (its /health says how many). When
every healthy backend is full, requests wait in one bounded FIFO queue; a freed slot goes to
the oldest waiter that can use it. Nothing ever hangs: a full queue, a wait past the
timeout, or no healthy backend at all each raise an ``UnavailableError`` (503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from comeapi.balancer.backend import Backend
from comeapi.errors import (
    ModelNotFoundError,
    QueueFullError,
    QueueTimeoutError,
    UnavailableError,
)
from comeapi.settings import Settings

Routing = Literal["round-robin", "least-outstanding"]

# Retry-After hints (s): a busy pool frees a slot soon; a dead one needs a probe to recover.
BUSY_RETRY_AFTER = 1.0
DOWN_RETRY_AFTER = 2.0


@dataclass(slots=True)
class _Waiter:
    model: str | None
    exclude: Collection[Backend]
    # Resolved with the backend handed over (its slot already taken), or None when no
    # healthy backend is left that could ever serve it.
    future: asyncio.Future[Backend | None]


class BackendPool:
    """Backends and their slots. Single event loop, no locks: every method runs to completion
    without awaiting, except ``acquire`` while it waits in the queue."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        routing: Routing = "round-robin",
        queue_size: int = 64,
        queue_timeout: float = 60.0,
    ):
        self.backends = [Backend(url) for url in dict.fromkeys(u.rstrip("/") for u in urls)]
        self.routing = routing
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self._cursor = 0
        self._waiters: deque[_Waiter] = deque()

    @classmethod
    def from_settings(cls, settings: Settings, urls: Iterable[str] | None = None) -> BackendPool:
        """The pool of ``urls`` (default: the configured backends) with the settings' routing
        and queue."""
        return cls(
            settings.backend_urls() if urls is None else urls,
            routing=settings.routing,
            queue_size=settings.queue_size,
            queue_timeout=settings.queue_timeout,
        )

    # --- state ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends if b.healthy]

    def known_models(self) -> list[str]:
        """Every model any backend has reported, healthy or not."""
        return sorted(set().union(*(b.models for b in self.backends)))

    def check_model(self, model: str | None) -> None:
        """ModelNotFoundError when no backend has ever reported ``model``. While no backend has
        reported anything (all still starting) nothing is known, so nothing is refused here."""
        if model is None or any(b.has_model(model) for b in self.backends):
            return
        known = self.known_models()
        if known:
            raise ModelNotFoundError(model, known)

    def summary(self) -> dict[str, Any]:
        healthy = self.healthy()
        return {
            "total_backends": len(self.backends),
            "healthy_backends": len(healthy),
            "in_flight": sum(b.in_flight for b in self.backends),
            "capacity": sum(b.capacity for b in healthy),
            "queue_depth": len(self._waiters),
        }

    # --- slots ---------------------------------------------------------------------------

    async def acquire(self, model: str | None = None, exclude: Collection[Backend] = ()) -> Backend:
        """A healthy backend with a free slot that serves ``model`` (not one of ``exclude``),
        its slot taken; ``release`` it when done. Waits in the queue when all are busy."""
        if not self._waiters:
            backend = self._pick(model, exclude)
            if backend is not None:
                backend.in_flight += 1
                return backend
        if not self._alive(model, exclude):
            raise self._unavailable(model)
        waiter = _Waiter(model, exclude, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._dispatch()
        if not waiter.future.done() and len(self._waiters) > self.queue_size:
            self._waiters.remove(waiter)
            raise QueueFullError(
                f"all backends are busy and {self.queue_size} requests are already waiting",
                retry_after=BUSY_RETRY_AFTER,
            )
        try:
            async with asyncio.timeout(self.queue_timeout):
                backend = await waiter.future
        except BaseException as exc:
            handed = self._abandon(waiter)
            if isinstance(exc, TimeoutError):
                if handed is not None:  # the slot arrived just as time ran out: use it
                    return handed
                raise QueueTimeoutError(
                    f"no backend became free within {self.queue_timeout:g} s",
                    retry_after=BUSY_RETRY_AFTER,
                ) from None
            if handed is not None:
                self.release(handed, served=False)
            raise
        if backend is None:
            raise self._unavailable(model)
        return backend

    def take(self, model: str | None) -> Backend | None:
        """``acquire`` without waiting: a backend whose slot is taken now, or None when none
        is free or others are queued (they come first)."""
        if self._waiters:
            return None
        backend = self._pick(model, ())
        if backend is not None:
            backend.in_flight += 1
        return backend

    def untake(self, backend: Backend) -> None:
        """Undo ``take`` (the request goes another way): the slot back, and the round-robin
        turn, so the next pick is ``backend`` again."""
        backend.in_flight -= 1
        self._cursor = self.backends.index(backend)

    def release(self, backend: Backend, *, served: bool = True) -> None:
        """Give the slot back (and hand it to the oldest waiter that can use it)."""
        backend.in_flight -= 1
        if served:
            backend.served += 1
        if self._waiters:
            self._dispatch()

    # --- health --------------------------------------------------------------------------

    def mark_up(
        self,
        backend: Backend,
        *,
        capacity: int,
        models: frozenset[str],
        loaded: tuple[str, ...] = (),
        latency: float = 0.0,
    ) -> None:
        backend.mark_healthy(capacity=capacity, models=models, loaded=loaded, latency=latency)
        self._dispatch()

    def mark_down(self, backend: Backend, reason: str, *, failure: bool = True) -> None:
        backend.mark_down(reason, failure=failure)
        # Waiters that only this backend could serve must not wait for nothing.
        self._dispatch()

    def close(self) -> None:
        """Shutting down: every waiter gets UnavailableError now."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)

    # --- internals -----------------------------------------------------------------------

    def _pick(self, model: str | None, exclude: Collection[Backend]) -> Backend | None:
        backends = self.backends
        count = len(backends)
        best: Backend | None = None
        best_index = 0
        for step in range(count):
            index = (self._cursor + step) % count
            b = backends[index]
            if not b.healthy or b.in_flight >= b.capacity or b in exclude:
                continue
            if model is not None and not b.has_model(model):
                continue
            if self.routing == "round-robin":
                best, best_index = b, index
                break
            if best is None or b.in_flight * best.capacity < best.in_flight * b.capacity:
                best, best_index = b, index
        if best is not None:
            self._cursor = best_index + 1
        return best

    def _alive(self, model: str | None, exclude: Collection[Backend]) -> bool:
        return any(b.healthy and b.has_model(model) and b not in exclude for b in self.backends)

    def _dispatch(self) -> None:
        """Hand free slots to waiters, oldest first; resolve with None those that no healthy
        backend can ever serve."""
        if not self._waiters:
            return
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            backend = self._pick(waiter.model, waiter.exclude)
            if backend is not None:
                backend.in_flight += 1
                waiter.future.set_result(backend)
                self._waiters.remove(waiter)
            elif not self._alive(waiter.model, waiter.exclude):
                waiter.future.set_result(None)
                self._waiters.remove(waiter)

    def _abandon(self, waiter: _Waiter) -> Backend | None:
        """The waiter stops waiting (timeout or cancelled): the backend it was handed, if any."""
        future = waiter.future
        if future.done() and not future.cancelled():
            return future.result()
        future.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        return None

    def _unavailable(self, model: str | None) -> UnavailableError:
        healthy = self.healthy()
        if not healthy:
            reasons = sorted({b.reason or "unknown" for b in self.backends})
            message = f"no healthy backend (0 of {len(self.backends)} up: {'; '.join(reasons)})"
        elif model is not None and not any(b.has_model(model) for b in healthy):
            message = f"no healthy backend serves model {model!r} right now"
        else:
            message = "every healthy backend failed this request"
        return UnavailableError(message, retry_after=DOWN_RETRY_AFTER)
