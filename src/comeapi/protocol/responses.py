"""Response bodies and server-sent events in ComeAPI's and OpenAI's formats.

A generation, live or cached, is one or more choices, each a sequence of text pieces (with
their tokens' log probabilities when asked) and a finish reason; the same encoder turns it
into a JSON body or SSE chunks, so cached and live answers look alike. ``read_answer`` is
the one reader of such a body coming back from a backend.
"""

from __future__ import annotations

import functools
import json
import random
import re
import time
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token of a choice with its log probability and the most likely alternatives.

    ``logprob`` is None for a prompt's first token (nothing precedes it); ``offset`` is where
    the token's text starts in the choice's text, in characters (completions' text_offset).
    """

    token: str
    raw: bytes  # the token's bytes (OpenAI's "bytes"): a token may hold part of a character
    logprob: float | None
    top: tuple[tuple[str, bytes, float], ...] = ()
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Choice:
    """One finished choice of an answer."""

    index: int
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What a backend answered, read once from its JSON body (or from a stream's last event,
    which carries the usage). None where the body does not say, or not in the right type."""

    text: str | None  # the first choice's text (ComeAPI's "response")
    finish_reason: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def read_answer(kind: Kind | None, body: bytes) -> Answer | None:
    """The answer in ``body``, a backend's JSON answer to a request of ``kind`` (None: read
    only the model and the usage); None when ``body`` is not a JSON object."""
    try:
        doc = _loads()(body)
    except ValueError:  # orjson.JSONDecodeError and json's are both ValueErrors
        return None
    if not isinstance(doc, dict):
        return None
    text = finish = None
    if kind == "generate":
        text, finish = doc.get("response"), doc.get("finish_reason")
    elif kind is not None:
        choices = doc.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if isinstance(choice, dict):
            finish = choice.get("finish_reason")
            if kind == "completion":
                text = choice.get("text")
            elif isinstance(message := choice.get("message"), dict):
                text = message.get("content")
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    model = doc.get("model")
    return Answer(
        text=text if isinstance(text, str) else None,
        finish_reason=finish if isinstance(finish, str) else None,
        model=model if isinstance(model, str) and model else None,
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def new_id(kind: Kind) -> str:
    # Unique, not secret: 128 random bits without uuid4's system call and UUID object.
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + f"{random.getrandbits(128):032x}"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _dumps()(payload) + b"\n\n"


def json_bytes(payload: dict[str, Any]) -> bytes:
    """``payload`` as compact UTF-8 JSON, as every answer body is encoded."""
    return _dumps()(payload)


@functools.cache
def _dumps() -> Callable[[Any], bytes]:
    """orjson where installed; the Lambda package ships without it (cold start), so json."""
    try:
        import orjson
    except ImportError:
        return lambda obj: json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return orjson.dumps


@functools.cache
def _loads() -> Callable[[bytes], Any]:
    try:
        import orjson
    except ImportError:
        return json.loads
    return orjson.loads


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
    """The non-streaming answer body for ``kind`` with one choice and no log probabilities."""
    choice = Choice(0, text, finish_reason)
    return answer_body(kind, model=model, choices=[choice], usage=usage, id=id, created=created)


def answer_body(
    kind: Kind,
    *,
    model: str,
    choices: Sequence[Choice],
    usage: Usage,
    id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    """The non-streaming answer body for ``kind``: ``choices`` in index order."""
    if kind == "generate":
        return {
            "response": choices[0].text,
            "model": model,
            "finish_reason": choices[0].finish_reason,
            "usage": usage.to_dict(),
        }
    head = {
        "id": id or new_id(kind),
        "created": created or int(time.time()),
        "model": model,
    }
    if kind == "completion":
        items = [
            {
                "text": c.text,
                "index": c.index,
                "logprobs": completion_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ]
        return {**head, "object": "text_completion", "choices": items, "usage": usage.to_dict()}
    items = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": chat_logprobs(c.logprobs),
            "finish_reason": c.finish_reason,
        }
        for c in choices
    ]
    return {**head, "object": "chat.completion", "choices": items, "usage": usage.to_dict()}


def chat_logprobs(tokens: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs``: ``content`` holds one entry per token."""
    if tokens is None:
        return None
    content = [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": list(t.raw),
            "top_logprobs": [
                {"token": token, "logprob": logprob, "bytes": list(raw)}
                for token, raw, logprob in t.top
            ],
        }
        for t in tokens
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI's (legacy) completions ``logprobs``: parallel lists, alternatives as a map."""
    if tokens is None:
        return None
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [
            None if t.logprob is None else {token: lp for token, _, lp in t.top} for t in tokens
        ],
        "text_offset": [t.offset for t in tokens],
    }


class StreamEncoder:
    """SSE chunks for one streamed answer: ``start()`` per choice, ``delta()`` per piece,
    ``stop()`` per choice, then ``end()``; ``finish()`` is ``stop()`` + ``end()`` for an
    answer of one choice."""

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

    def start(self, index: int = 0) -> bytes:
        """Chat streams open each choice with the assistant role, as OpenAI's do; others
        send nothing."""
        if self.kind != "chat":
            return b""
        return self._chunk({"role": "assistant", "content": "", "refusal": None}, None, index)

    def delta(
        self, text: str, index: int = 0, logprobs: Sequence[TokenLogprob] | None = None
    ) -> bytes:
        """A piece of choice ``index``'s text, with its tokens' log probabilities if asked
        (``logprobs`` is None when they were not)."""
        if self.kind == "generate":
            return sse({"response": text, "model": self.model})
        if self.kind == "completion":
            return self._chunk(text, None, index, completion_logprobs(logprobs))
        return self._chunk({"content": text}, None, index, chat_logprobs(logprobs))

    def answer(self, text: str, finish_reason: str, usage: Usage) -> bytes:
        """A whole stream for a finished answer (a cached one): the same chunks on every
        tier that serves it."""
        pieces = [self.start()]
        pieces += [self.delta(piece) for piece in _PIECES.findall(text)]
        pieces.append(self.finish(finish_reason, usage))
        return b"".join(pieces)

    def finish(self, finish_reason: str, usage: Usage) -> bytes:
        return self.stop(finish_reason) + self.end(usage, finish_reason)

    def stop(self, finish_reason: str, index: int = 0) -> bytes:
        """The last chunk of choice ``index``: its finish reason."""
        if self.kind == "generate":
            return b""  # ComeAPI's stream says it in its last object (end())
        return self._chunk("" if self.kind == "completion" else {}, finish_reason, index)

    def end(self, usage: Usage, finish_reason: str = "stop") -> bytes:
        """After every choice stopped: the usage chunk if asked, and ``[DONE]``."""
        if self.kind == "generate":
            last = {
                "response": "",
                "model": self.model,
                "done": True,
                "finish_reason": finish_reason,
                "usage": usage.to_dict(),
            }
            return sse(last) + DONE
        out = b""
        if self.include_usage:
            out = sse({**self._head, "choices": [], "usage": usage.to_dict()})
        return out + DONE

    def _chunk(
        self, delta: Any, finish_reason: str | None, index: int, logprobs: Any = None
    ) -> bytes:
        if self.kind == "completion":
            choice = {
                "text": delta,
                "index": index,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        chunk = {**self._head, "choices": [choice]}
        if self.include_usage:  # OpenAI: every chunk has "usage", null until the last one
            chunk["usage"] = None
        return sse(chunk)
