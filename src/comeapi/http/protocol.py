"""comeapi's HTTP/1.1 connection: httptools parses each request; an immediate answer (a
cache hit, ``http.immediate``) is written the moment its body is complete; everything else
runs as ASGI through uvicorn's own ``RequestResponseCycle``, as uvicorn's httptools protocol
would run it (pipelining, keep-alive, flow control, 100-continue, the concurrency limit).

Why not uvicorn's protocol: it builds a scope, an asyncio.Event, a cycle object and a
keep-alive timer for every request, about 20 us of a hit's CPU (``benchmarks/
hit_in_process.py``); a hit here builds none of them. And the limits a public server needs
are applied while reading: request line and header lines (``max_header_size``, 414/431),
header count (``max_header_count``, 431), the whole head (4 x ``max_header_size``, 431,
checked as bytes arrive), Transfer-Encoding other than ``chunked`` (501, as nginx), protocol
upgrades other than an ignored HTTP/2 offer (400); deadlines and half-open connections
(``http.deadlines``). Every error the server writes itself is JSON in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, cast

import httptools
from uvicorn._types import ASGI3Application, HTTPScope
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState

from comeapi.http.deadlines import Expired, HalfOpen, ReadDeadlines
from comeapi.http.immediate import NOTE, Immediate, ImmediateRequest, Later, Pending

log = logging.getLogger("comeapi.http")

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_HEADER_SIZE = 8192  # nginx's large_client_header_buffers, Apache's 8190
DEFAULT_MAX_HEADER_COUNT = 100  # Apache's LimitRequestFields
_OK = STATUS_LINE[200]
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto"})
# The headers ``on_header`` acts on; every other one is only kept.
_NOTED = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade", *_FORWARDED})


@dataclass
class Limits:
    """What one server allows a connection (``ServerConfig``); ``half_open`` is the
    server's table of unfinished request heads."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    half_open: HalfOpen = field(default_factory=HalfOpen)
    _immediate: tuple[Any, Immediate | None] | None = None

    def immediate(self, app: ASGI3Application) -> Immediate | None:
        """``Immediate.of(app)``, worked out once per app."""
        if self._immediate is None or self._immediate[0] is not app:
            self._immediate = (app, Immediate.of(app))
        return self._immediate[1]


