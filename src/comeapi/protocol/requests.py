"""Parse and validate generation requests: ComeAPI's /generate and OpenAI's two endpoints.

All three become one ``GenerationRequest``. Invalid input raises ``RequestError`` naming the
offending field (``param``), so every server answers bad input the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from comeapi.errors import RequestError

Kind = Literal["generate", "completion", "chat"]
KINDS: dict[str, Kind] = {
    "/generate": "generate",
    "/v1/completions": "completion",
    "/v1/chat/completions": "chat",
}


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One validated request. ``prompt`` is set for generate/completion, ``messages`` for chat."""

    kind: Kind
    prompt: str | None
    messages: tuple[Message, ...] | None
    model: str | None
    max_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool = False


NonNegFloat = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Body(BaseModel):
    # Clients send fields we do not use (user, presence_penalty, ...): ignore them, but
    # never coerce types: "5" is not a number.
    model_config = ConfigDict(extra="ignore", strict=True)

    temperature: NonNegFloat
    top_k: Annotated[int, Field(ge=0)]
    top_p: TopP
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (len(value) > 4 or any(not s for s in value)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class _GenerateBody(_Body):
    """ComeAPI's /generate, defaults as ComeAPI documents them."""

    prompt: Annotated[str, Field(min_length=1)]
    model_name: str | None = None
    model: str | None = None
    max_tokens: PositiveInt = 100
    temperature: NonNegFloat = 0.8
    top_k: Annotated[int, Field(ge=0)] = 40
    top_p: TopP = 0.9


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _OpenAIBody(_Body):
    model: str | None = None
    n: Literal[1] = 1
    temperature: NonNegFloat = 1.0
    top_k: Annotated[int, Field(ge=0)] = 40
    top_p: TopP = 1.0
    stream_options: _StreamOptions | None = None


class _CompletionBody(_OpenAIBody):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: PositiveInt | None = 16

    def single_prompt(self) -> str:
        text = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        if not text:
            raise RequestError("prompt must not be empty", param="prompt")
        return text


class _ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class _MessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _ChatBody(_OpenAIBody):
    messages: Annotated[list[_MessageBody], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None


def decode_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or RequestError."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object", code="invalid_json")
    return body


def parse_request(kind: Kind, body: dict[str, Any], *, max_tokens_limit: int) -> GenerationRequest:
    """Validate a decoded body of the given kind; raise RequestError naming the bad field."""
    try:
        request = _parse(kind, body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise RequestError(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
    if request.max_tokens is not None and request.max_tokens > max_tokens_limit:
        raise RequestError(
            f"max_tokens: {request.max_tokens} is above this server's limit of {max_tokens_limit}",
            param="max_tokens",
        )
    return request


def _parse(kind: Kind, body: dict[str, Any]) -> GenerationRequest:
    if kind == "generate":
        g = _GenerateBody.model_validate(body)
        return GenerationRequest(
            kind=kind,
            prompt=g.prompt,
            messages=None,
            model=g.model_name or g.model,
            max_tokens=g.max_tokens,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            seed=g.seed,
            stop=g.stops(),
            stream=g.stream,
        )
    if kind == "completion":
        c = _CompletionBody.model_validate(body)
        return GenerationRequest(
            kind=kind,
            prompt=c.single_prompt(),
            messages=None,
            model=c.model,
            max_tokens=c.max_tokens,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            seed=c.seed,
            stop=c.stops(),
            stream=c.stream,
            include_usage=bool(c.stream_options and c.stream_options.include_usage),
        )
    ch = _ChatBody.model_validate(body)
    return GenerationRequest(
        kind=kind,
        prompt=None,
        messages=tuple(Message(m.role, m.text()) for m in ch.messages),
        model=ch.model,
        max_tokens=ch.max_completion_tokens or ch.max_tokens,
        temperature=ch.temperature,
        top_k=ch.top_k,
        top_p=ch.top_p,
        seed=ch.seed,
        stop=ch.stops(),
        stream=ch.stream,
        include_usage=bool(ch.stream_options and ch.stream_options.include_usage),
    )
