"""The front door's memory of bodies that hit (``gateway.frontdoor``): the same verdict as a
fresh parse, keys made again when the default model changes, bad bodies never kept, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from comeapi.cache.key import prompt_key
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.errors import RequestError
from comeapi.gateway.cache import ResponseCache
from comeapi.gateway.frontdoor import REMEMBERED_BODY_BYTES, FrontDoor

MODEL = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture
def cache(tmp_path: Path) -> ResponseCache:
    store = SqliteStore(tmp_path / "c.db")
    store.put_many(
        [
            Entry(
                key=prompt_key("hi", MODEL),
                variant=0,
                kind="prompt",
                prompt="hi",
                answer="a",
                model=MODEL,
            )
        ]
    )
    cache = ResponseCache(store, variants=5)
    cache.reload()
    return cache


def test_a_remembered_body_gets_the_verdict_a_fresh_parse_gives(cache: ResponseCache) -> None:
    door = FrontDoor(2048)
    body = b'{"prompt": " hi ", "max_tokens": 7}'
    first = door.prepare("/generate", body, cache)
    door.remember("/generate", body, first)
    again = door.prepare("/generate", body, cache)
    assert again is first
    assert again == FrontDoor(2048).prepare("/generate", body, cache)
    assert first.key == prompt_key("hi", MODEL) and first.request.max_tokens == 7
    # The same bytes on another route are another request.
    other = door.prepare("/v1/completions", body, cache)
    assert other is not first and other.format.kind == "completion"


def test_the_key_follows_the_default_model(cache: ResponseCache) -> None:
    door = FrontDoor(2048)
    body = b'{"prompt": "hi"}'
    door.remember("/generate", body, door.prepare("/generate", body, cache))
    cache.default_model = "other.gguf"  # what a reload of a store of another model does
    assert door.prepare("/generate", body, cache).key == prompt_key("hi", "other.gguf")


def test_bad_bodies_are_refused_every_time(cache: ResponseCache) -> None:
    door = FrontDoor(2048)
    for _ in range(2):
        with pytest.raises(RequestError):
            door.prepare("/generate", b'{"prompt": "hi", "max_tokens": 99999}', cache)


def test_memory_is_bounded(cache: ResponseCache) -> None:
    door = FrontDoor(2048, size=3)
    prepared = door.prepare("/generate", b'{"prompt": "hi"}', cache)
    bodies = [b'{"prompt": "hi"%s}' % (b" " * n) for n in range(10)]
    for body in bodies:
        door.remember("/generate", body, prepared)
    assert len(door._known) == 3 and ("/generate", bodies[-1]) in door._known
    door.remember("/generate", b" " * (REMEMBERED_BODY_BYTES + 1), prepared)
    assert len(door._known) == 3
