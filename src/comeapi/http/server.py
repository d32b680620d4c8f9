"""How comeapi's HTTP servers (the gateway and the backend) run on uvicorn, with limits.

uvicorn runs the lifecycle (sockets, signals, graceful shutdown, ``--workers``); each
connection is comeapi's own protocol (``http.protocol``), with read deadlines and half-open
connections (``http.deadlines``), limits on the request head, and immediate answers
(``http.immediate``: the gateway's cache hits, without an ASGI task).

uvicorn's private names this package relies on, one module a line: ``Name(keywords)`` is
called with those keywords, ``.attr`` is used on the name or its instances. uvicorn is pinned
to the minor version they were read from (pyproject.toml), and
tests/http/test_uvicorn_names.py reads this list and fails when one of them moves.

- uvicorn.protocols.http.httptools_impl: RequestResponseCycle(scope, transport, flow,
  logger, access_logger, access_log, default_headers, message_event,
  expect_100_continue, keep_alive, on_response) .run_asgi .body .more_body
  .message_event .response_started .response_complete .disconnected .keep_alive;
  STATUS_LINE
- uvicorn.protocols.http.flow_control: FlowControl(transport) .pause_reading
  .resume_reading .pause_writing .resume_writing .write_paused; HIGH_WATER_LIMIT
- uvicorn.protocols.utils: get_local_addr; get_remote_addr; is_ssl
- uvicorn.server: ServerState() .connections .tasks .default_headers .total_requests
- uvicorn.middleware.proxy_headers: ProxyHeadersMiddleware(app, trusted_hosts) .app
  .trusted_hosts
- uvicorn._types: ASGI3Application; HTTPScope; Scope
- uvicorn.config: Config(app, http, limit_concurrency, timeout_keep_alive) .loaded
  .loaded_app .load .root_path .asgi_version .limit_concurrency .timeout_keep_alive
"""

from __future__ import annotations

import math
from typing import Any

import uvicorn

from comeapi.http.protocol import HttpProtocol, Limits
from comeapi.settings import Settings


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration with comeapi's protocol and its limits (a class of its own,
    so that ``--workers`` can pickle it to its worker processes)."""

    def __init__(
        self,
        app: Any,
        *,
        header_timeout: float,
        body_timeout: float,
        max_header_size: int = Limits.max_header_size,
        max_header_count: int = Limits.max_header_count,
        **options: Any,
    ):
        super().__init__(app, http=HttpProtocol, **options)
        self.limits = Limits(header_timeout, body_timeout, max_header_size, max_header_count)


def server_config(settings: Settings, app: Any, **options: Any) -> ServerConfig:
    """The uvicorn configuration of a comeapi server: the limits and the graceful shutdown
    from the settings, plus ``options`` (host, port, lifespan, ...)."""
    return ServerConfig(
        app,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        max_header_size=settings.max_header_size,
        max_header_count=settings.max_header_count,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
        **options,
    )
