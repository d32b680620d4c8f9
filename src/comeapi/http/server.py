"""How comeapi's HTTP servers (the gateway and the backend) run on uvicorn, with limits.

uvicorn times out only idle keep-alive connections: a client that connects and sends
nothing, or sends its headers or body a byte at a time, holds a connection for ever (a
reliability run held 2000). ``GuardedHttpToolsProtocol`` gives each request's headers
``header_timeout`` and its body ``body_timeout``; uvicorn's ``limit_concurrency`` caps the
connections and requests in progress (503 above ``max_connections``).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from comeapi.settings import Settings

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration plus the read deadlines (a class of its own, so that
    ``--workers`` can pickle it to its worker processes)."""

    def __init__(self, app: Any, *, header_timeout: float, body_timeout: float, **options: Any):
        super().__init__(app, http=GuardedHttpToolsProtocol, **options)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for reading each request.

    One timer per request, armed when the connection opens or a request's first byte
    arrives, cancelled when the request is complete: past ``header_timeout`` without the
    headers the connection is closed; past ``body_timeout`` after the headers without the
    whole body the client gets 408. Errors uvicorn writes itself are JSON in OpenAI's shape.
    """

    _read_timer: asyncio.TimerHandle | None = None
    _headers_done_at: float | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self._timeouts()[0])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_done_at = None
        self._arm(self._timeouts()[0])

    def on_headers_complete(self) -> None:
        self._headers_done_at = self.loop.time()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, msg, "bad_request")

    def _timeouts(self) -> tuple[float, float]:
        config = self.config
        return (
            getattr(config, "header_timeout", DEFAULT_HEADER_TIMEOUT),
            getattr(config, "body_timeout", DEFAULT_BODY_TIMEOUT),
        )

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(delay, self._read_deadline)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_deadline(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._headers_done_at is None:
            self.transport.close()  # not even the headers: nobody to answer
            return
        left = self._headers_done_at + self._timeouts()[1] - self.loop.time()
        if left > 0:
            self._arm(left)  # the headers came late: the body gets its own time
            return
        # Closing the connection tells the app waiting for the body that the client is gone.
        if self.cycle is not None and not self.cycle.response_started:
            self._send_error(408, "the request body was not received in time", "timeout")
        else:
            self.transport.close()

    def _send_error(self, status: int, message: str, code: str) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": code,
                }
            }
        ).encode()
        head = [STATUS_LINE[status]]
        head += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def server_config(settings: Settings, app: Any, **options: Any) -> ServerConfig:
    """The uvicorn configuration of a comeapi server: the limits and the graceful shutdown
    from the settings, plus ``options`` (host, port, lifespan, ...)."""
    return ServerConfig(
        app,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
        **options,
    )
