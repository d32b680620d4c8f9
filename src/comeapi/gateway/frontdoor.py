"""The gateway's front door: a generation request's raw body -> the validated request, its
answer format and its cache key, remembered for the bodies that hit.

A body means the same thing every time it is sent: its verdict depends on the route, the
bytes and ``max_tokens_limit``, and its key also on the default model (which a store reload
may change, so it is kept beside the key and checked). So the bodies that found a stored
answer are kept, a bounded number of them, and the next identical body skips the JSON
parse, the validation, the normalisation and the hash. An invalid body is never kept: it is
parsed again and refused again (400) whatever the cache holds.
"""

from __future__ import annotations

from typing import NamedTuple

from comeapi.cache.replies import AnswerFormat
from comeapi.gateway.cache import ResponseCache
from comeapi.protocol.requests import KINDS, GenerationRequest, decode_json, parse_request

#: Bodies kept, and the largest kept: at most 4 MiB of bodies (a known prompt in many byte
#: forms still fits; anything else only costs a parse, as without this).
REMEMBERED_BODIES = 1024
REMEMBERED_BODY_BYTES = 4096


class Prepared(NamedTuple):
    """A validated request with what the hit path needs of it. ``key`` is None when no
    stored answer can fit the request (``cache.key.uncacheable``)."""

    request: GenerationRequest
    format: AnswerFormat
    key: str | None
    default_model: str  # the default model ``key`` was made with


class FrontDoor:
    """Parses generation bodies once per distinct body that hits."""

    def __init__(self, max_tokens_limit: int, *, size: int = REMEMBERED_BODIES):
        self.max_tokens_limit = max_tokens_limit
        self.size = size
        self._known: dict[tuple[str, bytes], Prepared] = {}

    def prepare(self, path: str, body: bytes, cache: ResponseCache | None) -> Prepared:
        """The verdict on ``body`` sent to ``path`` (a generation route); RequestError for a
        body that is not a valid request."""
        known = self._known.get((path, body))
        if known is not None and (cache is None or known.default_model == cache.default_model):
            return known
        request = parse_request(
            KINDS[path], decode_json(body), max_tokens_limit=self.max_tokens_limit
        )
        if cache is None:
            return Prepared(request, AnswerFormat.of(request), None, "")
        key = cache.key_of(request)
        return Prepared(request, AnswerFormat.of(request), key, cache.default_model)

    def remember(self, path: str, body: bytes, prepared: Prepared) -> None:
        """Keep the verdict on a body that hit (the oldest kept is dropped when full)."""
        if len(body) > REMEMBERED_BODY_BYTES or (path, body) in self._known:
            return
        if len(self._known) >= self.size:
            del self._known[next(iter(self._known))]
        self._known[(path, body)] = prepared
