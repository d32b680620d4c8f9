"""The gateway's cache layer against a real SqliteStore: choice, forced variants, streaming."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import orjson
import pytest
from starlette.datastructures import Headers

from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.errors import RequestError
from comeapi.gateway.cache import Lookup, ResponseCache
from comeapi.protocol.requests import Kind, parse_request

MODEL = "gemma-3-270m-q4_k_m.gguf"
PROMPT = "こんにちは、調子はどうですか？"


def _entries(variants: int = 5) -> list[Entry]:
    out = []
    for v in range(variants):
        out.append(
            Entry(
                key=prompt_key(PROMPT, MODEL),
                variant=v,
                kind="prompt",
                prompt=PROMPT,
                answer=f"answer number {v} 答え",
                model=MODEL,
                completion_tokens=5,
                prompt_tokens=3,
            )
        )
    messages = (("user", "Tell me a joke."),)
    out.append(
        Entry(
            key=chat_key(messages, MODEL),
            variant=0,
            kind="chat",
            prompt="Tell me a joke.",
            answer="A chat answer.",
            model=MODEL,
            messages=messages,
        )
    )
    return out


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    s = SqliteStore(tmp_path / "cache.db")
    s.put_many(_entries())
    return s


def _cache(store: SqliteStore, **kw: object) -> ResponseCache:
    cache = ResponseCache(store, variants=5, **kw)  # type: ignore[arg-type]
    cache.reload()
    return cache


NO_HEADERS = Headers({})


def lookup(cache: ResponseCache, kind: Kind, body: dict[str, object], headers: Headers) -> Lookup:
    forced = cache.forced_variant(
        headers.get("x-comeapi-variant", "").encode() or None,
        headers.get("x-comeapi-variant-secret", "").encode(),
    )
    return cache.lookup(parse_request(kind, body, max_tokens_limit=2048), forced)


def test_choice_is_uniform_over_the_variants(store: SqliteStore) -> None:
    cache = _cache(store, rng=random.Random(1234))
    counts = [0] * 5
    n = 2000
    for _ in range(n):
        found = lookup(cache, "generate", {"prompt": PROMPT}, NO_HEADERS)
        assert found.hit is not None
        counts[found.hit.variant] += 1
    expected = n / 5
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    # 4 degrees of freedom: p = 0.001 at 18.47. Every variant must be reachable.
    assert chi2 < 18.47, counts
    assert min(counts) > 0


def test_hit_body_in_each_wire_format(store: SqliteStore) -> None:
    cache = _cache(store)
    gen = lookup(cache, "generate", {"prompt": f"  {PROMPT}\r\n"}, NO_HEADERS).hit
    assert gen is not None and gen.header("x-cache") == "HIT"
    body = orjson.loads(gen.body)
    assert body["response"].startswith("answer number") and body["model"] == MODEL
    comp = lookup(cache, "completion", {"prompt": PROMPT, "model": MODEL}, NO_HEADERS).hit
    assert comp is not None
    assert orjson.loads(comp.body)["choices"][0]["text"].startswith("answer number")
    chat_body = {
        "model": "gemma-3-270m-q4_k_m",
        "messages": [{"role": "user", "content": "Tell me a joke."}],
    }
    chat = lookup(cache, "chat", chat_body, NO_HEADERS).hit
    assert chat is not None
    assert orjson.loads(chat.body)["choices"][0]["message"]["content"] == "A chat answer."


def test_unknown_prompt_or_other_model_is_a_miss(store: SqliteStore) -> None:
    cache = _cache(store)
    miss = lookup(cache, "generate", {"prompt": "something else"}, NO_HEADERS)
    assert miss.hit is None and miss.key == prompt_key("something else", MODEL)
    other = lookup(cache, "generate", {"prompt": PROMPT, "model_name": "other.gguf"}, NO_HEADERS)
    assert other.hit is None
    image = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Tell me a joke."},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            }
        ]
    }
    # A question about an image is never answered by the text-only entry it contains.
    assert lookup(cache, "chat", image, NO_HEADERS) == Lookup(None)


def test_stream_hit_is_sse_chunks_that_rebuild_the_answer(store: SqliteStore) -> None:
    cache = _cache(store)
    found = lookup(
        cache,
        "completion",
        {"prompt": PROMPT, "stream": True},
        Headers({"x-comeapi-variant": "2"}),
    )
    resp = found.hit
    assert resp is not None and resp.header("content-type") == "text/event-stream"
    events = [e for e in resp.body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert len(chunks) > 3
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.startswith("answer number") and text.endswith("答え")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_variant_header_needs_the_secret(store: SqliteStore) -> None:
    cache = _cache(store, variant_secret="s3cret")
    body = {"prompt": PROMPT}
    for _ in range(20):
        spoofed = Headers({"x-comeapi-variant": "3", "x-comeapi-variant-secret": "guess"})
        resp = lookup(cache, "generate", body, spoofed).hit
        assert resp is not None
        if resp.variant != 3:
            break
    else:
        pytest.fail("a client without the secret always got the variant it asked for")
    trusted = Headers({"x-comeapi-variant": "3", "x-comeapi-variant-secret": "s3cret"})
    for _ in range(10):
        resp = lookup(cache, "generate", body, trusted).hit
        assert resp is not None and resp.variant == 3
    with pytest.raises(RequestError):
        lookup(
            cache,
            "generate",
            body,
            Headers({"x-comeapi-variant": "9", "x-comeapi-variant-secret": "s3cret"}),
        )


def test_forced_missing_variant_is_filled_from_the_answer(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    cache = _cache(store, variant_secret="k")
    headers = Headers({"x-comeapi-variant": "4", "x-comeapi-variant-secret": "k"})
    body = {"prompt": "A new prompt", "max_tokens": 8}
    miss = lookup(cache, "generate", body, headers)
    assert miss.hit is None and miss.forced_variant == 4
    answer = {"response": "generated", "model": MODEL, "finish_reason": "length", "usage": {}}
    request = parse_request("generate", body, max_tokens_limit=2048)
    anyio.run(cache.store_answer, miss, request, answer)
    stored = store.get(prompt_key("A new prompt", MODEL), 4)
    assert stored is not None and stored.answer == "generated" and stored.params["seed"] == 4
    hit = lookup(cache, "generate", body, headers).hit
    assert hit is not None and hit.variant == 4


def test_hit_counts_reach_the_store(store: SqliteStore) -> None:
    cache = _cache(store)
    for _ in range(7):
        lookup(cache, "generate", {"prompt": PROMPT}, NO_HEADERS)
    anyio.run(cache.flush_hits)
    assert sum(store.hit_counts().values()) == 7
    status = cache.status()
    assert status["hits"] == 7 and status["prompts"] == 2
    assert sum(p["hits"] for p in status["by_prompt"]) == 7
