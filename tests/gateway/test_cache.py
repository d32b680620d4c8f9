"""The gateway's index against a real SqliteStore: the choice, misses, forced slots, filling
slots, hit counts. (How a hit is encoded: tests/cache/test_replies.py.)"""

from __future__ import annotations

import logging
import random
import sqlite3
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from starlette.datastructures import Headers

from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.errors import RequestError
from comeapi.gateway.cache import Lookup, ResponseCache
from comeapi.gateway.cache_status import cache_status
from comeapi.gateway.forced import ForcedVariants
from comeapi.models.bundled import BUNDLED_MODEL
from comeapi.protocol.requests import Kind, parse_request
from comeapi.protocol.responses import read_answer

MODEL = "gemma-3-270m-q4_k_m.gguf"
DEFAULT = BUNDLED_MODEL  # comeapi's default model (SmolLM2)
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
    forced = ForcedVariants(cache.variant_secret, cache.variants).read(
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
        assert found.entry is not None
        counts[found.entry.variant] += 1
    expected = n / 5
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    # 4 degrees of freedom: p = 0.001 at 18.47. Every variant must be reachable.
    assert chi2 < 18.47, counts
    assert min(counts) > 0


def test_a_prompt_is_found_in_every_route_and_byte_form(store: SqliteStore) -> None:
    cache = _cache(store)
    gen = lookup(cache, "generate", {"prompt": f"  {PROMPT}\r\n"}, NO_HEADERS).entry
    assert gen is not None and gen.answer.startswith("answer number")
    comp = lookup(cache, "completion", {"prompt": PROMPT, "model": MODEL}, NO_HEADERS).entry
    assert comp is not None and comp.key == gen.key
    chat_body = {
        "model": "gemma-3-270m-q4_k_m",
        "messages": [{"role": "user", "content": "Tell me a joke."}],
    }
    chat = lookup(cache, "chat", chat_body, NO_HEADERS).entry
    assert chat is not None and chat.answer == "A chat answer."


def test_unknown_prompt_or_other_model_is_a_miss(store: SqliteStore) -> None:
    cache = _cache(store)
    miss = lookup(cache, "generate", {"prompt": "something else"}, NO_HEADERS)
    assert miss.entry is None and miss.key == prompt_key("something else", MODEL)
    other = lookup(cache, "generate", {"prompt": PROMPT, "model_name": "other.gguf"}, NO_HEADERS)
    assert other.entry is None
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


def test_variant_header_needs_the_secret(store: SqliteStore) -> None:
    cache = _cache(store, variant_secret="s3cret")
    body = {"prompt": PROMPT}
    for _ in range(20):
        spoofed = Headers({"x-comeapi-variant": "3", "x-comeapi-variant-secret": "guess"})
        resp = lookup(cache, "generate", body, spoofed).entry
        assert resp is not None
        if resp.variant != 3:
            break
    else:
        pytest.fail("a client without the secret always got the variant it asked for")
    trusted = Headers({"x-comeapi-variant": "3", "x-comeapi-variant-secret": "s3cret"})
    for _ in range(10):
        resp = lookup(cache, "generate", body, trusted).entry
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
    assert miss.entry is None and miss.forced_variant == 4
    # An empty store and no default_model: the request means the bundled default model.
    answer = read_answer(
        "generate",
        b'{"response": "generated", "model": "%s", "finish_reason": "length", "usage": {}}'
        % DEFAULT.encode(),
    )
    request = parse_request("generate", body, max_tokens_limit=2048)
    anyio.run(cache.store_answer, miss, request, answer)
    stored = store.get(prompt_key("A new prompt", DEFAULT), 4)
    assert stored is not None and stored.answer == "generated" and stored.params["seed"] == 4
    hit = lookup(cache, "generate", body, headers).entry
    assert hit is not None and hit.variant == 4


def test_hit_counts_reach_the_store(store: SqliteStore) -> None:
    cache = _cache(store)
    for _ in range(7):
        lookup(cache, "generate", {"prompt": PROMPT}, NO_HEADERS)
    anyio.run(cache.flush_hits)
    assert sum(store.hit_counts().values()) == 7
    status = cache_status(cache)
    assert status["hits"] == 7 and status["prompts"] == 2
    assert sum(p["hits"] for p in status["by_prompt"]) == 7


# --- what is served: serve_states and pinning, decided at load ----------------------------


def _review(store: SqliteStore, changes: dict[int, dict[str, object]]) -> None:
    """Give variants of PROMPT a review (variant -> fields)."""
    key = prompt_key(PROMPT, MODEL)
    changed = []
    for variant, review in changes.items():
        entry = store.get(key, variant)
        assert entry is not None
        changed.append(replace(entry, **review, checksum=""))  # type: ignore[arg-type]
    store.put_many(changed)


def _served(cache: ResponseCache, n: int = 300) -> set[int]:
    seen = set()
    for _ in range(n):
        entry = lookup(cache, "generate", {"prompt": PROMPT}, NO_HEADERS).entry
        assert entry is not None
        seen.add(entry.variant)
    return seen


def test_serve_states_choose_the_variants_served(store: SqliteStore) -> None:
    _review(store, {0: {"state": "approved"}, 1: {"state": "rejected"}, 2: {"state": "approved"}})
    assert _served(_cache(store)) == {0, 2, 3, 4}  # approved,pending: the default
    assert _served(_cache(store, serve_states={"approved"})) == {0, 2}


def test_only_pinned_variants_are_served_when_one_is_served(store: SqliteStore) -> None:
    _review(
        store,
        {
            0: {"state": "approved"},
            3: {"pinned": True},
            4: {"pinned": True, "state": "approved"},
        },
    )
    assert _served(_cache(store)) == {3, 4}
    # Pending answers not served: the approved pinned one only.
    assert _served(_cache(store, serve_states={"approved"})) == {4}
    _review(store, {4: {"pinned": False}})
    # The only pinned variant is pending, so not served: pinning narrows nothing.
    assert _served(_cache(store, serve_states={"approved"})) == {0, 4}
    assert _served(_cache(store)) == {3}


def test_a_prompt_with_no_served_answer_is_a_miss(store: SqliteStore) -> None:
    _review(store, {v: {"state": "rejected"} for v in range(5)})
    cache = _cache(store, variant_secret="k")
    miss = lookup(cache, "generate", {"prompt": PROMPT}, NO_HEADERS)
    assert miss.entry is None and miss.key == prompt_key(PROMPT, MODEL)
    assert not miss.keep  # a forwarded answer must not be kept by nginx either
    assert PROMPT not in cache.known_prompts()
    assert "Tell me a joke." in cache.known_prompts()
    # A trusted proxy's slot is not generated over a rejected answer.
    forced = lookup(cache, "generate", {"prompt": PROMPT}, TRUSTED(1))
    assert forced == Lookup(None, prompt_key(PROMPT, MODEL), None, keep=False)
    request = parse_request("generate", {"prompt": PROMPT}, max_tokens_limit=2048)
    answer = read_answer("generate", b'{"response": "live", "usage": {}}')
    anyio.run(cache.store_answer, forced, request, answer)
    stored = store.get(prompt_key(PROMPT, MODEL), 1)
    assert stored is not None and stored.state == "rejected" and stored.answer != "live"


def TRUSTED(slot: int) -> Headers:
    return Headers({"x-comeapi-variant": str(slot), "x-comeapi-variant-secret": "k"})


def test_a_forced_slot_of_a_variant_not_served_holds_a_served_one(store: SqliteStore) -> None:
    _review(store, {1: {"state": "rejected"}, 3: {"state": "rejected"}})
    cache = _cache(store, variant_secret="k")
    served = (0, 2, 4)
    for slot in range(5):
        for _ in range(3):  # the same stand-in every time
            found = lookup(cache, "generate", {"prompt": PROMPT}, TRUSTED(slot))
            assert found.entry is not None
            if slot in served:
                assert found.entry.variant == slot and found.slot is None
            else:
                assert found.entry.variant == served[slot % 3]
                assert found.slot == slot


def test_with_approved_only_a_new_answer_is_not_kept_by_a_proxy(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    cache = _cache(store, variant_secret="k", serve_states={"approved"})
    miss = lookup(cache, "generate", {"prompt": "new"}, TRUSTED(2))
    assert miss.forced_variant == 2 and not miss.keep
    assert lookup(cache, "generate", {"prompt": "new"}, NO_HEADERS).keep is False
    default = _cache(SqliteStore(tmp_path / "d.db"), variant_secret="k")
    assert lookup(default, "generate", {"prompt": "new"}, TRUSTED(2)).keep


def test_a_change_is_served_at_once(store: SqliteStore) -> None:
    cache = _cache(store)
    key = prompt_key(PROMPT, MODEL)
    group = cache.group(key)
    rejected = [replace(e, state="rejected", checksum="") for e in group if e.variant != 2]
    anyio.run(cache.put, [e.sealed() for e in rejected])
    assert _served(cache, 50) == {2}
    assert cache.served_variants(key) == (2,)
    assert {e.variant: e.state for e in store.entries() if e.key == key}[0] == "rejected"
    status = {p["key"]: p for p in cache_status(cache)["by_prompt"]}[key]
    assert status["marks"] == "rrprr" and status["served_variants"] == [2]


def test_a_store_that_cannot_be_written_is_one_warning_and_a_problem_until_it_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(tmp_path / "c.db", timeout=0.1)
    store.put_many(_entries())
    cache = _cache(store)
    for _ in range(3):
        lookup(cache, "generate", {"prompt": PROMPT}, NO_HEADERS)
    # Another process holds the write lock: every write fails (readers still read).
    blocker = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    caplog.set_level(logging.DEBUG, logger="comeapi")
    for _ in range(5):  # five refreshes (25 s of a running gateway)
        anyio.run(cache.refresh)
    told = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(told) == 1 and told[0].exc_info is None, told
    problem = cache_status(cache)["store_problem"]
    assert problem and "locked" in problem
    blocker.execute("ROLLBACK")
    blocker.close()
    anyio.run(cache.refresh)
    assert cache_status(cache)["store_problem"] is None
    assert sum(store.hit_counts().values()) == 3  # no hit was lost meanwhile
