"""Backends started on the first miss and stopped when idle (``comeapi serve --on-demand``).

Hits never need a model, so nothing runs until a request has to be generated: that request
starts the backend pool and is answered 503 with Retry-After while the model loads (a client
never hangs on a cold start); after ``idle_timeout`` seconds with nothing forwarded, the pool
is stopped again and costs nothing but the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Literal

from comeapi.backend.supervisor import Supervisor
from comeapi.balancer.health import HealthChecker
from comeapi.balancer.pool import BackendPool
from comeapi.errors import UnavailableError
from comeapi.settings import Settings

log = logging.getLogger("comeapi.gateway.ondemand")

State = Literal["stopped", "starting", "running"]
START_RETRY_AFTER = 5.0


def pool_supervisor(settings: Settings) -> Supervisor:
    """The backend pool the settings describe (count backends from base_port), accepting
    the key the gateway sends them."""
    key = settings.backend_api_key
    return Supervisor(
        settings,
        host=settings.backend_host,
        base_port=settings.base_port,
        count=settings.count,
        api_keys=[key] if key else [],
    )


class OnDemandBackends:
    """Owns the backend processes of an on-demand gateway: start on use, stop when idle."""

    def __init__(
        self,
        make_supervisor: Callable[[], Supervisor],
        pool: BackendPool,
        health: HealthChecker,
        *,
        idle_timeout: float,
    ):
        self._make_supervisor = make_supervisor
        self.pool = pool
        self.health = health
        self.idle_timeout = idle_timeout
        self.state: State = "stopped"
        self.starts = 0
        self.last_error: str | None = None
        self._last_used = time.monotonic()
        self._supervisor: Supervisor | None = None
        self._starting: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._idle: asyncio.Task[None] | None = None

    def start_idle_watch(self) -> None:
        self._idle = asyncio.create_task(self._stop_when_idle())

    def ensure_running(self) -> None:
        """Return if the backends are up; otherwise start them (once) and raise 503."""
        self._last_used = time.monotonic()
        if self.state == "running":
            return
        if self.state == "stopped":
            self.state = "starting"
            self._starting = asyncio.create_task(self._start())
        raise UnavailableError(
            "the backends are starting for this request; retry shortly",
            retry_after=START_RETRY_AFTER,
            code="backend_starting",
        )

    def status(self) -> dict[str, object]:
        return {
            "state": self.state,
            "starts": self.starts,
            "idle_timeout": self.idle_timeout,
            "idle_for": round(time.monotonic() - self._last_used, 1),
            "last_error": self.last_error,
        }

    async def close(self) -> None:
        for task in (self._idle, self._starting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._stop("gateway shutting down")

    async def _start(self) -> None:
        supervisor = self._make_supervisor()
        log.info("starting %d backend(s) on demand", len(supervisor.urls()))
        try:
            await supervisor.start()
        except Exception as exc:  # the next request tries again; the error is in /status
            self.last_error = str(exc)
            self.state = "stopped"
            log.error("on-demand start failed: %s", exc)
            return
        self._supervisor = supervisor
        self._watch = asyncio.create_task(supervisor.watch())
        # Probe now rather than at the next health interval, so the retry finds them up.
        await asyncio.gather(*(self.health.probe(b) for b in self.pool.backends))
        self.starts += 1
        self.last_error = None
        self._last_used = time.monotonic()
        self.state = "running"

    async def _stop_when_idle(self) -> None:
        period = max(0.2, min(5.0, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            busy = any(b.in_flight for b in self.pool.backends) or self.pool.queue_depth
            idle_for = time.monotonic() - self._last_used
            if self.state == "running" and not busy and idle_for >= self.idle_timeout:
                await self._stop(f"idle for {idle_for:.0f} s")

    async def _stop(self, why: str) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        log.info("stopping the on-demand backends: %s", why)
        self.state = "stopped"
        for backend in self.pool.backends:
            self.pool.mark_down(backend, f"stopped ({why})", failure=False)
        await supervisor.stop()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
