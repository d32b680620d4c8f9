"""Response bodies and server-sent events in ComeAPI's and OpenAI's formats.

A generation, live or cached, is a sequence of text pieces and a finish reason; the same
encoder turns it into a JSON body or SSE chunks, so cached and live answers look alike.
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from comeapi.errors import ComeapiError

if TYPE_CHECKING:
    from comeapi.protocol.requests import Kind

DONE = b"data: [DONE]\n\n"
# How a cached answer is cut into stream chunks: about one word (a token or two) each, so a
# client's streaming code sees what a live stream would send.
_PIECES = re.compile(r"\s*\S{1,4}|\s+$")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def new_id(kind: Kind) -> str:
    # Unique, not secret: 128 random bits without uuid4's system call and UUID object.
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + f"{random.getrandbits(128):032x}"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps()(payload) + b"\n\n"


@functools.cache
def _dumps() -> Callable[[Any], bytes]:
    """orjson where installed; the Lambda package ships without it (cold start), so json."""
    try:
        import orjson
    except ImportError:
        return lambda obj: json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return orjson.dumps


def sse_error(exc: ComeapiError) -> bytes:
    """An error after the stream started: the status line is gone, so it travels as an event."""
    return sse(exc.to_dict()) + DONE


def full_body(
    kind: Kind,
    *,
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage,
    id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """The non-streaming answer body for ``kind``."""
    if kind == "generate":
        return {
            "response": text,
            "model": model,
            "finish_reason": finish_reason,
            "usage": usage.to_dict(),
        }
    head = {
        "id": id or new_id(kind),
        "created": created or int(time.time()),
        "model": model,
    }
    if kind == "completion":
        choice: dict[str, Any] = {
            "text": text,
            "index": 0,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return {**head, "object": "text_completion", "choices": [choice], "usage": usage.to_dict()}
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    return {**head, "object": "chat.completion", "choices": [choice], "usage": usage.to_dict()}


class StreamEncoder:
    """SSE chunks for one streamed answer: ``start()``, ``delta()`` per piece, ``finish()``."""

    __slots__ = ("_head", "include_usage", "kind", "model")

    def __init__(
        self,
        kind: Kind,
        model: str,
        *,
        include_usage: bool = False,
        id: str | None = None,
        created: int | None = None,
    ):
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._head: dict[str, Any] = {
            "id": id or new_id(kind),
            "object": obj,
            "created": created or int(time.time()),
            "model": model,
        }

    def start(self) -> bytes:
        """Chat streams open with the assistant role, as OpenAI's do; others send nothing."""
        if self.kind != "chat":
            return b""
        return self._chunk({"role": "assistant", "content": "", "refusal": None}, None)

    def delta(self, text: str) -> bytes:
        if self.kind == "generate":
            return sse({"response": text, "model": self.model})
        if self.kind == "completion":
            return self._chunk(text, None)
        return self._chunk({"content": text}, None)

    def answer(self, text: str, finish_reason: str, usage: Usage) -> bytes:
        """A whole stream for a finished answer (a cached one): the same chunks on every
        tier that serves it."""
        pieces = [self.start()]
        pieces += [self.delta(piece) for piece in _PIECES.findall(text)]
        pieces.append(self.finish(finish_reason, usage))
        return b"".join(pieces)

    def finish(self, finish_reason: str, usage: Usage) -> bytes:
        if self.kind == "generate":
            last = {
                "response": "",
                "model": self.model,
                "done": True,
                "finish_reason": finish_reason,
                "usage": usage.to_dict(),
            }
            return sse(last) + DONE
        out = self._chunk("" if self.kind == "completion" else {}, finish_reason)
        if self.include_usage:
            out += sse({**self._head, "choices": [], "usage": usage.to_dict()})
        return out + DONE

    def _chunk(self, delta: Any, finish_reason: str | None) -> bytes:
        if self.kind == "completion":
            choice = {"text": delta, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head, "choices": [choice]}
        if self.include_usage:  # OpenAI: every chunk has "usage", null until the last one
            chunk["usage"] = None
        return sse(chunk)
