"""``comeapi serve`` (the gateway in front of running backends) and ``comeapi up`` (backends
and gateway in one process tree: what ``make run`` starts)."""

from __future__ import annotations

import logging
from typing import Any

import click

from comeapi.cli.options import build_settings, settings_options, user_errors
from comeapi.settings import Settings

GATEWAY_FIELDS = (
    "host",
    "port",
    "routing",
    "queue_size",
    "queue_timeout",
    "health_interval",
    "health_timeout",
    "connect_timeout",
    "request_timeout",
    "stall_timeout",
    "shutdown_timeout",
    "api_keys",
    "backend_api_key",
    "cors_origins",
    "max_body_bytes",
    "max_tokens_limit",
    "header_timeout",
    "max_header_size",
    "max_header_count",
    "body_timeout",
    "max_connections",
    "log_level",
    "access_log",
    "request_log_size",
    "store",
    "variants",
    "on_miss",
    "store_misses",
    "match",
    "similar_max_false_hits",
    "serve_states",
    "variant_secret",
    "cache_refresh",
    "on_demand",
    "idle_timeout",
)
BACKEND_FIELDS = (
    "model_dir",
    "default_model",
    "backend_host",
    "base_port",
    "count",
    "threads",
    "n_gpu_layers",
    "ctx",
    "slots",
    "backend_queue",
    "max_loaded_models",
    "liveness_failures",
)


@click.command()
@settings_options("backends", "backends_range", *GATEWAY_FIELDS, "workers", *BACKEND_FIELDS)
@click.pass_context
def serve(ctx: click.Context, /, **values: Any) -> None:
    """Run the gateway: the response cache, and the load balancer for everything else.

    \b
      comeapi serve                                      # the cache alone (no model needed)
      comeapi serve --on-demand --count 2                # backends started on the first miss
      comeapi serve --backends http://127.0.0.1:8080 --backends http://10.0.0.2:8080
      comeapi serve --backends-range 127.0.0.1:8080:5    # ComeAPI's HOST:FIRST_PORT:COUNT
      comeapi serve --host 0.0.0.0 --api-key "$KEY" ...  # reachable from other machines

    Listens on 127.0.0.1:9000 unless --host/--port say otherwise.
    """
    settings = build_settings(ctx, values)
    _configure_logging(settings)
    if settings.on_demand and (settings.workers > 1 or settings.backend_urls()):
        raise click.UsageError(
            "--on-demand starts its own backends (--count, --base-port, --model-dir ...) and "
            "runs one gateway worker: drop --backends/--backends-range/--workers"
        )
    if not settings.backend_urls() and not settings.on_demand:
        logging.getLogger("comeapi.gateway").warning(
            "no backends (--backends URL or --backends-range HOST:FIRST_PORT:COUNT): serving the "
            "cache only; unknown prompts get 404"
        )
    from comeapi.gateway.server import run_gateway

    with user_errors():
        check_store(settings)
        run_gateway(settings)


@click.command()
@settings_options(*BACKEND_FIELDS, *GATEWAY_FIELDS)
@click.pass_context
def up(ctx: click.Context, /, **values: Any) -> None:
    """Start COUNT backends and the gateway in front of them, in one process tree.

    \b
      comeapi up                       # 2 backends on 8080-8081, gateway on 127.0.0.1:9000
      comeapi up --count 5 --threads 1 # ComeAPI's layout: 5 single-thread backends

    Ctrl-C (or SIGTERM) stops the gateway gracefully, then every backend. The backends
    accept only --backend-api-key, which the gateway sends them (a new one each run if unset).
    """
    settings = build_settings(ctx, values)
    _configure_logging(settings)
    from comeapi.gateway.server import run, warn_if_exposed
    from comeapi.gateway.server import up as run_up

    warn_if_exposed(settings)
    with user_errors():  # a port taken, a store it cannot open, a backend that cannot start
        check_store(settings)
        run(run_up(settings))


def check_store(settings: Settings) -> None:
    """Open the store once before serving: one clear line now, rather than a traceback in
    every worker (or after the backends have started)."""
    from comeapi.cache.default import open_configured_store

    open_configured_store(settings).close()


def _configure_logging(settings: Settings) -> None:
    from comeapi.gateway.server import configure_logging

    configure_logging(settings)
