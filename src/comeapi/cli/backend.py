"""``comeapi backend`` (one llama.cpp server) and ``comeapi backends start`` (a supervised pool)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from comeapi.cli.options import build_settings, one_line, settings_options
from comeapi.errors import ConfigError
from comeapi.http.auth import warn_if_open
from comeapi.settings import Settings

if TYPE_CHECKING:
    from comeapi.backend.supervisor import Supervisor

# Settings every backend process uses; the pool passes them on to its children.
BACKEND_FIELDS = (
    "model_dir",
    "default_model",
    "threads",
    "n_gpu_layers",
    "ctx",
    "slots",
    "max_loaded_models",
    "max_tokens_limit",
    "max_body_bytes",
    "header_timeout",
    "max_header_size",
    "max_header_count",
    "body_timeout",
    "max_connections",
    "backend_queue",
    "shutdown_timeout",
    "log_level",
)


def _configure_logging(settings: Settings) -> None:
    logging.getLogger().setLevel(settings.log_level.upper())
    # One line per health probe would drown the backends' own logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)


# What a backend lets in: bearer keys (every route but /health) and browser origins (CORS).
ACCESS_FIELDS = ("api_keys", "cors_origins")
# In these commands --host and --port name the backend's own address, as they always have.
BACKEND_ADDRESS: dict[str, tuple[str, ...]] = {
    "backend_host": ("--host",),
    "backend_port": ("--port",),
}


@click.command()
@settings_options(
    "backend_host",
    "backend_port",
    *BACKEND_FIELDS,
    *ACCESS_FIELDS,
    aliases=BACKEND_ADDRESS,
)
@click.option("--parent-pid", type=int, default=None, hidden=True)
@click.option("--instance-id", default=None, hidden=True)
@click.pass_context
def backend(
    ctx: click.Context, /, parent_pid: int | None, instance_id: str | None, **values: Any
) -> None:
    """Serve GGUF models with llama.cpp: ComeAPI's API and OpenAI's.

    /health answers 503 while the default model loads, then 200. With --api-key (repeatable)
    every other route needs 'Authorization: Bearer KEY'.
    """
    settings = build_settings(ctx, values)
    _configure_logging(settings)
    warn_if_open(settings.backend_host, settings.api_keys, logging.getLogger("comeapi.backend"))
    from comeapi.backend.server import EXIT_CONFIG, serve

    try:
        serve(settings, parent_pid=parent_pid, instance=instance_id)
    except ConfigError as exc:
        click.echo(f"Error: {one_line(exc.message)}", err=True)
        ctx.exit(EXIT_CONFIG)


@click.group()
def backends() -> None:
    """The backend pool: several `comeapi backend` processes on consecutive ports."""


@backends.command("start")
@settings_options(
    "backend_host",
    "base_port",
    "count",
    *BACKEND_FIELDS,
    "restart_backoff_max",
    "health_interval",
    "health_timeout",
    "liveness_failures",
    *ACCESS_FIELDS,
    aliases=BACKEND_ADDRESS,
)
@click.pass_context
def start(ctx: click.Context, /, **values: Any) -> None:
    """Start COUNT backends on BASE_PORT.., keep them alive, stop them all on Ctrl-C/SIGTERM."""
    settings = build_settings(ctx, values)
    _configure_logging(settings)
    try:
        asyncio.run(_run_pool(settings))
    except ConfigError as exc:
        click.echo(f"Error: {one_line(exc.message)}", err=True)
        ctx.exit(1)


async def _run_pool(settings: Settings) -> None:
    from comeapi.backend.supervisor import Supervisor

    supervisor = Supervisor(
        settings,
        host=settings.backend_host,
        base_port=settings.base_port,
        count=settings.count,
        api_keys=settings.api_keys,
        cors_origins=settings.cors_origins,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(supervisor.start())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # Ctrl-C during start-up
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        starting.result()  # raises ConfigError if a backend failed to start
        _print_table(supervisor)
        watcher = asyncio.create_task(supervisor.watch())
        await stopped
        logging.getLogger("comeapi.pool").info("stopping %d backends", settings.count)
        await supervisor.stop()
        await watcher
    finally:
        stopped.cancel()
        await supervisor.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_table(supervisor: Supervisor) -> None:
    table = Table(title="comeapi backends")
    table.add_column("#", justify="right")
    table.add_column("URL")
    table.add_column("PID", justify="right")
    table.add_column("status")
    for proc in supervisor.processes():
        table.add_row(str(proc.index + 1), proc.url, str(proc.pid), "🟢 healthy")
    console = Console()
    console.print(table)
    console.print("Ctrl-C stops every backend.")
