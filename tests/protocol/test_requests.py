"""Request parsing: ComeAPI's defaults, OpenAI's fields, and bad input named by field."""

from __future__ import annotations

from typing import Any

import pytest

from comeapi.errors import RequestError
from comeapi.protocol.requests import KINDS, Message, parse_request


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
