"""Run one backend process: bind the socket, load the model in the background, serve.

Lifecycle: ``startup()`` binds the socket and starts loading the default model (``/health``
says 503 "loading", then 200); ``main_loop()`` serves; on SIGTERM/SIGINT ``shutdown()`` lets
in-flight requests finish for up to ``shutdown_timeout`` seconds, then frees the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import uvicorn

from comeapi.backend.app import create_app
from comeapi.backend.engine import Engine
from comeapi.errors import ComeapiError, ConfigError
from comeapi.http.server import server_config
from comeapi.settings import Settings

log = logging.getLogger("comeapi.backend")

# sysexits.h EX_CONFIG: the backend cannot start with these settings or model files, so
# restarting it at once would fail the same way (the supervisor backs off instead).
EXIT_CONFIG = 78


class BackendServer(uvicorn.Server):
    """uvicorn's server plus the engine's lifecycle, and an optional parent watch."""

    def __init__(self, config: uvicorn.Config, engine: Engine, *, parent_pid: int | None = None):
        super().__init__(config)
        self.engine = engine
        self.parent_pid = parent_pid
        self.failure: ComeapiError | None = None
        self._loader: asyncio.Task[None] | None = None
        self._born = time.monotonic()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        try:
            await self.engine.start()
        except ComeapiError as exc:
            self.failure = exc
        except Exception as exc:
            log.exception("model loading failed")
            self.failure = ConfigError(f"model loading failed: {exc}")
        if self.failure is not None:
            log.error("%s", self.failure.message)
            self.should_exit = True
            return
        log.info("ready %.2fs after start", time.monotonic() - self._born)

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0 and self.parent_pid is not None and os.getppid() != self.parent_pid:
            # Portable orphan guard (PR_SET_PDEATHSIG covers Linux even on SIGKILL).
            log.warning("parent process %d is gone: shutting down", self.parent_pid)
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        await self.engine.close()


def serve(
    settings: Settings, *, parent_pid: int | None = None, instance: str | None = None
) -> None:
    """Serve until SIGTERM/SIGINT. Raises ConfigError if the model cannot be loaded.
    ``instance`` is the id /health reports (random when not given)."""
    engine = make_engine(settings)
    app = create_app(settings, engine, instance=instance)
    config = server_config(
        settings,
        app,
        host=settings.backend_host,
        port=settings.backend_port,
        log_level=settings.log_level,
        log_config=None,  # the CLI configured logging
        access_log=settings.log_level == "debug",
        lifespan="off",
    )
    server = BackendServer(config, engine, parent_pid=parent_pid)
    log.info(
        "backend on http://%s:%d, models from %s",
        settings.backend_host,
        settings.backend_port,
        settings.model_dir,
    )
    server.run()
    if server.failure is not None:
        raise server.failure


def make_engine(settings: Settings) -> Engine:
    """``SerialEngine`` for one slot, ``BatchedEngine`` (continuous batching) for more.
    Imported here, not at the top: each pulls in llama.cpp, and only one is used."""
    if settings.slots == 1:
        from comeapi.backend.serial import SerialEngine

        return SerialEngine(settings)
    from comeapi.backend.batched import BatchedEngine

    return BatchedEngine(settings)
