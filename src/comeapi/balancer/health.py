"""Health checks: an active probe of each backend's /health, and passive failure reports.

Each backend has its own probe loop: every ``interval`` while healthy, and on a short
exponential backoff while down, so a restarted backend is back within a second or two
instead of waiting for the next regular probe. A request that could not reach a backend
reports it here (passive detection): it is marked down at once and re-probed soon. A request
that has heard nothing for a while asks for a probe now (``confirm_alive``): a hung backend
is marked down as soon as that probe times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx

from comeapi.balancer.backend import Backend
from comeapi.balancer.pool import BackendPool
from comeapi.balancer.stall import BackendStalled
from comeapi.protocol.health import get_health, read_health

log = logging.getLogger("comeapi.balancer")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0


def describe(exc: BaseException) -> str:
    """A short reason for /status ("connection refused", "timeout", ...)."""
    if isinstance(exc, BackendStalled):
        return "stalled"
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "connection lost"
    return type(exc).__name__


class HealthChecker:
    """Keeps every backend's ``healthy``/``capacity``/``models`` current."""

    def __init__(
        self,
        pool: BackendPool,
        client: httpx.AsyncClient,
        *,
        interval: float = 30.0,
        timeout: float = 2.0,
        max_backoff: float = MAX_BACKOFF,
    ):
        self.pool = pool
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self.max_backoff = min(max_backoff, interval)
        self._wake = {b: asyncio.Event() for b in pool.backends}
        self._slow: set[Backend] = set()
        self._confirming: dict[Backend, asyncio.Future[bool]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Probe every backend once (so the first requests find the healthy ones), then keep
        probing in the background."""
        await asyncio.gather(*(self.probe(b) for b in self.pool.backends))
        for backend in self.pool.backends:
            self._tasks.append(asyncio.create_task(self._watch(backend)))

    async def stop(self) -> None:
        tasks: list[asyncio.Future[Any]] = [*self._tasks, *self._confirming.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def report_failure(self, backend: Backend, exc: BaseException) -> None:
        """Passive detection: a request could not get an answer from ``backend``."""
        reason = describe(exc)
        if backend.healthy:
            log.warning("backend %s marked down: %s", backend.url, reason)
        self.pool.mark_down(backend, reason)
        self._wake[backend].set()

    def report_unready(self, backend: Backend, reason: str) -> None:
        """The backend answered 503 to a request (model loading, shutting down)."""
        self.pool.mark_down(backend, reason, failure=False)
        self._wake[backend].set()

    async def probe(self, backend: Backend, *, lenient: bool = True) -> bool:
        """One GET /health with its own timeout; updates the backend in the pool. True when
        the backend answered at all (alive, even if loading or unwell).

        ``lenient``: a healthy backend busy generating may miss one probe before it is pulled.
        """
        started = time.perf_counter()
        try:
            # httpx's timeouts are per phase; the deadline covers the whole probe.
            async with asyncio.timeout(self.timeout):
                response = await get_health(self.client, backend.url)
        except (TimeoutError, httpx.TimeoutException) as exc:
            self._timed_out(backend, exc, lenient=lenient)
            return False
        except httpx.HTTPError as exc:
            self._down(backend, describe(exc))
            return False
        finally:
            backend.last_check = time.time()
        latency = time.perf_counter() - started
        self._slow.discard(backend)
        health = read_health(response.status_code, response.content)
        backend.note_instance(health.instance)
        if health.models is not None:
            backend.models = health.models
        if health.ready:
            was_healthy = backend.healthy
            self.pool.mark_up(
                backend,
                capacity=health.capacity or 1,
                models=backend.models,
                loaded=health.loaded_models,
                latency=latency,
            )
            if not was_healthy:
                log.info("backend %s is healthy (capacity %d)", backend.url, backend.capacity)
        elif health.state == "loading":
            self.pool.mark_down(backend, "loading", failure=False)
        else:
            self._down(backend, health.reason or "unhealthy")
        return True

    async def confirm_alive(self, backend: Backend) -> bool:
        """Probe ``backend`` now, for a request that has heard nothing from it for a while:
        True if it answers /health; else it is marked down at once (no second chance: the
        request has already waited). Requests asking at the same time share one probe."""
        running = self._confirming.get(backend)
        if running is None:
            running = asyncio.ensure_future(self.probe(backend, lenient=False))
            self._confirming[backend] = running
            running.add_done_callback(lambda _: self._confirmed(backend))
        return await asyncio.shield(running)

    # --- internals -----------------------------------------------------------------------

    def _confirmed(self, backend: Backend) -> None:
        self._confirming.pop(backend, None)
        self._wake[backend].set()  # down or not, the watch loop picks its next delay

    def _timed_out(self, backend: Backend, exc: BaseException, *, lenient: bool) -> None:
        # A backend busy generating may answer a probe late once; give a healthy, busy
        # backend a second chance before pulling it (llama.cpp#20684: pods restarted for it).
        if lenient and backend.healthy and backend.in_flight > 0 and backend not in self._slow:
            self._slow.add(backend)
            self._wake[backend].set()
            return
        self._slow.discard(backend)
        self._down(backend, describe(exc))

    def _down(self, backend: Backend, reason: str) -> None:
        if backend.healthy:
            log.warning("backend %s marked down: %s", backend.url, reason)
        self.pool.mark_down(backend, reason)

    def _delay(self, backend: Backend) -> float:
        if backend.healthy and backend not in self._slow:
            return self.interval
        steps = min(backend.consecutive_failures, 8)
        return min(self.max_backoff, FIRST_BACKOFF * 2.0 ** max(0, steps - 1))

    async def _watch(self, backend: Backend) -> None:
        wake = self._wake[backend]
        while True:
            try:
                async with asyncio.timeout(self._delay(backend)):
                    await wake.wait()
            except TimeoutError:
                pass
            else:
                # Woken by a state change: wait again, on the delay the new state asks for.
                wake.clear()
                if backend.healthy and backend not in self._slow:
                    continue
                await asyncio.sleep(self._delay(backend))
            try:
                await self.probe(backend)
            except Exception:  # a probe must never kill its loop
                log.exception("health probe of %s failed", backend.url)
