"""API-key authentication as a plain ASGI middleware: ``Authorization: Bearer <key>``.

With no keys configured every request passes. Keys are compared as SHA-256 digests with
``hmac.compare_digest`` against every key, so timing says nothing about a key's content or
which key almost matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Collection, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from comeapi.errors import AuthenticationError
from comeapi.http.responses import JSONResponse

PUBLIC_PATHS = frozenset({"/health"})


class APIKeys:
    """The configured bearer keys; ``check`` is the whole rule, for middleware and the
    gateway's generation routes alike."""

    def __init__(self, keys: Iterable[str], *, public: Collection[str] = PUBLIC_PATHS):
        self._digests = [_digest(key.encode()) for key in keys]
        self.public = frozenset(public)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, scope: Scope) -> AuthenticationError | None:
        """None when the request may pass, else the error to answer with."""
        if not self._digests:
            return None
        return self.check_headers(scope["path"], scope["headers"])

    def check_headers(
        self, path: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> AuthenticationError | None:
        """``check`` for a request known by its path and raw headers."""
        if not self._digests or path in self.public:
            return None
        token = _bearer_token(headers)
        if token is None:
            return AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        if self._accepts(token):
            return None
        return AuthenticationError("Incorrect API key provided.")

    def _accepts(self, token: bytes) -> bool:
        digest = _digest(token)
        matched = False
        for known in self._digests:  # no early exit: every key costs the same
            matched |= hmac.compare_digest(digest, known)
        return matched


def auth_error_response(error: AuthenticationError) -> JSONResponse:
    return JSONResponse(
        error.to_dict(), status_code=error.status, headers={"WWW-Authenticate": "Bearer"}
    )


class APIKeyMiddleware:
    def __init__(
        self, app: ASGIApp, keys: Iterable[str], *, public: Collection[str] = PUBLIC_PATHS
    ):
        self.app = app
        self.keys = APIKeys(keys, public=public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = self.keys.check(scope) if scope["type"] == "http" else None
        if error is None:
            await self.app(scope, receive, send)
            return
        await auth_error_response(error)(scope, receive, send)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def warn_if_open(host: str, keys: Collection[str], log: logging.Logger) -> None:
    """Log a warning when a server listens beyond loopback without keys."""
    if not keys and not _is_loopback(host):
        log.warning(
            "listening on %s without API keys: anyone who can reach this port can use it "
            "(set --api-key or COMEAPI_API_KEYS)",
            host,
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
