"""The gateway app against stand-in backends (httpx.MockTransport): routes, routing through
the pool, bad input stopped at the gateway, metrics, and the cache seam."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.balancer.pool import BackendPool
from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.errors import StoreError
from comeapi.gateway.app import Gateway, create_app
from comeapi.gateway.cache import ResponseCache
from comeapi.settings import load_settings
from tests.balancer.fakes import FakeCluster, eventually

pytestmark = pytest.mark.anyio

MODEL = "gemma-3-270m-q4_k_m.gguf"
GENERATE = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def running(
    fakes: FakeCluster, cache: Any = None, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    settings = load_settings(None, backends=fakes.urls, **overrides)
    app = create_app(
        settings, BackendPool.from_settings(settings), cache, transport=fakes.transport()
    )
    gateway: Gateway = app.state.gateway
    await gateway.startup()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://gateway", timeout=10.0
        ) as client:
            yield client, gateway
    finally:
        await gateway.shutdown()


# --- status routes --------------------------------------------------------------------------


async def test_root_speaks_comeapi() -> None:
    fakes = FakeCluster(3, capacity=2)
    fakes.backends[2].up = False
    async with running(fakes) as (client, _):
        body = (await client.get("/")).json()
    assert body["message"] == "ComeAPI Load Balancer"
    assert body["status"] == {
        "total_backends": 3,
        "healthy_backends": 2,
        "in_flight": 0,
        "capacity": 4,
        "queue_depth": 0,
    }


async def test_status_lists_every_backend() -> None:
    fakes = FakeCluster(2)
    fakes.backends[1].up = False
    async with running(fakes) as (client, _):
        await client.post("/generate", json=GENERATE)
        body = (await client.get("/status")).json()
    assert (body["healthy_backends"], body["total_backends"]) == (1, 2)
    assert body["routing"] == "round-robin"
    first, second = body["backends"]
    assert first["url"] == "http://backend-0:8000"
    assert first["healthy"] is True and first["served"] == 1 and first["in_flight"] == 0
    assert first["capacity"] == 1 and first["failures"] == 0
    assert first["latency_ms"] is not None and first["last_check"] is not None
    assert second["healthy"] is False and second["reason"] == "connection refused"
    assert second["failures"] == 1


async def test_health_answers_even_with_no_backend() -> None:
    fakes = FakeCluster(1)
    fakes.backends[0].up = False
    async with running(fakes) as (client, _):
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "degraded"


async def test_models_are_the_union_of_the_backends() -> None:
    fakes = FakeCluster(2)
    fakes.backends[0].models = ("a.gguf",)
    fakes.backends[1].models = ("a.gguf", "b.gguf")
    async with running(fakes) as (client, _):
        models = (await client.get("/models")).json()
        openai = (await client.get("/v1/models")).json()
    assert models["models"] == [
        {"name": "a.gguf", "size_mb": 1.5},
        {"name": "b.gguf", "size_mb": 1.5},
    ]
    assert openai["object"] == "list"
    assert [m["id"] for m in openai["data"]] == ["a.gguf", "b.gguf"]
    # /models without /v1 is also OpenAI's list, for SDKs whose base_url lacks /v1.
    assert models["object"] == "list"
    assert models["data"] == openai["data"]


async def test_models_without_v1_keep_comeapi_keys_with_one_backend_down() -> None:
    fakes = FakeCluster(2)
    fakes.backends[1].up = False
    async with running(fakes) as (client, _):
        models = (await client.get("/models")).json()
    assert [m["name"] for m in models["models"]] == ["m.gguf"]
    assert [m["id"] for m in models["data"]] == ["m.gguf"]


async def test_one_model_by_id() -> None:
    async with running(FakeCluster(1)) as (client, _):
        for prefix in ("/v1", ""):
            found = await client.get(f"{prefix}/models/m")
            missing = await client.get(f"{prefix}/models/nope.gguf")
            assert found.json()["id"] == "m.gguf"
            assert missing.status_code == 404
            assert missing.json()["error"]["available_models"] == ["m.gguf"]


# --- routing --------------------------------------------------------------------------------


async def test_round_robin_spreads_requests_evenly() -> None:
    fakes = FakeCluster(3)
    async with running(fakes) as (client, _):
        for _ in range(30):
            response = await client.post("/generate", json=GENERATE)
            assert response.status_code == 200
    assert [b.generations for b in fakes.backends] == [10, 10, 10]


async def test_a_full_backend_is_never_sent_a_second_request() -> None:
    fakes = FakeCluster(2)
    gate = asyncio.Event()
    for fake in fakes.backends:
        fake.gate = gate
    async with running(fakes) as (client, gateway):
        tasks = [asyncio.create_task(client.post("/generate", json=GENERATE)) for _ in range(6)]
        await eventually(lambda: gateway.pool.queue_depth == 4)
        assert [b.in_flight for b in fakes.backends] == [1, 1]
        gate.set()
        responses = await asyncio.gather(*tasks)
    assert [r.status_code for r in responses] == [200] * 6
    assert [b.max_in_flight for b in fakes.backends] == [1, 1]
    assert [b.generations for b in fakes.backends] == [3, 3]


async def test_a_full_queue_answers_503_with_retry_after() -> None:
    fakes = FakeCluster(1)
    fakes.backends[0].gate = gate = asyncio.Event()
    async with running(fakes, queue_size=1) as (client, gateway):
        running_one = asyncio.create_task(client.post("/generate", json=GENERATE))
        await eventually(lambda: fakes.backends[0].in_flight == 1)
        queued_one = asyncio.create_task(client.post("/generate", json=GENERATE))
        await eventually(lambda: gateway.pool.queue_depth == 1)
        refused = await client.post("/generate", json=GENERATE)
        gate.set()
        assert (await running_one).status_code == 200
        assert (await queued_one).status_code == 200
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert fakes.total_generations() == 2


async def test_a_request_waiting_too_long_gets_503() -> None:
    fakes = FakeCluster(1)
    fakes.backends[0].gate = gate = asyncio.Event()
    async with running(fakes, queue_timeout=0.1) as (client, _):
        first = asyncio.create_task(client.post("/generate", json=GENERATE))
        await eventually(lambda: fakes.backends[0].in_flight == 1)
        late = await client.post("/generate", json=GENERATE)
        gate.set()
        await first
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "queue_timeout"
    assert "retry-after" in late.headers


async def test_all_backends_down_answers_503_at_once() -> None:
    fakes = FakeCluster(2)
    async with running(fakes) as (client, gateway):
        for fake in fakes.backends:
            fake.up = False
        # The gateway still believes both are up: each refusal marks one down.
        response = await client.post("/generate", json=GENERATE)
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert "connection refused" in response.json()["error"]["message"]
        assert [b.healthy for b in gateway.pool.backends] == [False, False]
        again = await client.post("/generate", json=GENERATE)
    assert again.status_code == 503
    assert again.json()["error"]["code"] == "no_backend_available"
    assert fakes.total_generations() == 0


async def test_a_refused_connection_is_retried_on_another_backend() -> None:
    fakes = FakeCluster(3)
    async with running(fakes) as (client, gateway):
        fakes.backends[0].up = False
        responses = [await client.post("/generate", json=GENERATE) for _ in range(6)]
        metrics = (await client.get("/metrics")).text
        assert not gateway.pool.backends[0].healthy
    assert [r.status_code for r in responses] == [200] * 6
    assert fakes.backends[1].generations + fakes.backends[2].generations == 6
    retried = 'backend="http://backend-0:8000",reason="connection refused"} 1.0'
    assert "comeapi_backend_retries_total{" + retried in metrics


async def test_a_loading_backend_hands_the_request_on() -> None:
    fakes = FakeCluster(2)

    async with running(fakes) as (client, gateway):
        original = fakes.backends[0].handle

        async def loading(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/generate":
                error = {
                    "error": {"message": "loading", "type": "x", "param": None, "code": "loading"}
                }
                return httpx.Response(503, json=error)
            return await original(request)

        fakes.backends[0].handle = loading  # type: ignore[method-assign]
        responses = [await client.post("/generate", json=GENERATE) for _ in range(2)]
        assert gateway.pool.backends[0].reason == "loading"
    assert [r.status_code for r in responses] == [200, 200]
    assert fakes.backends[1].generations == 2


async def test_requests_naming_a_model_go_only_where_it_is() -> None:
    fakes = FakeCluster(3)
    fakes.backends[1].models = ("m.gguf", "big.gguf")
    async with running(fakes) as (client, _):
        for _ in range(4):
            body = {**GENERATE, "model_name": "big.gguf"}
            assert (await client.post("/generate", json=body)).status_code == 200
        chat = {"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
    assert [b.generations for b in fakes.backends] == [0, 5, 0]


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content", "param"),
    [
        ("/generate", b"{not json", None),
        ("/generate", b"[1, 2]", None),
        ("/generate", b'{"max_tokens": 4}', "prompt"),
        ("/generate", b'{"prompt": "hi", "max_tokens": "4"}', "max_tokens"),
        ("/generate", b'{"prompt": "hi", "max_tokens": 999999}', "max_tokens"),
        ("/generate", b'{"prompt": "hi", "temperature": 9}', "temperature"),
        ("/v1/completions", b'{"prompt": ""}', "prompt"),
        ("/v1/chat/completions", b'{"messages": []}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', None),
    ],
)
async def test_a_malformed_request_never_reaches_a_backend(
    path: str, content: bytes, param: str | None
) -> None:
    fakes = FakeCluster(2)
    async with running(fakes) as (client, _):
        response = await client.post(path, content=content)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert fakes.total_generations() == 0


async def test_an_unknown_model_gets_404_with_the_known_list() -> None:
    fakes = FakeCluster(2)
    fakes.backends[1].models = ("other.gguf",)
    async with running(fakes) as (client, _):
        response = await client.post("/generate", json={**GENERATE, "model_name": "nope.gguf"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["available_models"] == ["m.gguf", "other.gguf"]
    assert fakes.total_generations() == 0


async def test_an_oversized_body_gets_413() -> None:
    fakes = FakeCluster(1)
    async with running(fakes, max_body_bytes=2048) as (client, _):
        response = await client.post("/generate", json={"prompt": "x" * 5000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert fakes.total_generations() == 0


async def test_a_backend_rejection_is_passed_back_as_is() -> None:
    fakes = FakeCluster(1)
    async with running(fakes) as (client, gateway):
        response = await client.post("/generate", json={"prompt": "reject me"})
        assert gateway.pool.backends[0].healthy  # a 400 is the request's fault, not the backend's
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "bad prompt",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_value",
    }


async def test_the_body_is_forwarded_unchanged() -> None:
    fakes = FakeCluster(1)
    body = {**GENERATE, "seed": 7, "top_k": 3, "unknown_field": [1]}
    async with running(fakes) as (client, _):
        await client.post("/generate", json=body)
    assert fakes.backends[0].bodies == [body]


async def test_a_stream_is_relayed() -> None:
    fakes = FakeCluster(1)
    async with running(fakes) as (client, gateway):
        response = await client.post("/generate", json={**GENERATE, "stream": True})
        assert gateway.pool.backends[0].in_flight == 0
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[:2] == ['data: {"response": "Hel"}', 'data: {"response": "lo"}']
    assert events[-1] == "data: [DONE]"


# --- metrics ------------------------------------------------------------------------------


async def test_metrics_count_requests_backends_queue_and_tokens() -> None:
    fakes = FakeCluster(2)
    fakes.backends[1].up = False
    async with running(fakes) as (client, _):
        for _ in range(3):
            await client.post("/generate", json=GENERATE)
        await client.post("/generate", content=b"{bad")
        await client.get("/no/such/path")
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in (
        'comeapi_requests_total{route="/generate",status="200"} 3.0',
        'comeapi_requests_total{route="/generate",status="400"} 1.0',
        'comeapi_requests_total{route="other",status="404"} 1.0',
        'comeapi_request_duration_seconds_count{route="/generate"} 4.0',
        'comeapi_backend_healthy{backend="http://backend-0:8000"} 1.0',
        'comeapi_backend_healthy{backend="http://backend-1:8000"} 0.0',
        'comeapi_backend_in_flight{backend="http://backend-0:8000"} 0.0',
        'comeapi_backend_served_total{backend="http://backend-0:8000"} 3.0',
        'comeapi_backend_failures_total{backend="http://backend-1:8000"} 1.0',
        "comeapi_queue_depth 0.0",
        "comeapi_tokens_generated_total 6.0",
    ):
        assert line in text, line


async def test_each_app_has_its_own_registry() -> None:
    async with running(FakeCluster(1)) as (first, _), running(FakeCluster(1)) as (second, _):
        await first.post("/generate", json=GENERATE)
        text = (await second.get("/metrics")).text
    assert 'comeapi_requests_total{route="/generate",status="200"}' not in text


# --- the cache seam -----------------------------------------------------------------------


def cache_over(tmp_path: Path, kind: str = "prompt", **kw: Any) -> ResponseCache:
    """A real ResponseCache over a SqliteStore holding 3 variants of "cached" (a prompt, or
    with kind="chat" a one-message chat)."""
    store = SqliteStore(tmp_path / "cache.db")
    messages = (("user", "cached"),) if kind == "chat" else None
    key = chat_key(messages, MODEL) if messages else prompt_key("cached", MODEL)
    store.put_many(
        Entry(key, v, "chat" if messages else "prompt", "cached", f"from cache {v}", MODEL,
              messages=messages)
        for v in range(3)
    )  # fmt: skip
    return ResponseCache(store, variants=3, default_model=MODEL, **kw)


async def test_the_cache_answers_before_any_backend(tmp_path: Path) -> None:
    fakes = FakeCluster(1)
    async with running(fakes, cache=cache_over(tmp_path)) as (client, _):
        hit = await client.post("/generate", json={"prompt": "cached"})
        miss = await client.post("/generate", json={"prompt": "not cached"})
        skipped = await client.post(
            "/generate", json={"prompt": "cached"}, headers={"Cache-Control": "no-cache"}
        )
        status = (await client.get("/status")).json()["cache"]
    assert hit.json()["response"].startswith("from cache")
    assert hit.headers["x-cache"] == "HIT"
    assert miss.json()["response"] == "from http://backend-0:8000"
    assert miss.headers["x-cache"] == "MISS"
    assert skipped.json()["response"] == "from http://backend-0:8000"
    assert fakes.total_generations() == 2
    assert status["prompts"] == 1 and status["hits"] == 1 and status["misses"] == 1


async def test_metrics_count_cache_hits_and_misses_and_name_model_routes(
    tmp_path: Path,
) -> None:
    fakes = FakeCluster(1)
    async with running(fakes, cache=cache_over(tmp_path)) as (client, _):
        for _ in range(3):
            await client.post("/generate", json={"prompt": "cached"})
        await client.post("/generate", json={"prompt": "not cached"})
        await client.get(f"/v1/models/{MODEL}")
        await client.get("/models/gemma-3-270m-q4_k_m")
        await client.get("/no/such/route")
        metrics = (await client.get("/metrics")).text
    assert "comeapi_cache_hits_total 3.0" in metrics
    assert "comeapi_cache_misses_total 1.0" in metrics
    assert 'comeapi_requests_total{route="/v1/models/{model}",status="200"} 1.0' in metrics
    assert 'comeapi_requests_total{route="/models/{model}",status="200"} 1.0' in metrics
    assert 'comeapi_requests_total{route="other",status="404"} 1.0' in metrics


async def test_misses_are_rejected_with_the_known_prompts(tmp_path: Path) -> None:
    fakes = FakeCluster(1)
    cache = cache_over(tmp_path)
    async with running(fakes, cache=cache, on_miss="reject") as (client, _):
        miss = await client.post("/generate", json={"prompt": "not cached"})
        forced = await client.post(
            "/generate", json={"prompt": "not cached"}, headers={"Cache-Control": "no-cache"}
        )
        bad = await client.post("/generate", json={"prompt": "not cached", "max_tokens": -1})
    assert miss.status_code == 404 and forced.status_code == 404
    assert miss.json()["error"]["code"] == "prompt_not_cached"
    assert miss.json()["error"]["known_prompts"] == ["cached"]
    assert bad.status_code == 400  # a malformed request is still told what is wrong
    assert fakes.total_generations() == 0


async def test_without_backends_the_cache_still_answers(tmp_path: Path) -> None:
    fakes = FakeCluster(0)
    async with running(fakes, cache=cache_over(tmp_path)) as (client, _):
        hit = await client.post("/v1/completions", json={"prompt": "cached"})
        miss = await client.post("/v1/completions", json={"prompt": "unknown"})
        models = (await client.get("/v1/models")).json()
    assert hit.status_code == 200 and hit.json()["choices"][0]["text"].startswith("from cache")
    assert miss.status_code == 404 and miss.json()["error"]["known_prompts"] == ["cached"]
    assert [m["id"] for m in models["data"]] == [MODEL]


async def test_a_trusted_proxy_fills_the_variant_it_chose(tmp_path: Path) -> None:
    fakes = FakeCluster(1)
    cache = cache_over(tmp_path, variant_secret="s3cret")
    trusted = {"X-Comeapi-Variant": "1", "X-Comeapi-Variant-Secret": "s3cret"}
    async with running(fakes, cache=cache) as (client, _):
        first = await client.post("/generate", json={"prompt": "fresh"}, headers=trusted)
        again = await client.post("/generate", json={"prompt": "fresh"}, headers=trusted)
        spoofed = await client.post(
            "/generate",
            json={"prompt": "fresh"},
            headers={"X-Comeapi-Variant": "2", "X-Comeapi-Variant-Secret": "guess"},
        )
    assert first.headers["x-cache"] == "MISS" and first.headers["x-cache-variant"] == "1"
    assert fakes.backends[0].bodies[0]["seed"] == 1  # generated with the slot's seed
    assert again.headers["x-cache"] == "HIT" and again.headers["x-cache-variant"] == "1"
    assert again.json()["response"] == first.json()["response"]
    assert spoofed.headers["x-cache"] == "HIT"  # served the stored slot, not a forced one
    with SqliteStore(tmp_path / "cache.db") as store:  # the gateway closed its own
        stored = store.get(prompt_key("fresh", MODEL), 1)
    assert stored is not None and stored.answer == "from http://backend-0:8000"
    assert fakes.total_generations() == 1


async def test_a_forwarded_answer_the_cache_would_not_serve_is_marked_no_store(
    tmp_path: Path,
) -> None:
    """nginx keeps whatever 200 comeapi sends a slot: an answer comeapi itself would not
    serve (not approved under serve_states=approved, or a prompt whose answers were all
    rejected) carries X-Comeapi-No-Store, and no reviewed slot is overwritten."""
    fakes = FakeCluster(1)
    cache = cache_over(tmp_path, variant_secret="s", serve_states={"approved"})
    key = prompt_key("cached", MODEL)
    cache.store.put_many([replace(e, state="rejected", checksum="") for e in cache.store.entries()])
    trusted = {"X-Comeapi-Variant": "1", "X-Comeapi-Variant-Secret": "s"}
    async with running(fakes, cache=cache) as (client, _):
        fresh = await client.post("/generate", json={"prompt": "fresh"}, headers=trusted)
        rejected = await client.post("/generate", json={"prompt": "cached"}, headers=trusted)
    assert fresh.headers["x-cache"] == "MISS" and fresh.headers["x-comeapi-no-store"] == "1"
    assert rejected.headers["x-cache"] == "MISS" and rejected.headers["x-comeapi-no-store"] == "1"
    assert "x-cache-variant" not in rejected.headers  # no slot was filled
    with SqliteStore(tmp_path / "cache.db") as store:
        new = store.get(prompt_key("fresh", MODEL), 1)
        assert new is not None and new.state == "pending"  # stored, to be reviewed
        kept = store.get(key, 1)
        assert kept is not None and kept.state == "rejected" and kept.answer == "from cache 1"
    (tmp_path / "default").mkdir()
    default = cache_over(tmp_path / "default", variant_secret="s")
    async with running(FakeCluster(1), cache=default) as (client, _):
        served = await client.post("/generate", json={"prompt": "fresh"}, headers=trusted)
    assert served.headers["x-cache"] == "MISS" and "x-comeapi-no-store" not in served.headers


# --- authentication -----------------------------------------------------------------------


async def test_api_keys_guard_everything_but_health() -> None:
    fakes = FakeCluster(1)
    async with running(fakes, api_keys=["k1", "k2"]) as (client, _):
        assert (await client.get("/health")).status_code == 200
        denied = await client.post("/generate", json=GENERATE)
        assert (await client.get("/metrics")).status_code == 401
        allowed = await client.post(
            "/generate", json=GENERATE, headers={"Authorization": "Bearer k2"}
        )
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    assert allowed.status_code == 200
    assert fakes.total_generations() == 1


class FullDiskStore(SqliteStore):
    """A store whose writes fail as a full disk makes them fail (reads work)."""

    def _put_many(self, entries: list[Entry]) -> int:
        raise StoreError(f"store {self.path}: disk full, cannot write", code="store_full")


async def test_a_failed_store_write_still_returns_the_generated_answer(tmp_path: Path) -> None:
    fakes = FakeCluster(1)
    cache = ResponseCache(FullDiskStore(tmp_path / "c.db"), variants=3, store_misses=True)
    async with running(fakes, cache=cache, store_misses=True) as (client, _):
        r = await client.post("/generate", json={"prompt": "fresh"})
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 200 and r.json()["response"] == "from http://backend-0:8000"
    assert r.headers["x-cache"] == "MISS"
    assert "comeapi_store_write_failures_total 1.0" in metrics


async def test_a_question_about_an_image_is_not_answered_from_the_cache(tmp_path: Path) -> None:
    fakes = FakeCluster(1)
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "cached"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            }
        ]
    }
    async with running(fakes, cache=cache_over(tmp_path, kind="chat")) as (client, _):
        text_only = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "cached"}]}
        )
        image = await client.post("/v1/chat/completions", json=body)
    assert text_only.headers["x-cache"] == "HIT"
    assert image.headers["x-cache"] == "MISS"  # forwarded: the backend decides
    assert fakes.total_generations() == 1
