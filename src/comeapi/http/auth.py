"""API-key authentication as a plain ASGI middleware: ``Authorization: Bearer <key>``.

The rule (which keys, how they are compared, the 401's body) is ``protocol.auth``'s, the
same as the Lambda handler's; this module finds the header in an ASGI request and lets the
public paths (``/health``) through. With no keys configured every request passes.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Collection, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from comeapi.errors import AuthenticationError
from comeapi.http.errors import error_response
from comeapi.protocol.auth import BearerKeys

PUBLIC_PATHS = frozenset({"/health"})


class APIKeys:
    """The configured keys with the paths that need none; ``check`` answers for middleware
    and the gateway's generation routes alike."""

    def __init__(self, keys: Iterable[str], *, public: Collection[str] = PUBLIC_PATHS):
        self.rule = BearerKeys(keys)
        self.public = frozenset(public)

    def __bool__(self) -> bool:
        return bool(self.rule)

    def check(self, scope: Scope) -> AuthenticationError | None:
        """None when the request may pass, else the error to answer with."""
        if not self.rule:
            return None
        return self.check_headers(scope["path"], scope["headers"])

    def check_headers(
        self, path: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> AuthenticationError | None:
        """``check`` for a request known by its path and raw headers."""
        if not self.rule or path in self.public:
            return None
        return self.rule.check(_authorization(headers))


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
        await error_response(error)(scope, receive, send)  # with WWW-Authenticate


def _authorization(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            return value
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
