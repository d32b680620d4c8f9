"""What the README tells users about the cache and request fields stays true: the fields it
says the cache ignores change neither the key nor whether a request can be a hit, and the
ones it says are never a hit are refused by ``uncacheable``."""

from __future__ import annotations

import re
from typing import Any

import pytest

from comeapi.cache.key import lookup_key, uncacheable
from comeapi.protocol.requests import parse_request
from tests.helpers import BUNDLED_MODEL, REPO

# A value other than the default for each field the README may name.
IGNORED_SAMPLES: dict[str, dict[str, Any]] = {
    "temperature": {"temperature": 1.7},
    "top_p": {"top_p": 0.3},
    "top_k": {"top_k": 3},
    "max_tokens": {"max_tokens": 7},
    "seed": {"seed": 11},
    "stop": {"stop": ["\n"]},
    "penalties": {"presence_penalty": 1.0, "frequency_penalty": -1.0},
}
NEVER_HIT_SAMPLES: dict[str, dict[str, Any]] = {
    "n": {"n": 2},
    "logprobs": {"logprobs": True},
    "logit_bias": {"logit_bias": {"42": 3}},
    "response_format": {"response_format": {"type": "json_object"}},
    "tools": {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    },
}
CHAT = {"messages": [{"role": "user", "content": "Hello"}]}


def readme_sentence(start: str, end: str) -> str:
    text = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    match = re.search(re.escape(start) + "(.*?)" + re.escape(end), text)
    assert match, f"README no longer says {start!r} ... {end!r}"
    return match.group(1)


def named(sentence: str) -> list[str]:
    return re.findall(r"`([a-z_]+)`", sentence) + (["penalties"] if "penalties" in sentence else [])


def key_of(body: dict[str, Any]) -> tuple[str | None, str]:
    request = parse_request("chat", body, max_tokens_limit=2048)
    return uncacheable(request), lookup_key(request, BUNDLED_MODEL)


def test_the_fields_the_readme_says_are_ignored_are_ignored() -> None:
    fields = named(readme_sentence("The cache **ignores**", "on purpose"))
    assert set(fields) == set(IGNORED_SAMPLES), fields
    plain = key_of(CHAT)
    for field in fields:
        assert key_of({**CHAT, **IGNORED_SAMPLES[field]}) == plain, field


@pytest.mark.parametrize("field", sorted(NEVER_HIT_SAMPLES))
def test_the_fields_the_readme_says_are_never_a_hit_are_not(field: str) -> None:
    sentence = readme_sentence("A request for what a stored answer does not carry", "is never a")
    assert f"`{field}`" in sentence
    blocker, _ = key_of({**CHAT, **NEVER_HIT_SAMPLES[field]})
    assert blocker == field
