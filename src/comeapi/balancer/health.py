"""Health checks: an active probe of each backend's /health, and passive failure reports.

Each backend has its own probe loop: every ``interval`` while healthy, and on a short
exponential backoff while down, so a restarted backend is back within a second or two
instead of waiting for the next 30 s probe. A request that could not reach a backend
reports it here (passive detection): it is marked down at once and re-probed soon.
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

log = logging.getLogger("comeapi.balancer")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0


def describe(exc: BaseException) -> str:
    """A short reason for /status ("connection refused", "timeout", ...)."""
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
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Probe every backend once (so the first requests find the healthy ones), then keep
        probing in the background."""
        await asyncio.gather(*(self.probe(b) for b in self.pool.backends))
        for backend in self.pool.backends:
            self._tasks.append(asyncio.create_task(self._watch(backend)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
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

    async def probe(self, backend: Backend) -> None:
        """One GET /health with its own timeout; updates the backend in the pool."""
        started = time.perf_counter()
        try:
            # httpx's timeouts are per phase; the deadline covers the whole probe.
            async with asyncio.timeout(self.timeout):
                response = await self.client.get(f"{backend.url}/health", timeout=self.timeout)
        except (TimeoutError, httpx.TimeoutException) as exc:
            self._timed_out(backend, exc)
            return
        except httpx.HTTPError as exc:
            self._down(backend, describe(exc))
            return
        finally:
            backend.last_check = time.time()
        latency = time.perf_counter() - started
        self._slow.discard(backend)
        data = _json_object(response)
        models = data.get("models")
        if isinstance(models, list):
            backend.models = frozenset(m for m in models if isinstance(m, str))
        status = data.get("status")
        if response.status_code == 200 and status == "ok":
            was_healthy = backend.healthy
            loaded = data.get("loaded_models")
            self.pool.mark_up(
                backend,
                capacity=_int(data.get("capacity"), 1),
                models=backend.models,
                loaded=tuple(loaded) if isinstance(loaded, list) else (),
                latency=latency,
            )
            if not was_healthy:
                log.info("backend %s is healthy (capacity %d)", backend.url, backend.capacity)
        elif response.status_code == 503 and status == "loading":
            self.pool.mark_down(backend, "loading", failure=False)
        else:
            self._down(backend, f"/health answered {response.status_code}")

    # --- internals -----------------------------------------------------------------------

    def _timed_out(self, backend: Backend, exc: BaseException) -> None:
        # A backend busy generating may answer a probe late once; give a healthy, busy
        # backend a second chance before pulling it (llama.cpp#20684: pods restarted for it).
        if backend.healthy and backend.in_flight > 0 and backend not in self._slow:
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


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
