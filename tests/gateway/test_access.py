"""Who may call the gateway and how it calls its backends: CORS for browser pages (preflight
before the key check), the key it sends to keyed backends, OpenAI's routes without /v1."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.balancer.fakes import FakeCluster
from tests.gateway.test_app import GENERATE, MODEL, cache_over, running

pytestmark = pytest.mark.anyio

ORIGIN = "https://app.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}
KEYED = {"api_keys": ["k1"], "cors_origins": [ORIGIN]}
AUTH = {"Authorization": "Bearer k1"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- CORS -----------------------------------------------------------------------------------


async def test_a_keyed_gateway_answers_the_preflight_before_asking_for_a_key() -> None:
    async with running(FakeCluster(1), **KEYED) as (client, _):
        response = await client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert set(response.headers["access-control-allow-methods"].split(", ")) >= {"GET", "POST"}


async def test_every_answer_carries_the_origin_hit_miss_stream_and_errors(tmp_path: Path) -> None:
    fakes = FakeCluster(1)
    origin = {"Origin": ORIGIN, **AUTH}
    async with running(fakes, cache=cache_over(tmp_path), **KEYED) as (client, _):
        hit = await client.post("/generate", json={"prompt": "cached"}, headers=origin)
        again = await client.post("/generate", json={"prompt": "cached"}, headers=origin)
        miss = await client.post("/generate", json=GENERATE, headers=origin)
        stream = await client.post("/generate", json={**GENERATE, "stream": True}, headers=origin)
        unauthorized = await client.post("/generate", json=GENERATE, headers={"Origin": ORIGIN})
        invalid = await client.post("/generate", json={"prompt": 1}, headers=origin)
        missing = await client.get("/nowhere", headers=origin)
        models = await client.get("/v1/models", headers=origin)
    assert hit.headers["x-cache"] == "HIT" and again.headers["x-cache"] == "HIT"
    assert miss.headers["x-cache"] == "MISS"
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert (unauthorized.status_code, invalid.status_code, missing.status_code) == (401, 400, 404)
    for response in (hit, again, miss, stream, unauthorized, invalid, missing, models):
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "Origin" in response.headers["vary"]
        # A page may read which answer the cache gave.
        assert "X-Cache" in response.headers["access-control-expose-headers"]
    # The hit's pre-encoded headers are not changed by it: the second hit is the same.
    assert again.headers.get_list("vary") == hit.headers.get_list("vary")


async def test_other_origins_get_no_cors_headers_and_a_refused_preflight() -> None:
    async with running(FakeCluster(1), **KEYED) as (client, _):
        preflight = await client.options(
            "/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        actual = await client.post(
            "/generate", json=GENERATE, headers={"Origin": "https://evil.example", **AUTH}
        )
    assert preflight.status_code == 400
    error = preflight.json()["error"]
    assert error["code"] == "cors_not_allowed" and "origin" in error["message"]
    assert "access-control-allow-origin" not in preflight.headers
    assert actual.status_code == 200  # a browser, not the server, enforces CORS
    assert "access-control-allow-origin" not in actual.headers


class CorsBackends(FakeCluster):
    """Backends that run CORS of their own for some other origin."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle(request)
        response.headers["Access-Control-Allow-Origin"] = "https://backend-page.example"
        response.headers["Vary"] = "Origin"
        return response


async def test_a_backends_cors_headers_are_not_relayed() -> None:
    async with running(CorsBackends(1), **KEYED) as (client, _):
        r = await client.post("/generate", json=GENERATE, headers={"Origin": ORIGIN, **AUTH})
        stream = await client.post(
            "/generate", json={**GENERATE, "stream": True}, headers={"Origin": ORIGIN, **AUTH}
        )
    for response in (r, stream):
        assert response.headers.get_list("access-control-allow-origin") == [ORIGIN]
        assert response.headers.get_list("vary") == ["Origin"]


