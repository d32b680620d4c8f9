"""The Lambda handler over plain HTTP on a laptop: each request becomes an HTTP API (payload
v2) event, as API Gateway would send it, and the handler's result becomes the response.

A development tool (``comeapi aws serve-local``), standard library only. Like one warm Lambda
container it runs one invocation at a time; like Lambda it refuses bodies over 6 MB.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from comeapi.errors import PayloadTooLargeError, RequestError
from comeapi.serverless.events import http_api_event

log = logging.getLogger(__name__)

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024  # Lambda's limit for a synchronous invocation


class LocalContext:
    """The few attributes of a Lambda context object that handlers read."""

    def __init__(self, function_name: str = "comeapi-local", timeout: float = 29.0):
        self.function_name = function_name
        self.function_version = "$LATEST"
        self.memory_limit_in_mb = 512
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class LocalApiGateway(ThreadingHTTPServer):
    """An HTTP server on ``(host, port)`` that invokes ``handler`` per request."""

    daemon_threads = True

    def __init__(
        self,
        handler: LambdaHandler,
        host: str = "127.0.0.1",
        port: int = 3000,
        *,
        max_payload: int = MAX_PAYLOAD_BYTES,
    ):
        self.lambda_handler = handler
        self.max_payload = max_payload
        self.invoke_lock = threading.Lock()
        super().__init__((host, port), _RequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _RequestHandler(BaseHTTPRequestHandler):
    server: LocalApiGateway
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._invoke()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _invoke(self) -> None:
        started = time.perf_counter()
        path, _, query = self.path.partition("?")
        try:
            body = self._read_body()
        except (PayloadTooLargeError, RequestError) as exc:
            self.close_connection = True
            self._send(exc.status, {"Content-Type": "application/json"}, json.dumps(exc.to_dict()))
            return
        event = http_api_event(
            self.command,
            path,
            query=query,
            headers=dict(self.headers.items()),
            body=body,
            source_ip=self.client_address[0],
        )
        with self.server.invoke_lock:
            result = self.server.lambda_handler(event, LocalContext())
        text = result.get("body") or ""
        payload = base64.b64decode(text) if result.get("isBase64Encoded") else text.encode()
        status = int(result.get("statusCode", 200))
        self._send(status, dict(result.get("headers") or {}), payload)
        log.info(
            "%s %s %d %.1f ms", self.command, path, status, (time.perf_counter() - started) * 1e3
        )

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError("chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError("bad Content-Length") from None
        if length > self.server.max_payload:
            raise PayloadTooLargeError(
                f"request body of {length} bytes is over Lambda's {self.server.max_payload}"
            )
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, headers: dict[str, str], payload: bytes | str) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def serve(handler: LambdaHandler, host: str = "127.0.0.1", port: int = 3000) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM's KeyboardInterrupt)."""
    with LocalApiGateway(handler, host, port) as server:
        log.info("serving the Lambda handler on %s (payload v2 events)", server.url)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever(poll_interval=0.2)
