"""Is this API key right: the one rule of every tier that takes keys (the gateway and the
backend through ``http.auth``, the Lambda handler; nginx's map in deploy/nginx is held to it
by the conformance table's key rows).

A request carries its key as ``Authorization: Bearer <key>`` (the scheme in any case, spaces
around the key ignored). Keys are compared as SHA-256 digests with ``hmac.compare_digest``
against every configured key, so timing says nothing about a key's content or which key
almost matched. No keys configured: everyone is let in.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from comeapi.errors import AuthenticationError

# OpenAI's wording, so that clients show what they show for OpenAI's own 401s.
MISSING_KEY = "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
WRONG_KEY = "Incorrect API key provided."


class BearerKeys:
    """The accepted keys; ``check`` is the whole rule."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(key.encode()) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: bytes | str | None) -> AuthenticationError | None:
        """None when a request with this ``Authorization`` header value (None: no header)
        may pass, else the error to answer with (401, ``WWW-Authenticate: Bearer``)."""
        if not self._digests:
            return None
        token = bearer_token(authorization)
        if token is None:
            return AuthenticationError(MISSING_KEY, code="missing_api_key")
        digest = _digest(token)
        matched = False
        for known in self._digests:  # no early exit: every key costs the same
            matched |= hmac.compare_digest(digest, known)
        return None if matched else AuthenticationError(WRONG_KEY)


def bearer_token(authorization: bytes | str | None) -> bytes | None:
    """The key of an ``Authorization`` header value; None when there is no bearer key."""
    if authorization is None:
        return None
    # As the configured keys are encoded; surrogatepass: an event's JSON may hold any text.
    value = (
        authorization.encode("utf-8", "surrogatepass")
        if isinstance(authorization, str)
        else authorization
    )
    scheme, _, token = value.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() == b"bearer" and token:
        return token
    return None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()
