"""CORS for browser pages: Starlette's CORSMiddleware with comeapi's policy.

Nothing is allowed by default: without configured origins the middleware is not installed
at all, so the gateway's cache-hit path does not pay for it. It sits in front of the API-key
check, because a browser sends its preflight (OPTIONS with Access-Control-Request-Method)
without credentials: the preflight is answered here, and every actual answer (a cache hit, a
stream, a 401 or any other error) gets Access-Control-Allow-Origin on its way out.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware import cors as starlette_cors
from starlette.responses import Response

from comeapi.errors import RequestError
from comeapi.http.responses import JSONResponse

ALLOW_METHODS = ("GET", "POST")
# Any header the page asks for is allowed back (the answer names exactly the requested ones):
# besides Authorization and Content-Type, OpenAI's JavaScript client sends X-Stainless-*
# headers, and a fixed list would break it at every new one.
ALLOW_HEADERS = ("*",)
# Headers a page may read: which answer the cache gave, and when to come back after a 503.
EXPOSE_HEADERS = ("X-Cache", "X-Cache-Variant", "Retry-After")


class CORSMiddleware(starlette_cors.CORSMiddleware):
    """Starlette's middleware; a refused preflight is a 400 in OpenAI's error shape."""

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
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=ALLOW_METHODS,
            allow_headers=ALLOW_HEADERS,
            expose_headers=EXPOSE_HEADERS,
        )
    ]
