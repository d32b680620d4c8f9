"""How comeapi's HTTP servers (the gateway and the backend) run on uvicorn, with limits.

uvicorn times out only idle keep-alive connections: a client that connects and sends
nothing, or sends its headers or body a byte at a time, holds a connection for ever (a
reliability run held 2000). ``GuardedHttpToolsProtocol`` gives each request's headers
``header_timeout`` and its body ``body_timeout``; uvicorn's ``limit_concurrency`` caps the
connections and requests in progress (503 above ``max_connections``).

It also answers cache hits without the ASGI cycle. For a small POST to one of the paths an
app lists in ``immediate_paths`` (the gateway's generation routes), no task is started when
the headers arrive; once the body is complete, the app's ``answer_now`` is asked first, and
a hit is written straight to the socket. Anything else (an error, a miss, a streamed body)
then starts the ASGI task as uvicorn would. The task, the receive/send messages and uvicorn's
per-header checks were about a third of a hit's CPU (``benchmarks/hit_in_process.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, Protocol

import uvicorn
from uvicorn._types import ASGI3Application, Scope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from comeapi.settings import Settings

log = logging.getLogger("comeapi.http")

RawHeaders = list[tuple[bytes, bytes]]

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0


class ImmediateAnswers(Protocol):
    """An ASGI app that can answer some complete requests before any ASGI task exists."""

    immediate_paths: frozenset[str]

    def answer_now(self, scope: Scope, body: bytes) -> tuple[RawHeaders, bytes] | None:
        """The headers and body of a 200 for this request, or None to take the ASGI path."""
        ...


def immediate_answers(
    app: ASGI3Application,
) -> tuple[ImmediateAnswers, ProxyHeadersMiddleware | None] | None:
    """The app under uvicorn's wrapping that answers immediately, and a stand-in for the
    proxy-headers middleware in front of it (``forwarded_client``); None when something
    else stands between them (CORS, say: its headers belong on every answer)."""
    rewrite = None
    if isinstance(app, ProxyHeadersMiddleware):
        # uvicorn's own middleware in front of an app that does nothing: the scope gets
        # exactly uvicorn's rewrite.
        rewrite = ProxyHeadersMiddleware(_scope_only)
        rewrite.trusted_hosts = app.trusted_hosts
        app = app.app
    if isinstance(getattr(app, "immediate_paths", None), frozenset):
        return app, rewrite  # type: ignore[return-value]
    return None


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration plus the read deadlines (a class of its own, so that
    ``--workers`` can pickle it to its worker processes)."""

    def __init__(self, app: Any, *, header_timeout: float, body_timeout: float, **options: Any):
        super().__init__(app, http=GuardedHttpToolsProtocol, **options)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with deadlines for reading each request.

    A request is being read from the connection's opening or its first byte until it is
    complete: past ``header_timeout`` without the headers the connection is closed; past
    ``body_timeout`` after the headers without the whole body the client gets 408. One
    timer per connection watches this, and is not re-armed for every request: when it fires
    it looks at the request being read now, if any, and sleeps until that one's deadline.
    Errors uvicorn writes itself are JSON in OpenAI's shape.
    """

    _read_timer: asyncio.TimerHandle | None = None
    _reading_since: float | None = None  # None between requests
    _headers_done_at: float | None = None
    _immediate: tuple[ImmediateAnswers, ProxyHeadersMiddleware | None] | None = None
    _in_headers_complete = False
    _deferred: tuple[RequestResponseCycle, ASGI3Application] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._immediate = immediate_answers(self.app)
        self._reading_since = self.loop.time()
        self._arm(self._timeouts()[0])

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_since = self.loop.time()
        self._headers_done_at = None
        if self._read_timer is None:
            self._arm(self._timeouts()[0])

    def on_headers_complete(self) -> None:
        self._headers_done_at = now = self.loop.time()
        body_deadline = now + self._timeouts()[1]
        if self._read_timer is None or self._read_timer.when() > body_deadline:
            self._arm(body_deadline - now)
        self._in_headers_complete = True
        try:
            super().on_headers_complete()
        finally:
            self._in_headers_complete = False

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """uvicorn starts each request's task here; a request ``answer_now`` may answer
        waits for its body instead (pipelined requests queue up behind it as usual)."""
        if self._in_headers_complete and app is self.app and self._may_answer_now(cycle):
            self._deferred = (cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def _may_answer_now(self, cycle: RequestResponseCycle) -> bool:
        scope = cycle.scope
        if (
            self._immediate is None
            or scope["method"] != "POST"
            or scope["path"] not in self._immediate[0].immediate_paths
            or self.expect_100_continue  # the client waits for the app to ask for the body
        ):
            return False
        # A known, small length only: uvicorn stops reading a larger body until the app
        # asks for it, and a chunked body's length is not known up front.
        for name, value in scope["headers"]:
            if name == b"content-length":
                return value.isdigit() and int(value) <= HIGH_WATER_LIMIT
        return False

    def on_message_complete(self) -> None:
        self._reading_since = None
        super().on_message_complete()
        deferred = self._deferred
        if deferred is not None:
            self._deferred = None
            self._answer_now(*deferred)

    def _answer_now(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        assert self._immediate is not None
        answerer, rewrite = self._immediate
        scope = cycle.scope
        if rewrite is not None:
            forwarded_client(rewrite, scope)
        try:
            answer = answerer.answer_now(scope, bytes(cycle.body))
        except Exception:
            log.exception("answer_now failed on %s; the ASGI path takes it", scope["path"])
            answer = None
        if answer is None:
            super()._start_asgi_task(cycle, app)
            return
        headers, body = answer
        head = [STATUS_LINE[200]]
        for name, value in (*self.server_state.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", body)
        self.transport.write(b"".join(head))
        cycle.response_started = cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()

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
        if self.transport.is_closing() or self._reading_since is None:
            return  # between requests, uvicorn's keep-alive timeout closes an idle connection
        header_timeout, body_timeout = self._timeouts()
        if self._headers_done_at is None:
            left = self._reading_since + header_timeout - self.loop.time()
            if left > 0:
                self._arm(left)  # a later request than the one the timer was armed for
            else:
                self.transport.close()  # not even the headers: nobody to answer
            return
        left = self._headers_done_at + body_timeout - self.loop.time()
        if left > 0:
            self._arm(left)  # the headers came in time: the body gets its own time
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


def forwarded_client(rewrite: ProxyHeadersMiddleware, scope: Scope) -> None:
    """Run ``rewrite`` (from ``immediate_answers``) on a request's scope: the client and
    scheme a trusted proxy forwarded, as the ASGI path would see them. Doing it twice
    changes nothing."""
    step = rewrite(scope, _scope_only_receive, _scope_only_send)
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError("uvicorn's ProxyHeadersMiddleware waited for something")


async def _scope_only(scope: Scope, receive: Any, send: Any) -> None:
    return None


async def _scope_only_receive() -> Any:
    raise RuntimeError("not for reading")


async def _scope_only_send(message: Any) -> None:
    raise RuntimeError("not for sending")


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