class Refused(Exception):
    """A request the server answers itself with an error, then closes the connection."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.code = code


class Coalescing:
    """The connection's transport as the ASGI cycle writes to it: what one turn of the event
    loop writes goes out in one system call. uvicorn's cycle writes a response's head and
    its body separately: two sends, two TCP segments and two wake-ups of the client for
    every small answer, where nginx sends one. Immediate answers (``write_now``) go out at
    once, after anything held."""

    __slots__ = ("_held", "_loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def write_now(self, data: bytes) -> None:
        if self._held:
            self._held.append(data)
            self.flush()
        else:
            self.transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, []
        if held and not self.transport.is_closing():
            self.transport.write(b"".join(held))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection (uvicorn's ``--http`` protocol class)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ):
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.logger = logging.getLogger("uvicorn.error")
        self.access_logger = logging.getLogger("uvicorn.access")
        self.access_log = self.access_logger.hasHandlers()
        self.parser = httptools.HttpRequestParser(self)
        with contextlib.suppress(AttributeError):  # answer a request before a pipelined one
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.limits: Limits = getattr(config, "limits", None) or Limits()
        self._max_header_count = self.limits.max_header_count
        self._max_header_size = self.limits.max_header_size
        self.immediate = self.limits.immediate(self.app)
        self.app_state = app_state
        self.server_state = server_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.limit = config.limit_concurrency
        self.pipeline: deque[tuple[RequestResponseCycle, ASGI3Application]] = deque()
        self.cycle: RequestResponseCycle | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: FlowControl = None  # type: ignore[assignment]
        # The request being read.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self._length = -1  # Content-Length, -1 without one
        self._chunked = self._expect = self._forwarded = False
        self._upgrade = b""
        self._pending: tuple[bool, str] | None = None  # (keep-alive, version) of an immediate
        #: A later answer being made (``answer_later``), and whether to keep alive after it.
        self._later: asyncio.Task[None] | Pending | None = None
        self._later_keep_alive = False
        self._body = bytearray()
        self._head_bytes = 0  # bytes received since the head began (an upper bound)
        self._half_open = False
        self._default_src: list[tuple[bytes, bytes]] | None = None
        self._default_head = b""

    # --- the connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connections.add(self)  # type: ignore[arg-type]
        self.transport = transport
        self.out = Coalescing(transport, self.loop)
        self.flow = FlowControl(transport)
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        self._host = self.client[0] if self.client else ""
        self._trusted = self.immediate is not None and self.immediate.trusts(self.client)
        limits = self.limits
        self.deadlines = ReadDeadlines(
            self.loop,
            self._expired,
            header_timeout=limits.header_timeout,
            body_timeout=limits.body_timeout,
            keep_alive=self.config.timeout_keep_alive,
        )
        self._count_half_open()
        if self.limit is not None and len(self.connections) > self.limit:
            # Full: the address holding the most unfinished heads loses its oldest.
            victim = limits.half_open.oldest_of_the_greediest()
            if isinstance(victim, HttpProtocol) and victim is not self:
                victim.out.close()
                victim._uncount_half_open()
                # Its connection_lost comes a loop iteration later; a request already read
                # on this connection must not meet the cap (503) meanwhile.
                self.connections.discard(victim)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._uncount_half_open()
        self.deadlines.stop()
        if self._later is not None:
            self._later.cancel()  # the client has gone: the backend stops generating
        cycle = self.cycle
        if cycle is not None:
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.message_event.set()
        if self.flow is not None:
            self.flow.resume_writing()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]

    def eof_received(self) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, Refused):
                self._send_error(refused.status, str(refused), refused.code)
                return
            log.exception("error while reading a request")
            self._send_error(400, "Invalid HTTP request received.", "bad_request")
            return
        except httptools.HttpParserError:
            self._send_error(400, "Invalid HTTP request received.", "bad_request")
            return
        except httptools.HttpParserUpgrade:
            if self._upgrade != b"h2c":
                self._refuse_upgrade()
            return
        if self.deadlines.reading_headers and not self.transport.is_closing():
            # A head still incomplete: httptools keeps its pieces until they end, so its
            # size is checked here, as it arrives (this chunk may also hold what came
            # before the head: the count is an upper bound, off by less than one chunk).
            self._head_bytes += len(data)
            if self._head_bytes > 4 * self.limits.max_header_size:
                self._send_error(431, "the request's headers are too large", "headers_too_large")
                return
            if not self._half_open:
                self._count_half_open()

    def shutdown(self) -> None:
        """The server is stopping: close once the response in progress is sent."""
        if self._later is not None:
            self._later_keep_alive = False
        elif self.cycle is None or self.cycle.response_complete:
            self.out.close()
        else:
            self.cycle.keep_alive = False

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # --- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self._length = -1
        self._chunked = self._expect = self._forwarded = False
        self._upgrade = b""
        self._head_bytes = 0
        self.deadlines.request_started()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self._max_header_size:
            raise Refused(414, "the request's URL is too long", "url_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # llhttp keeps trailing whitespace, which RFC 9110 5.5 excludes from the value.
        value = value.rstrip(b" \t")
        headers = self.headers
        headers.append((name, value))
        if len(headers) > self._max_header_count:
            raise Refused(
                431,
                f"the request has more than {self._max_header_count} headers",
                "too_many_headers",
            )
        if len(name) + len(value) > self._max_header_size:
            raise Refused(431, "a request header is too large", "header_too_large")
        if name not in _NOTED:
            return
        if name == b"content-length":
            self._length = int(value) if value.isdigit() else -1
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                # nginx's rule: a coding the server does not apply cannot be ignored.
                raise Refused(
                    501,
                    f"Transfer-Encoding {value.decode('latin-1')!r} is not supported: "
                    "send the body as is or chunked",
                    "unsupported_transfer_encoding",
                )
            self._chunked = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expect = True
        elif name in _FORWARDED:
            self._forwarded = True
        elif name == b"upgrade":
            self._upgrade = value.lower()

    def on_headers_complete(self) -> None:
        self.deadlines.headers_read()
        self._uncount_half_open()
        parser = self.parser
        version = parser.get_http_version()
        keep_alive = version != "1.0" and parser.should_keep_alive()
        if parser.should_upgrade():
            if self._upgrade != b"h2c":
                raise Refused(400, _UPGRADE, "upgrade_not_supported")
            # An HTTP/2 offer (curl --http2): answered in HTTP/1.1, as nginx does; httptools
            # reads nothing after it on this connection, so it is closed after the answer.
            keep_alive = False
        cycle = self.cycle
        if (
            self.immediate is not None
            and self.url in self.immediate.paths
            and 0 <= self._length <= HIGH_WATER_LIMIT
            and parser.get_method() == b"POST"
            and not self._chunked
            and not self._expect  # the client waits for the app to ask for the body
            and (cycle is None or cycle.response_complete)
            and self._later is None
            and not self.flow.write_paused
        ):
            self._pending = (keep_alive, version)
            self._body.clear()
            return
        self._start_cycle(parser.get_method(), version, keep_alive)

    def on_body(self, body: bytes) -> None:
        if self._pending is not None:
            self._body += body
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        self.deadlines.request_read()
        pending = self._pending
        if pending is not None:
            self._pending = None
            self._answer_now(*pending)
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.more_body = False
        cycle.message_event.set()

    # --- answers -----------------------------------------------------------------------------

    def _answer_now(self, keep_alive: bool, version: str) -> None:
        assert self.immediate is not None
        body = bytes(self._body)
        client = self.client
        if self._trusted and self._forwarded:
            client = self.immediate.forwarded_client(client, self.headers)
        request = ImmediateRequest(self.immediate.paths[self.url], self.headers, body, client)
        try:
            answer = self.immediate.app.answer_now(request)
        except Exception:
            log.exception("answer_now failed on %s; the ASGI path takes it", request.path)
            answer = None
        if answer is None:
            later = self.immediate.later
            work = None
            if later is not None and (self.limit is None or len(self.tasks) < self.limit):
                request.reply = self._reply_later
                work = later(request)
            if work is not None:
                self._later_keep_alive = keep_alive
                if isinstance(work, CoroutineType):
                    self._later = task = self.loop.create_task(self._answer_later(work))
                    task.add_done_callback(self.tasks.discard)
                    self.tasks.add(task)  # the server's shutdown waits for it, as for a cycle
                else:
                    self._later = work = cast(Pending, work)
                    self.tasks.add(work)  # type: ignore[arg-type]  # held as a task: cancel()
                return
            self._start_cycle(b"POST", version, keep_alive, body, request.note)
            return
        head, payload = answer
        self._write(_OK, head, payload, keep_alive)
        self.server_state.total_requests += 1
        if not keep_alive:
            self.out.close()
        else:
            self.deadlines.idle()

    async def _answer_later(self, work: Coroutine[Any, Any, Later]) -> None:
        try:
            status, head, payload = await work
        except Exception:
            log.exception("answer_later failed")
            status, head = 500, b"content-type: application/json\r\n"
            payload = error_body("internal server error", "internal_error", "server_error")
        finally:
            self._later = None
        self._send_later(status, head, payload)

    def _reply_later(self, answer: Later | None) -> None:
        """``Pending`` work's answer (``request.reply``): written before anything else."""
        closing = self.transport.is_closing()
        if answer is not None and not closing:
            status, head, payload = answer
            self._write(STATUS_LINE[status], head, payload, self._later_keep_alive)
        work, self._later = self._later, None
        self.tasks.discard(work)
        if answer is None:
            self.out.close()
        elif not closing:
            self._sent_later()

    def _send_later(self, status: int, head: bytes, payload: bytes) -> None:
        if self.transport.is_closing():
            return
        self._write(STATUS_LINE[status], head, payload, self._later_keep_alive)
        self._sent_later()

    def _sent_later(self) -> None:
        """A later answer is written: close, or read on."""
        if not self._later_keep_alive:
            self.out.close()
        self.on_response_complete()

    def _write(self, status_line: bytes, head: bytes, payload: bytes, keep_alive: bool) -> None:
        """A whole response in one write: status, the server's headers, ``head``'s."""
        default = self.server_state.default_headers
        if default is not self._default_src:  # uvicorn makes a new list each second (date)
            self._default_src = default
            self._default_head = b"".join(b"%s: %s\r\n" % pair for pair in default)
        self.out.write_now(
            b"".join(
                (
                    status_line,
                    self._default_head,
                    head,
                    b"content-length: %d\r\n" % len(payload),
                    b"\r\n" if keep_alive else b"connection: close\r\n\r\n",
                    payload,
                )
            )
        )

    def _start_cycle(
        self,
        method: bytes,
        version: str,
        keep_alive: bool,
        body: bytes | None = None,
        note: Any = None,
    ) -> None:
        """Hand the request to the ASGI app, as uvicorn would (after those before it)."""
        parsed = httptools.parse_url(self.url)
        raw_path = parsed.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root_path = self.config.root_path
        scope: HTTPScope = {
            "type": "http",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.3"},
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": method.decode("ascii"),
            "root_path": root_path,
            "path": root_path + path,
            "raw_path": root_path.encode("ascii") + raw_path,
            "query_string": parsed.query or b"",
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        if note is not None:
            scope[NOTE] = note  # type: ignore
        app = self.app
        if self.limit is not None and (
            len(self.connections) > self.limit or len(self.tasks) >= self.limit
        ):
            app = _server_full
            log.warning("at the connection limit (%d): 503", self.limit)
        existing = self.cycle
        self.cycle = cycle = RequestResponseCycle(
            scope=scope,
            transport=self.out,  # type: ignore[arg-type]
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self._expect,
            keep_alive=keep_alive,
            on_response=self.on_response_complete,
        )
        if body is not None:
            cycle.body = bytearray(body)
            cycle.more_body = False
            cycle.message_event.set()
        if (existing is None or existing.response_complete) and self._later is None:
            self._start_task(cycle, app)
        else:  # pipelined behind a response still in progress
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def _start_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_response_complete(self) -> None:
        """The ASGI cycle's callback once its response is sent."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_task(cycle, app)
        else:
            self.deadlines.idle()

    # --- limits --------------------------------------------------------------------------------

    def _expired(self, what: Expired) -> None:
        if self.transport.is_closing():
            return
        if what == "body":
            cycle = self.cycle
            if self._pending is not None or (cycle is not None and not cycle.response_started):
                # Closing tells an app waiting for the body that the client is gone.
                self._send_error(408, "the request body was not received in time", "timeout")
                return
        self.out.close()  # no headers: nobody to answer; idle: keep-alive is over

    def _count_half_open(self) -> None:
        self.limits.half_open.add(self._host, self)
        self._half_open = True

    def _uncount_half_open(self) -> None:
        if self._half_open:
            self._half_open = False
            self.limits.half_open.discard(self._host, self)

    def _refuse_upgrade(self) -> None:
        self._send_error(400, _UPGRADE, "upgrade_not_supported")

    def _send_error(self, status: int, message: str, code: str) -> None:
        if self.transport.is_closing():
            return
        body = error_body(message, code)
        head = [STATUS_LINE[status]]
        head += [b"%s: %s\r\n" % pair for pair in self.server_state.default_headers]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.out.write_now(b"".join(head) + body)
        self.out.close()


_UPGRADE = "protocol upgrades (WebSocket) are not supported"


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}
    ).encode()


async def _server_full(scope: Any, receive: Any, send: Any) -> None:
    body = error_body(
        "the server is at its connection limit: try again shortly",
        "server_busy",
        "server_error",
    )
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        (b"retry-after", b"1"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
