"""CORS for browser pages: Starlette's CORSMiddleware with comeapi's policy.

Nothing is allowed by default: without configured origins the middleware is not installed
at all, so the gateway's cache-hit path does not pay for it. It sits in front of the API-key
check (on the gateway, in front of its generation routes: ``gateway.app.CORSGateway``),
because a browser sends its preflight (OPTIONS with Access-Control-Request-Method) without
credentials: the preflight is answered here, and every actual answer (a cache hit, a stream,
a 401 or any other error) gets Access-Control-Allow-Origin on its way out.

Starlette answers the preflight and decides which origins are allowed. The headers of actual
answers are added here, pre-encoded: Starlette's way (MutableHeaders, which scans and
rebuilds the header list for every header set) adds 17-25 us of CPU to a 22 us cache hit,
this way 2-7 us (``python benchmarks/cors_overhead.py``, docs/balancer.md).
``tests/http/test_cors.py`` checks these headers against Starlette's own for each case.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware import cors as starlette_cors
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comeapi.errors import RequestError
from comeapi.http.responses import JSONResponse

ALLOW_METHODS = ("GET", "POST")
# Any header the page asks for is allowed back (the answer names exactly the requested ones):
# besides Authorization and Content-Type, OpenAI's JavaScript client sends X-Stainless-*
# headers, and a fixed list would break it at every new one.
ALLOW_HEADERS = ("*",)
# Headers a page may read: which answer the cache gave, and when to come back after a 503.
EXPOSE_HEADERS = ("X-Cache", "X-Cache-Variant", "Retry-After")

RawHeaders = list[tuple[bytes, bytes]]


class CORSMiddleware(starlette_cors.CORSMiddleware):
    """Starlette's middleware with pre-encoded headers on actual answers; a refused
    preflight is a 400 in OpenAI's error shape."""

    def __init__(
        self,
        app: ASGIApp,
        allow_origins: Collection[str] = (),
        allow_methods: Collection[str] = ALLOW_METHODS,
        allow_headers: Collection[str] = ALLOW_HEADERS,
        expose_headers: Collection[str] = EXPOSE_HEADERS,
    ) -> None:
        super().__init__(
            app,
            allow_origins=allow_origins,
            allow_methods=allow_methods,
            allow_headers=allow_headers,
            expose_headers=expose_headers,
        )
        encoded = [(k.lower().encode(), v.encode()) for k, v in self.simple_headers.items()]
        self._no_origin: RawHeaders = [(b"vary", b"Origin")]
        self._origin: RawHeaders = [*encoded, (b"vary", b"Origin")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin: bytes | None = None
        preflight = False
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                preflight = True
        if origin is not None and preflight and scope["method"] == "OPTIONS":
            response = self.preflight_response(request_headers=Headers(scope=scope))
            await response(scope, receive, send)
            return
        extra = self._answer_headers(origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _answer_headers(self, origin: bytes | None) -> RawHeaders:
        """What Starlette's ``send`` adds for this Origin (none: not a cross-origin call)."""
        if origin is None:
            return self._no_origin
        if not self.allow_all_origins and self.is_allowed_origin(origin.decode("latin-1")):
            return [(b"access-control-allow-origin", origin), *self._origin]
        return self._origin  # with "*" it holds Access-Control-Allow-Origin: *

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        error = RequestError(
            f"CORS preflight refused: this {refused} is not allowed (see --cors-origin)",
            code="cors_not_allowed",
        )
        headers = {k: v for k, v in response.headers.items() if k.startswith(("access-", "vary"))}
        return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


def cors_middleware(origins: Collection[str]) -> list[Middleware]:
    """The CORS layer for ``origins`` (``*``: any), or nothing when there are none."""
    if not origins:
        return []
    return [Middleware(CORSMiddleware, allow_origins=list(origins))]