async def test_without_cors_origins_nothing_is_allowed() -> None:
    async with running(FakeCluster(1)) as (client, _):
        preflight = await client.options("/v1/models", headers=PREFLIGHT)
        actual = await client.get("/v1/models", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in actual.headers


async def test_any_origin_with_a_star() -> None:
    async with running(FakeCluster(1), cors_origins=["*"]) as (client, _):
        actual = await client.get("/v1/models", headers={"Origin": "https://any.example"})
    assert actual.headers["access-control-allow-origin"] == "*"


# --- the key the gateway sends its backends ---------------------------------------------------


async def test_the_backend_key_replaces_the_clients_key(tmp_path: Path) -> None:
    fakes = FakeCluster(1)
    settings = {"api_keys": ["client-key"], "backend_api_key": "backend-key"}
    async with running(fakes, **settings) as (client, _):
        generated = await client.post(
            "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer client-key"}
        )
        listed = await client.get("/models", headers={"Authorization": "Bearer client-key"})
    assert generated.status_code == 200 and listed.status_code == 200
    sent = dict(fakes.backends[0].authorizations)
    assert sent["/v1/completions"] == "Bearer backend-key"
    assert sent["/models"] == sent["/v1/models"] == "Bearer backend-key"
    assert sent["/health"] is None  # probes need no key: /health is public on a backend


async def test_without_a_backend_key_the_clients_authorization_is_passed_on() -> None:
    fakes = FakeCluster(1)
    async with running(fakes) as (client, _):
        await client.post("/generate", json=GENERATE, headers={"Authorization": "Bearer shared"})
    assert ("/generate", "Bearer shared") in fakes.backends[0].authorizations


# --- OpenAI's routes without /v1 --------------------------------------------------------------


async def test_routes_without_v1_are_forwarded_and_cached_as_with_it(tmp_path: Path) -> None:
    fakes = FakeCluster(1)
    chat = {"messages": [{"role": "user", "content": "cached"}]}
    async with running(fakes, cache=cache_over(tmp_path, kind="chat")) as (client, _):
        hit = await client.post("/chat/completions", json=chat)
        miss = await client.post("/completions", json={"prompt": "fresh"})
    assert hit.headers["x-cache"] == "HIT"
    assert hit.json()["object"] == "chat.completion"
    assert hit.json()["choices"][0]["message"]["content"].startswith("from cache")
    assert miss.headers["x-cache"] == "MISS"
    assert fakes.backends[0].bodies == [{"prompt": "fresh"}]
    assert ("/completions", None) in fakes.backends[0].authorizations


async def test_the_official_client_without_v1_and_a_comeapi_client(tmp_path: Path) -> None:
    """openai's client with a base_url that lacks /v1: models.list(), models.retrieve(),
    completions and chat (cached answers); a ComeAPI client reads "models" from /models."""
    fakes = FakeCluster(1)
    store = cache_over(tmp_path)
    (tmp_path / "chat").mkdir()
    chat_store = cache_over(tmp_path / "chat", kind="chat")
    async with running(fakes, cache=store) as (client, _):
        api = openai.AsyncOpenAI(
            base_url="http://gateway", api_key="unused", http_client=client, max_retries=0
        )
        listed = (await api.models.list()).data
        assert [m.id for m in listed] == [MODEL, "m.gguf"]  # the cached model and the backend's
        assert (await api.models.retrieve("m.gguf")).id == "m.gguf"
        completion = await api.completions.create(model=MODEL, prompt="cached", max_tokens=4)
        assert completion.choices[0].text.startswith("from cache")
        comeapi_models = (await client.get("/models")).json()["models"]
        assert [m["name"] for m in comeapi_models] == [MODEL, "m.gguf"]
    async with running(fakes, cache=chat_store) as (client, _):
        api = openai.AsyncOpenAI(
            base_url="http://gateway", api_key="unused", http_client=client, max_retries=0
        )
        chat = await api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "cached"}]
        )
        assert chat.choices[0].message.content.startswith("from cache")
