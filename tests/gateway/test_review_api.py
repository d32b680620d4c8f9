"""The review API (``/cache/answers``) over a real SQLite store: what it lists, each change
one store write, served by the next request, errors in OpenAI's shape, keys enforced."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from llama_cpp import Llama

from comeapi.cache.key import prompt_key
from comeapi.cache.sqlite import SqliteStore
from comeapi.gateway.cache import ResponseCache
from tests.balancer.fakes import FakeCluster
from tests.cache.factory import MODEL, prompt_entry
from tests.gateway.test_app import running
from tests.helpers import MODEL_DIR

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PROMPT = "Write a short poem about the sea:"
KEY = prompt_key(PROMPT, MODEL)


def cache_of(tmp_path: Path, **kw: Any) -> ResponseCache:
    store = SqliteStore(tmp_path / "cache.db")
    store.put_many([prompt_entry(PROMPT, v) for v in range(3)])
    return ResponseCache(store, variants=3, default_model=MODEL, **kw)


def stored(tmp_path: Path) -> dict[int, Any]:
    with SqliteStore(tmp_path / "cache.db") as store:
        return {e.variant: e for e in store.entries()}


async def served(client: httpx.AsyncClient, n: int = 40) -> set[int | str]:
    seen: set[int | str] = set()
    for _ in range(n):
        r = await client.post("/generate", json={"prompt": PROMPT})
        seen.add(int(r.headers["x-cache-variant"]) if r.status_code == 200 else r.status_code)
    return seen


async def act(client: httpx.AsyncClient, path: str, **body: Any) -> httpx.Response:
    return await client.post(f"/cache/answers/{path}", json=body)


async def test_list_then_approve_and_reject_are_served_at_once(tmp_path: Path) -> None:
    cache = cache_of(tmp_path, serve_states={"approved"})
    async with running(FakeCluster(0), cache=cache, on_miss="reject") as (client, _):
        listed = (await client.get("/cache/answers")).json()
        assert listed["serve_states"] == ["approved"]
        assert [(a["variant"], a["state"], a["served"]) for a in listed["answers"]] == [
            (0, "pending", False), (1, "pending", False), (2, "pending", False),
        ]  # fmt: skip
        assert await served(client) == {404}  # nothing approved yet: a miss
        before = cache.store.revision()
        r = await act(client, KEY[:12], action="approve")
        assert r.status_code == 200, r.text
        assert [a["served"] for a in r.json()["answers"]] == [True, True, True]
        assert cache.store.revision() == (before or 0) + 1  # one write for the prompt
        assert await served(client) == {0, 1, 2}
        r = await act(client, f"{KEY}/1", action="reject")
        assert r.json()["answers"][0]["state"] == "rejected"
        assert await served(client) == {0, 2}
    assert {v: e.state for v, e in stored(tmp_path).items()} == {
        0: "approved", 1: "rejected", 2: "approved",
    }  # fmt: skip


async def test_edit_and_pin(tmp_path: Path) -> None:
    cache = cache_of(tmp_path)
    reference = Llama(str(MODEL_DIR / MODEL), vocab_only=True, verbose=False)
    tokens = len(reference.tokenize(b"Waves on the shore.", add_bos=False, special=False))
    async with running(FakeCluster(0), cache=cache, model_dir=MODEL_DIR) as (client, _):
        r = await act(client, f"{KEY}/2", action="edit", text="Waves on the shore.")
        assert r.status_code == 200, r.text
        doc = r.json()["answers"][0]
        assert doc["text"] == "Waves on the shore." and doc["edited"] and doc["flags"] == []
        # Counted with the model's vocabulary: the usage it is served with is its own.
        assert doc["completion_tokens"] == tokens != prompt_entry(PROMPT, 2).completion_tokens
        assert (await act(client, f"{KEY}/2", action="pin")).status_code == 200
        assert await served(client) == {2}  # only the pinned one
        hit = await client.post("/generate", json={"prompt": PROMPT})
        assert hit.json()["response"] == "Waves on the shore."
        assert hit.json()["usage"]["completion_tokens"] == tokens
        refused = await act(client, f"{KEY}/0", action="reject")
        assert refused.status_code == 200
        conflict = await act(client, f"{KEY}/0", action="pin")
    assert conflict.status_code == 409
    error = conflict.json()["error"]
    assert error["code"] == "review_conflict" and error["type"] == "invalid_request_error"
    entry = stored(tmp_path)[2]
    assert (
        entry.pinned
        and entry.edited
        and entry.history[0]["answer"] == prompt_entry(PROMPT, 2).answer
    )


async def test_bad_requests_change_nothing(tmp_path: Path) -> None:
    cache = cache_of(tmp_path)
    before = cache.store.revision()
    async with running(FakeCluster(0), cache=cache) as (client, _):
        cases = [
            (await act(client, "0" * 64, action="approve"), 404, "answer_not_found"),
            (await act(client, f"{KEY}/7", action="approve"), 404, "answer_not_found"),
            (await act(client, KEY, action="pin"), 400, "invalid_value"),  # per variant only
            (await act(client, f"{KEY}/0", action="delete"), 400, "invalid_value"),
            (await act(client, f"{KEY}/0", action="edit"), 400, "invalid_value"),
            (await act(client, f"{KEY}/0", action="edit", text="  "), 400, "invalid_value"),
            (await client.post(f"/cache/answers/{KEY}/0", content=b"{oops"), 400, "invalid_json"),
            (await client.get(f"/cache/answers/{KEY}/0"), 405, "invalid_value"),
        ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code, response.text
    with SqliteStore(tmp_path / "cache.db") as store:
        assert store.revision() == before


async def test_a_change_made_elsewhere_is_not_lost(tmp_path: Path) -> None:
    """The CLI edits variant 0 while the gateway runs; approving it through the API must
    approve the edited text, not write back the copy the gateway loaded."""
    cache = cache_of(tmp_path)
    async with running(FakeCluster(0), cache=cache) as (client, _):
        with SqliteStore(tmp_path / "cache.db") as other:
            entry = other.get(KEY, 0)
            assert entry is not None
            other.put(replace(entry, answer="edited elsewhere", checksum=""))
        r = await act(client, f"{KEY}/0", action="approve")
    assert r.json()["answers"][0]["text"] == "edited elsewhere"
    assert stored(tmp_path)[0].answer == "edited elsewhere"


async def test_the_api_needs_the_key_when_keys_are_set(tmp_path: Path) -> None:
    cache = cache_of(tmp_path)
    async with running(FakeCluster(0), cache=cache, api_keys=["k"]) as (client, _):
        listed = await client.get("/cache/answers")
        changed = await act(client, KEY, action="approve")
        allowed = await client.get("/cache/answers", headers={"Authorization": "Bearer k"})
    assert listed.status_code == changed.status_code == 401
    assert listed.json()["error"]["type"] == "authentication_error"
    assert allowed.status_code == 200 and len(allowed.json()["answers"]) == 3
    assert {e.state for e in stored(tmp_path).values()} == {"pending"}


async def test_regenerate_refuses_a_pinned_answer_and_needs_a_backend(tmp_path: Path) -> None:
    cache = cache_of(tmp_path)
    async with running(FakeCluster(0), cache=cache) as (client, _):
        await act(client, f"{KEY}/1", action="pin")
        pinned = await act(client, f"{KEY}/1", action="regenerate")
        no_backend = await act(client, f"{KEY}/0", action="regenerate")
    assert pinned.status_code == 409 and pinned.json()["error"]["code"] == "review_conflict"
    assert "unpin it" in pinned.json()["error"]["message"]
    assert no_backend.status_code == 503 and no_backend.headers["retry-after"] == "5"
    assert no_backend.json()["error"]["type"] == "service_unavailable"
    assert stored(tmp_path)[0].answer == prompt_entry(PROMPT, 0).answer
