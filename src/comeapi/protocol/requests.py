"""The front door: every generation request, on every tier, is parsed here and only here.

ComeAPI's ``/generate`` and OpenAI's completions and chat completions become one
``GenerationRequest``; invalid input raises ``RequestError`` naming the offending field
(``param``), before anything looks at the cache, so a body is valid or invalid whatever the
cache holds (the JSON itself is read by ``json_body.decode_json``, re-exported here). The
gateway, the backend and the Lambda handler call ``parse_request``; nginx's
njs (deploy/nginx/njs/comeapi_key.js) mirrors it and tests/conformance checks all of them
against one table. The rules are written out in docs/cache.md ("What a request means").

Plain Python on purpose: the Lambda handler imports this on its cold path (no pydantic), and
the gateway runs it on every cache hit (a few microseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from comeapi.errors import RequestError
from comeapi.protocol.json_body import MAX_DEPTH as MAX_DEPTH
from comeapi.protocol.json_body import decode_json as decode_json

Kind = Literal["generate", "completion", "chat"]
# OpenAI's routes also without /v1: an SDK whose base_url lacks it (llama-server answers both).
KINDS: dict[str, Kind] = {
    "/generate": "generate",
    "/v1/completions": "completion",
    "/v1/chat/completions": "chat",
    "/completions": "completion",
    "/chat/completions": "chat",
}
ROLES = frozenset({"system", "developer", "user", "assistant"})
# Content parts that carry no text: they never match a text cache entry; a backend whose
# model cannot take them refuses them (400). "refusal" is an assistant's earlier refusal.
MEDIA_PARTS = frozenset({"image_url", "input_audio", "file", "refusal"})
MAX_STOP = 4
MAX_N = 16
MAX_PROMPTS = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024
SEED_MAX = 2**32 - 1
TOP_K_MAX = 2**31 - 1
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, five
# times the cost of a plain one, and every cache hit builds a GenerationRequest (timeit of
# GenerationRequest(...) with its 23 fields, one run: 4.3 us plain, 22 us frozen).
@dataclass(slots=True)
class Message:
    """One chat message: its role, the text of its text parts (joined), and the types of
    its other parts, which the cache cannot match and a text-only model cannot read."""

    role: str
    content: str
    media: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(slots=True)
class ResponseFormat:
    """What the answer must be: any JSON (``json_object``), JSON valid against ``schema``
    (``json_schema``, or ``json_object`` with llama-server's ``schema``), or what a GBNF
    ``grammar`` allows. ``param`` is the request field it came from: OpenAI's
    ``response_format``, or llama-server's own ``grammar`` and ``json_schema``."""

    type: Literal["json_object", "json_schema", "grammar"]
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = False
    grammar: str | None = None
    param: str = "response_format"

    @property
    def field(self) -> str:
        """The top-level field: response_format, grammar or json_schema."""
        return self.param.partition(".")[0]


@dataclass(slots=True)
class GenerationRequest:
    """One validated request.

    ``prompts`` holds the prompt(s) of generate/completion (``prompt`` is the first);
    ``messages`` is set for chat. ``logprobs`` asks for the sampled tokens' log
    probabilities, with ``top_logprobs`` alternatives each (completions' integer
    ``logprobs: k`` is ``logprobs=True, top_logprobs=k``).
    """

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
    prompts: tuple[str, ...] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    response_format: ResponseFormat | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str | dict[str, Any] | None = None

    def media(self) -> tuple[tuple[int, str], ...]:
        """(message index, part type) of every non-text content part."""
        if self.messages is None:
            return ()
        return tuple((i, t) for i, m in enumerate(self.messages) for t in m.media)


def parse_request(kind: Kind, body: dict[str, Any], *, max_tokens_limit: int) -> GenerationRequest:
    """Validate a decoded body of the given kind; RequestError (400) names the bad field.

    ``null`` means "the default" for every optional field. Types are never coerced:
    ``"5"`` is not a number and ``true`` is not 1.
    """
    if kind == "generate":
        request = _generate(body)
    elif kind == "completion":
        request = _completion(body)
    else:
        request = _chat(body)
    if request.max_tokens is not None and request.max_tokens > max_tokens_limit:
        raise RequestError(
            f"max_tokens: {request.max_tokens} is above this server's limit of {max_tokens_limit}",
            param="max_tokens",
        )
    return request


# --- the three bodies -------------------------------------------------------------------
# Fields are checked one after another in the order written here, and the first bad one is
# reported: njs checks them in the same order, so every tier names the same ``param``.


def _generate(body: dict[str, Any]) -> GenerationRequest:
    """ComeAPI's /generate, with its documented defaults. Other fields are ignored."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _error("prompt", "is required and must be a string")
    _nonblank(prompt, "prompt")
    model = _model(body, "model_name")
    model = _model(body, "model") if model is None else model
    max_tokens = _positive(body, "max_tokens", 100)
    temperature = _number(body, "temperature", 0.8, 0.0, 2.0)
    top_k = _integer(body, "top_k", 40, 0, TOP_K_MAX)
    top_p = _number(body, "top_p", 0.9, 0.0, 1.0)
    seed = _seed(body)
    stop = _stop(body)
    stream = _flag(body, "stream")
    return GenerationRequest(
        kind="generate",
        prompt=prompt,
        prompts=(prompt,),
        messages=None,
        model=model,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stream=stream,
    )


def _completion(body: dict[str, Any]) -> GenerationRequest:
    value = body.get("prompt")
    # OpenAI's schema: prompt is required and nullable, null meaning its default
    # "<|endoftext|>", a new document's start: "" here, generated from the model's BOS token
    # and never a cache hit (cache.key.uncacheable). A missing prompt stays an error.
    prompts = ("",) if value is None and "prompt" in body else _prompts(value)
    model = _model(body, "model")
    max_tokens = _positive(body, "max_tokens", 16)
    logprobs = body.get("logprobs") is not None
    top_logprobs = _integer(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
    echo = _flag(body, "echo")
    response_format = _output_format(body)
    return GenerationRequest(
        kind="completion",
        prompt=prompts[0],
        prompts=prompts,
        messages=None,
        model=model,
        max_tokens=max_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        echo=echo,
        response_format=response_format,
        **_openai_common(body),
    )


def _chat(body: dict[str, Any]) -> GenerationRequest:
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise _error("messages", "is required and must be a non-empty list of messages")
    messages = tuple(_message(m, i) for i, m in enumerate(raw_messages))
    model = _model(body, "model")
    max_completion = _positive(body, "max_completion_tokens", None)
    max_tokens = _positive(body, "max_tokens", None)
    logprobs = _flag(body, "logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if body.get("top_logprobs") is not None and not logprobs:
        raise _error("top_logprobs", "needs logprobs: true")
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise _error(name, "is deprecated and not supported; use tools")
    if body.get("audio") is not None:
        raise _error("audio", "is not supported: this server answers with text only")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _error("modalities", 'only ["text"] is supported')
    if body.get("web_search_options") is not None:
        raise _error("web_search_options", "is not supported: this server has no web search")
    response_format = _output_format(body)
    tools = _tools(body.get("tools"))
    tool_choice = _tool_choice(body.get("tool_choice"))
    return GenerationRequest(
        kind="chat",
        prompt=None,
        messages=messages,
        model=model,
        max_tokens=max_completion if max_completion is not None else max_tokens,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        response_format=response_format,
        tools=tools,
        tool_choice=tool_choice,
        **_openai_common(body),
    )


def _openai_common(body: dict[str, Any]) -> dict[str, Any]:
    """The fields completions and chat completions share, with OpenAI's defaults."""
    fields: dict[str, Any] = {}
    fields["temperature"] = _number(body, "temperature", 1.0, 0.0, 2.0)
    fields["top_p"] = _number(body, "top_p", 1.0, 0.0, 1.0)
    fields["top_k"] = _integer(body, "top_k", 40, 0, TOP_K_MAX)
    fields["seed"] = _seed(body)
    fields["stop"] = _stop(body)
    fields["stream"] = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _error("stream_options", "must be an object")
    fields["include_usage"] = options is not None and _flag(
        options, "include_usage", "stream_options."
    )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _error("user", "must be a string")
    fields["n"] = _integer(body, "n", 1, 1, MAX_N)
    fields["logit_bias"] = _logit_bias(body.get("logit_bias"))
    fields["presence_penalty"] = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    fields["frequency_penalty"] = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    return fields


# --- fields -------------------------------------------------------------------------------


def _error(param: str, message: str, code: str | None = None) -> RequestError:
    return RequestError(f"{param}: {message}", param=param, code=code)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is int:
        value = float(value)
    if type(value) is not float:
        raise _error(name, f"must be a number, got {_json_type(value)}")
    if not lo <= value <= hi:
        raise _error(name, f"must be between {lo:g} and {hi:g}, got {value:g}")
    return value


def _integer(
    body: dict[str, Any], name: str, default: int, lo: int, hi: int | None, prefix: str = ""
) -> int:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is float and value.is_integer():
        value = int(value)  # 5.0 is 5: JavaScript (njs) cannot tell them apart
    if type(value) is not int:
        raise _error(prefix + name, f"must be an integer, got {_json_type(value)}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise _error(prefix + name, f"must be {bound}, got {value}")
    return value


def _positive(body: dict[str, Any], name: str, default: int | None) -> int | None:
    if body.get(name) is None:
        return default
    return _integer(body, name, 1, 1, None)


def _flag(body: dict[str, Any], name: str, prefix: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return False
    if type(value) is not bool:
        raise _error(prefix + name, f"must be true or false, got {_json_type(value)}")
    return value


def _seed(body: dict[str, Any]) -> int | None:
    if body.get("seed") is None:
        return None
    return _integer(body, "seed", 0, 0, SEED_MAX)


def _model(body: dict[str, Any], name: str) -> str | None:
    """The model asked for; "" and null both mean the server's default."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _error(name, f"must be a string, got {_json_type(value)}")
    return value or None


def _nonblank(text: str, param: str) -> str:
    if not text.strip():
        raise _error(param, "must not be empty")
    return text


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _error("stop", "must be a string or a list of strings")
    if len(stops) > MAX_STOP or not all(stops):
        raise _error("stop", f"takes at most {MAX_STOP} non-empty strings")
    return tuple(stops)


def _prompts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_nonblank(value, "prompt"),)
    if not isinstance(value, list) or not value:
        raise _error("prompt", "is required: a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in value):
        if all(type(p) is int for p in value) or all(isinstance(p, list) for p in value):
            raise _error("prompt", "token-id prompts are not supported; send text")
        raise _error("prompt", "must be a string or a list of strings")
    if len(value) > MAX_PROMPTS:
        raise _error("prompt", f"takes at most {MAX_PROMPTS} prompts")
    for i, p in enumerate(value):
        _nonblank(p, f"prompt.{i}")
    return tuple(value)


def _message(value: Any, i: int) -> Message:
    where = f"messages.{i}"
    if not isinstance(value, dict):
        raise _error(where, "must be an object with role and content")
    role = value.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise _error(f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}")
    name = value.get("name")
    if name is not None and not isinstance(name, str):
        raise _error(f"{where}.name", "must be a string")
    if value.get("tool_calls") is not None:
        raise _error(f"{where}.tool_calls", "tool calls are not supported")
    content = value.get("content")
    if isinstance(content, str):
        return Message(role, content)
    if not isinstance(content, list):
        raise _error(f"{where}.content", "must be a string or a list of content parts")
    texts: list[str] = []
    media: list[str] = []
    for j, part in enumerate(content):
        at = f"{where}.content.{j}"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            kind = None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _error(f"{at}.text", f"must be a string, got {_json_type(text)}")
            texts.append(text)
        elif kind in MEDIA_PARTS:
            if not isinstance(part.get(kind), dict if kind != "refusal" else str):
                raise _error(f"{at}.{kind}", f"a {kind} part needs its {kind} field")
            media.append(kind)
        elif isinstance(part, dict):
            known = ", ".join(sorted({"text", *MEDIA_PARTS}))
            raise _error(f"{at}.type", f"must be one of {known}, got {kind!r}")
        else:
            raise _error(at, "must be an object with a type")
    return Message(role, "".join(texts), tuple(media))


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _error("logit_bias", "must be an object mapping token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise _error("logit_bias", f"takes at most {MAX_LOGIT_BIAS} tokens")
    out = []
    for token, bias in value.items():
        if not token.isdigit() or not token.isascii() or len(token) > 9:
            raise _error("logit_bias", f"keys must be token ids, got {token!r}")
        if type(bias) not in (int, float) or not -100 <= bias <= 100:
            raise _error("logit_bias", f"{token}: the bias must be a number in -100..100")
        out.append((int(token), float(bias)))
    return tuple(sorted(out))


def _response_format(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str) or kind not in RESPONSE_FORMATS:
        raise _error(
            "response_format.type", f"must be one of {', '.join(sorted(RESPONSE_FORMATS))}"
        )
    assert isinstance(value, dict)
    if kind == "text":
        return None
    if kind == "json_object":
        # llama-server's extension: a schema for the JSON object
        schema = value.get("schema")
        if schema is None:
            return ResponseFormat("json_object")
        if not isinstance(schema, dict):
            raise _error("response_format.schema", "must be a JSON Schema object")
        return ResponseFormat("json_object", schema, param="response_format.schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _error("response_format.json_schema", "is required for type json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise _error("response_format.json_schema.name", "is required: a non-empty string")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise _error("response_format.json_schema.schema", "must be a JSON Schema object")
    strict = _flag(spec, "strict", "response_format.json_schema.")
    return ResponseFormat(
        "json_schema", schema, name, strict, param="response_format.json_schema.schema"
    )


def _output_format(body: dict[str, Any]) -> ResponseFormat | None:
    """``response_format``, or llama-server's request extensions that clients written for it
    send: ``grammar`` (GBNF; "" is none, as there) and a top-level ``json_schema``. At most
    one of the three: llama-server refuses a grammar with a schema too."""
    chosen = _response_format(body.get("response_format"))
    grammar = body.get("grammar")
    if grammar is not None and not isinstance(grammar, str):
        raise _error("grammar", f"must be a string (a GBNF grammar), got {_json_type(grammar)}")
    if grammar:
        chosen = _only(chosen, ResponseFormat("grammar", grammar=grammar, param="grammar"))
    schema = body.get("json_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise _error("json_schema", f"must be a JSON Schema object, got {_json_type(schema)}")
        chosen = _only(chosen, ResponseFormat("json_schema", schema, param="json_schema"))
    return chosen


def _only(chosen: ResponseFormat | None, other: ResponseFormat) -> ResponseFormat:
    if chosen is not None:
        raise _error(other.param, f"cannot be combined with {chosen.field}: send one of them")
    return other


def _tools(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise _error("tools", "must be a list of tool objects")
    return tuple(value)


def _tool_choice(value: Any) -> str | dict[str, Any] | None:
    if value is None or isinstance(value, dict) or value in ("none", "auto", "required"):
        return value  # type: ignore[no-any-return]

    raise _error("tool_choice", 'must be "none", "auto", "required" or an object')


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"
