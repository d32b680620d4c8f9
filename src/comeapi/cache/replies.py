"""A stored answer as the client gets it, the same on every tier that serves it (the gateway
and the Lambda handler call ``HitReply``; nginx replays the gateway's bytes), and a backend's
answer (``protocol.responses.read_answer``) made into a stored one (``entry_from_answer``).

A hit is encoded once per stored answer and answer format: the body is kept as a template
whose only holes are OpenAI's ``id`` and ``created`` (ComeAPI's /generate has neither, so its
body is the template), and each reply fills them with a fresh id and the current second.
"""

from __future__ import annotations

import random
import time
from typing import Any, NamedTuple

from comeapi.cache.store import Entry
from comeapi.protocol.requests import GenerationRequest, Kind
from comeapi.protocol.responses import Answer, StreamEncoder, Usage, full_body, json_bytes

JSON = "application/json"
SSE = "text/event-stream"
# Placeholders the body is encoded with, then cut out. The structural text around them
# ("id":"...", "created":...) cannot occur inside a JSON string, where every quote is escaped.
_ID_MARK = "comeapi-id-placeholder"
_CREATED_MARK = 1000000000123456789
_ID_NEEDLE = b'"id":"' + _ID_MARK.encode() + b'"'
_CREATED_NEEDLE = b'"created":' + str(_CREATED_MARK).encode()
_ID_PREFIX = {"chat": b'"id":"chatcmpl-', "completion": b'"id":"cmpl-', "generate": b""}


class AnswerFormat(NamedTuple):
    """What decides a hit's bytes besides the stored answer."""

    kind: Kind
    stream: bool
    include_usage: bool

    @classmethod
    def of(cls, request: GenerationRequest) -> AnswerFormat:
        return cls(request.kind, request.stream, request.stream and request.include_usage)


class HitReply:
    """One stored answer encoded in one ``AnswerFormat``: status 200, ``headers`` (framing
    such as Content-Length is the HTTP server's), and ``body()`` with a fresh id each call."""

    __slots__ = ("_holes", "_id_prefix", "_template", "entry", "format", "head", "headers")

    def __init__(self, fmt: AnswerFormat, entry: Entry):
        self.format = fmt
        self.entry = entry
        usage = Usage(entry.prompt_tokens, entry.completion_tokens)
        if fmt.stream:
            encoder = StreamEncoder(
                fmt.kind,
                entry.model,
                include_usage=fmt.include_usage,
                id=_ID_MARK,
                created=_CREATED_MARK,
            )
            body = encoder.answer(entry.answer, entry.finish_reason, usage)
        else:
            doc = full_body(
                fmt.kind,
                model=entry.model,
                text=entry.answer,
                finish_reason=entry.finish_reason,
                usage=usage,
                id=_ID_MARK,
                created=_CREATED_MARK,
            )
            doc["variant"] = entry.variant
            body = json_bytes(doc)
        # The template is a %-format: one %s per hole, the body's own % doubled. Every
        # object with an id has its created after it, so the holes alternate id, created.
        segments = body.replace(b"%", b"%%").split(_ID_NEEDLE)
        pieces = [segments[0]]
        for segment in segments[1:]:
            before, created, after = segment.partition(_CREATED_NEEDLE)
            if not created or _CREATED_NEEDLE in after:
                raise ValueError("a hit's body must hold one created after each id")
            pieces += (before, after)
        if _CREATED_NEEDLE in segments[0]:
            raise ValueError("a hit's body must hold one created after each id")
        self._holes = 2 * (len(segments) - 1)
        self._template = b"%s".join(pieces) if self._holes else body
        self._id_prefix = _ID_PREFIX[fmt.kind]
        headers = [("Content-Type", SSE if fmt.stream else JSON), ("X-Cache", "HIT")]
        headers.append(("X-Cache-Variant", str(entry.variant)))
        headers.append(("X-Cache-Match", "exact"))  # a similar hit says so instead
        if fmt.stream:
            headers.append(("Cache-Control", "no-cache"))
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)
        #: The headers as HTTP/1.1 header lines (lower-case names, as uvicorn writes them).
        self.head = b"".join(f"{n.lower()}: {v}\r\n".encode("latin-1") for n, v in headers)

    def body(self) -> bytes:
        """The answer's bytes, with a new id and the current time where the format has them."""
        if not self._holes:
            return self._template
        # Unique, not secret (as protocol.responses.new_id): 128 random bits.
        stamp = (
            b'%s%032x"' % (self._id_prefix, random.getrandbits(128)),
            b'"created":%d' % int(time.time()),
        )
        return self._template % (stamp * (self._holes // 2))


class Replies:
    """A ``HitReply`` per stored answer and format, made on first use and made again when
    the answer is replaced; at most ``size`` are kept (all dropped at once past that)."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._made: dict[tuple[str, int, AnswerFormat], HitReply] = {}

    def get(self, entry: Entry, fmt: AnswerFormat) -> HitReply:
        slot = (entry.key, entry.variant, fmt)
        reply = self._made.get(slot)
        if reply is None or reply.entry is not entry:
            if len(self._made) >= self.size:
                self._made.clear()
            reply = self._made[slot] = HitReply(fmt, entry)
        return reply


def entry_from_answer(
    key: str, variant: int, model: str, request: GenerationRequest, answer: Answer | None
) -> Entry | None:
    """An Entry from a backend's answer to ``request`` (``read_answer``), or None when it
    holds no text."""
    messages = None
    if request.messages is not None:
        messages = tuple((m.role, m.content) for m in request.messages)
        prompt = next((c for r, c in reversed(messages) if r == "user"), messages[-1][1])
    else:
        assert request.prompt is not None
        prompt = request.prompt
    params: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_k": request.top_k,
        "top_p": request.top_p,
        "seed": request.seed if request.seed is not None else variant,
    }
    return Entry.from_answer(
        answer,
        key=key,
        variant=variant,
        kind="chat" if messages is not None else "prompt",
        prompt=prompt.strip(),
        messages=messages,
        model=model,  # the model the key was made with, whatever the backend calls it
        params={k: v for k, v in params.items() if v is not None},
    )
