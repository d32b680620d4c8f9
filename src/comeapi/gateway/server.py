"""Run the gateway: startup -> serve -> graceful shutdown, and ``comeapi up``'s process tree.

uvicorn does the lifecycle: on SIGINT/SIGTERM it stops accepting, lets in-flight requests
finish for ``shutdown_timeout`` seconds, cancels what is left, then runs the app's shutdown
(health checks stop, connections close). The signals are caught here rather than by
uvicorn, so ``up`` can stop its backends after the gateway is done, and a second Ctrl-C
skips the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import uvicorn

from comeapi.balancer.pool import BackendPool
from comeapi.errors import ConfigError
from comeapi.gateway.app import Gateway, GatewayApp, create_app
from comeapi.gateway.cache import ResponseCache
from comeapi.gateway.workers import STARTUP_FAILURE, reuse_port_socket, run_workers
from comeapi.http.auth import warn_if_open
from comeapi.http.server import server_config
from comeapi.settings import Settings

log = logging.getLogger("comeapi.gateway")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def uvicorn_config(settings: Settings, app: GatewayApp | str, **options: Any) -> uvicorn.Config:
    return server_config(
        settings,
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # comeapi's own --access-log, measured: off by default
        lifespan="on",
        **options,
    )


class GatewayServer(uvicorn.Server):
    """uvicorn's server, minus its signal handling (``handle_signals`` feeds it instead),
    telling the gateway when shutdown begins."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway):
        super().__init__(config)
        self.gateway = gateway

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.forwarder.stopping = True
        await super().shutdown(sockets)


def gateway_server(settings: Settings, app: GatewayApp) -> GatewayServer:
    return GatewayServer(uvicorn_config(settings, app), app.state.gateway)


@contextlib.contextmanager
def handle_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)


def build_cache(settings: Settings) -> ResponseCache:
    """The response cache over the configured store (the default one seeded on first use)."""
    from comeapi.cache.default import open_configured_store

    similar = None
    if settings.match == "similar":
        from comeapi.gateway.similar import SimilarMatching

        similar = SimilarMatching(settings.similar_max_false_hits)
    return ResponseCache(
        open_configured_store(settings),
        variants=settings.variants,
        default_model=settings.default_model,
        variant_secret=settings.variant_secret,
        store_misses=settings.store_misses,
        serve_states=settings.serve_states,
        similar=similar,
    )


async def serve(
    settings: Settings,
    *,
    urls: list[str] | None = None,
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve the gateway in front of ``urls`` (default: the configured backends) until a
    signal, then shut down gracefully. ``sockets``: listen on these rather than bind."""
    if settings.on_demand:
        from comeapi.gateway.ondemand import pool_supervisor

        settings = with_backend_key(settings)
        if urls is None:
            urls = pool_supervisor(settings).urls()
    pool = BackendPool.from_settings(settings, urls)
    server = gateway_server(settings, create_app(settings, pool, build_cache(settings)))
    log.info(
        "gateway on http://%s:%d in front of %d backend(s), %s routing, store %s",
        settings.host,
        settings.port,
        len(pool.backends),
        settings.routing,
        settings.store,
    )
    with handle_signals(lambda sig: server.handle_exit(sig, None)):
        await server.serve(sockets)
    if not server.started:
        raise SystemExit(1)  # uvicorn has logged why (port in use, ...)


def with_backend_key(settings: Settings) -> Settings:
    """``settings`` with a ``backend_api_key``: the configured one, or a new one for this run.

    Used where the gateway starts its own backends (``up``, ``--on-demand``): they listen on
    local ports, and without a key anyone on the machine could use them past the gateway's
    keys. The gateway's own ``api_keys`` are not reused: those are its clients' keys.
    """
    if settings.backend_api_key:
        return settings
    return settings.model_copy(update={"backend_api_key": secrets.token_urlsafe(32)})


async def up(settings: Settings) -> None:
    """Start ``settings.count`` backends, then the gateway in front of them; on a signal stop
    the gateway (gracefully), then the backends. Nothing is left running. With ``on_demand``
    the gateway starts them itself on the first miss instead."""
    if settings.on_demand:
        await serve(settings)
        return
    from comeapi.backend.supervisor import port_taken
    from comeapi.gateway.ondemand import pool_supervisor

    problem = port_taken(settings.host, settings.port)
    if problem:  # checked before any backend starts (a second `comeapi up`, say)
        raise ConfigError(
            f"the gateway's port {settings.port} on {settings.host} is already in use "
            f"({problem}): is another `comeapi up` or `comeapi serve` running? Stop it, or "
            "choose another --port"
        )
    settings = with_backend_key(settings)
    supervisor = pool_supervisor(settings)
    stopping = asyncio.Event()
    server: GatewayServer | None = None
    watch: asyncio.Task[None] | None = None

    def on_signal(sig: int) -> None:
        stopping.set()
        if watch is not None:
            # A terminal's Ctrl-C reaches the backends too: they are stopping, not crashed,
            # so they must not be restarted while the gateway drains.
            watch.cancel()
        if server is not None:
            server.handle_exit(sig, None)

    with handle_signals(on_signal):
        try:
            if not await _unless(stopping, supervisor.start()):
                return
            urls = supervisor.urls()
            log.info("backends started: %s", ", ".join(urls))
            watch = asyncio.create_task(supervisor.watch())
            pool = BackendPool.from_settings(settings, urls)
            server = gateway_server(settings, create_app(settings, pool, build_cache(settings)))
            await server.serve()
            if not server.started:
                raise SystemExit(1)
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            await supervisor.stop()


async def _unless(stopping: asyncio.Event, work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` unless ``stopping`` is set first (then cancel it). True if it finished."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()  # re-raise a start-up failure
    return True


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def run_gateway(settings: Settings) -> None:
    """``comeapi serve``: one process, or ``settings.workers`` processes sharing the port
    (``gateway.workers``)."""
    warn_if_exposed(settings)
    if settings.workers == 1:
        run(serve(settings))
        return
    run_workers(settings, worker_main)


def worker_main(settings_json: str) -> None:
    """One ``--workers`` process: the gateway on its own SO_REUSEPORT socket until SIGTERM."""
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings)
    sock = reuse_port_socket(settings.host, settings.port)
    try:
        run(serve(settings, sockets=[sock]))
    except SystemExit as exc:
        raise SystemExit(STARTUP_FAILURE if exc.code else 0) from None


def configure_logging(settings: Settings) -> None:
    """The CLI's log format (again in a ``--workers`` process) at ``settings.log_level``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.log_level != "debug":
        # httpx logs every request at INFO: one line per proxied request and health probe.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def warn_if_exposed(settings: Settings) -> None:
    warn_if_open(settings.host, settings.api_keys, log)
