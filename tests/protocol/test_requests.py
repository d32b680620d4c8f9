"""Request parsing: ComeAPI's defaults, OpenAI's fields, and bad input named by field."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from comeapi.errors import RequestError
from comeapi.protocol import requests
from comeapi.protocol.requests import KINDS, Message, decode_json, parse_request


def parse(kind: Any, body: dict[str, Any], limit: int = 2048) -> Any:
    return parse_request(kind, body, max_tokens_limit=limit)


def test_routes_map_to_kinds() -> None:
    assert KINDS == {
        "/generate": "generate",
        "/v1/completions": "completion",
        "/v1/chat/completions": "chat",
        "/completions": "completion",
        "/chat/completions": "chat",
    }


def test_generate_uses_comeapi_defaults() -> None:
    r = parse("generate", {"prompt": "Hi"})
    assert (r.max_tokens, r.temperature, r.top_k, r.top_p) == (100, 0.8, 40, 0.9)
    assert (r.prompt, r.messages, r.model, r.seed, r.stop, r.stream) == (
        "Hi", None, None, None, (), False,
    )  # fmt: skip


def test_generate_model_name_and_model_alias() -> None:
    assert parse("generate", {"prompt": "x", "model_name": "a.gguf"}).model == "a.gguf"
    assert parse("generate", {"prompt": "x", "model": "b.gguf"}).model == "b.gguf"


def test_completion_defaults_and_single_prompt_list() -> None:
    r = parse("completion", {"prompt": ["Hello"], "stop": "\n", "seed": 3})
    assert (r.prompt, r.max_tokens, r.temperature, r.top_p) == ("Hello", 16, 1.0, 1.0)
    assert (r.stop, r.seed) == (("\n",), 3)


def test_chat_messages_content_parts_and_max_completion_tokens() -> None:
    r = parse(
        "chat",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "max_tokens": 50,
            "max_completion_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "ignored",
            "presence_penalty": 0.5,
        },
    )
    assert r.messages == (Message("system", "Be brief."), Message("user", "ab"))
    assert (r.max_tokens, r.stream, r.include_usage) == (7, True, True)
    assert parse("chat", {"messages": [{"role": "user", "content": "x"}]}).max_tokens is None


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("generate", {}, "prompt"),
        ("generate", {"prompt": ""}, "prompt"),
        ("generate", {"prompt": None}, "prompt"),
        ("generate", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("generate", {"prompt": "x", "max_tokens": True}, "max_tokens"),
        ("generate", {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
        ("generate", {"prompt": "x", "temperature": -1}, "temperature"),
        ("generate", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("generate", {"prompt": "x", "top_p": -0.1}, "top_p"),
        ("generate", {"prompt": "x", "top_p": 1.01}, "top_p"),
        ("generate", {"prompt": "x", "top_k": -1}, "top_k"),
        ("generate", {"prompt": "x", "seed": 2**32}, "seed"),
        ("generate", {"prompt": "x", "stop": ["", "a"]}, "stop"),
        ("generate", {"prompt": "x", "stop": 5}, "stop"),
        ("completion", {"prompt": [""]}, "prompt"),
        ("completion", {"prompt": []}, "prompt"),
        ("completion", {"prompt": "x", "n": 17}, "n"),
        (
            "completion",
            {"prompt": "x", "stream_options": {"include_usage": "yes"}},
            "stream_options",
        ),
        ("chat", {"messages": [{"role": "user"}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ("chat", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ],
)
def test_bad_fields_are_named(kind: Any, body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as err:
        parse(kind, body)
    assert err.value.status == 400
    assert err.value.param is not None and err.value.param.startswith(param)
    assert err.value.to_dict()["error"]["type"] == "invalid_request_error"


def test_max_tokens_above_the_limit() -> None:
    assert parse("generate", {"prompt": "x", "max_tokens": 64}, limit=64).max_tokens == 64
    with pytest.raises(RequestError, match="limit of 64") as err:
        parse("generate", {"prompt": "x", "max_tokens": 65}, limit=64)
    assert err.value.param == "max_tokens"


@pytest.mark.parametrize("raw", [b"", b"{", b"nul", b"\xff", b"[1]", b'"text"', b"[" * 10_000])
def test_decode_json_refuses_non_objects(raw: bytes) -> None:
    with pytest.raises(RequestError) as err:
        decode_json(raw)
    assert err.value.code == "invalid_json"


def test_decode_json_object() -> None:
    assert decode_json(b'{"prompt": "\\u65e5"}') == {"prompt": "日"}


# --- JSON number syntax and nesting depth (the same on every tier: docs/cache.md) ----------


@pytest.mark.parametrize(
    "number", [b"01", b"00", b"-01", b".5", b"-.5", b"1.", b"1.e5", b"0.", b"+1", b"1e400"]
)
def test_numbers_json_forbids_are_invalid_json(number: bytes) -> None:
    with pytest.raises(RequestError) as err:
        decode_json(b'{"prompt": "x", "top_p": ' + number + b"}")
    assert err.value.code == "invalid_json" and err.value.param is None


def nested(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nesting_depth_is_limited_on_the_text() -> None:
    assert requests.MAX_DEPTH == 31
    assert decode_json(json.dumps({"z": nested(30)}).encode())["z"] == nested(30)
    for body in (
        json.dumps({"z": nested(31)}).encode(),
        # njs refuses while it reads: a deep value replaced by a later duplicate counts too
        b'{"z": ' + json.dumps(nested(31)).encode() + b', "z": 1, "prompt": "x"}',
    ):
        with pytest.raises(RequestError, match="nested more than 31 levels") as err:
            decode_json(body)
        assert err.value.code == "invalid_json" and err.value.param is None
    # Brackets in strings are text, escaped quotes and backslashes included.
    tricky = '\\"[{' * 40 + '\\\\"]' + "\\\\" * 3
    assert decode_json(json.dumps({"prompt": tricky, "z": nested(30)}).encode())


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def test_the_depth_scan_agrees_with_the_decoded_value() -> None:
    rng = random.Random(5)
    texts = ["", "x", '"', "\\", "[", "]", "{", "}", '\\"[', '"]{', "日本", "\\u005b"]

    def value(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.05:
            return rng.choice([0, None, "".join(rng.choices(texts, k=rng.randint(0, 6)))])
        # One deep child, its siblings shallow: a few hundred values per document.
        items = [value(depth - 1), *(value(min(depth - 1, 2)) for _ in range(rng.randint(0, 2)))]
        rng.shuffle(items)
        if rng.random() < 0.5:
            return items
        return {"".join(rng.choices(texts, k=2)) + str(i): v for i, v in enumerate(items)}

    for _ in range(2000):
        doc = {"prompt": "x", "z": value(rng.randint(25, 36))}
        raw = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        assert requests._too_deep(raw) == (depth_of(doc) > requests.MAX_DEPTH), raw
