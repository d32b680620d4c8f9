"""The backend's HTTP plumbing over real HTTP with real inference on the bundled model: API
keys, CORS, OpenAI's routes without /v1 (the official client), /models for both kinds of
client, and /metrics scraped after real generations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

KEY = "k2"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = comeapi_argv(
        "backend",
        "--model-dir", str(model_dir),
        "--port", str(port),
        "--threads", "1",
        "--ctx", "256",
        "--backend-queue", "1",
        "--api-key", "k1",
        "--api-key", KEY,
        "--cors-origin", ORIGIN,
    )  # fmt: skip
    proc = Proc(argv, tmp_path_factory.mktemp("backend") / "backend.log")
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/health", timeout=120)
        yield url
    finally:
        proc.stop()


def client(url: str, key: str = KEY) -> openai.OpenAI:
    """The official client with a base_url that lacks /v1."""
    return openai.OpenAI(base_url=url, api_key=key, timeout=60, max_retries=0)


# --- keys -----------------------------------------------------------------------------------


def test_every_route_but_health_needs_a_key(url: str) -> None:
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    body = {"prompt": "Hi", "max_tokens": 1}
    for method, path in [
        ("GET", "/"),
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("GET", "/models"),
        ("GET", "/v1/models"),
        ("GET", f"/models/{BUNDLED_MODEL}"),
        ("POST", "/generate"),
        ("POST", "/completions"),
        ("POST", "/v1/chat/completions"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, url + path, json=body, headers=headers, timeout=5)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "authentication_error"
    assert httpx.get(url + "/status", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_the_official_client_with_a_wrong_key_gets_authentication_error(url: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()


# --- OpenAI's routes without /v1, and /models for both kinds of client ---------------------


def test_the_official_client_without_v1(url: str) -> None:
    api = client(url)
    [model] = api.models.list().data
    assert model.id == BUNDLED_MODEL and model.object == "model"
    assert api.models.retrieve(BUNDLED_MODEL).id == BUNDLED_MODEL

    completion = api.completions.create(model=BUNDLED_MODEL, prompt="Hello", max_tokens=3)
    assert completion.object == "text_completion"
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 3

    chat = api.chat.completions.create(
        model=BUNDLED_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"

    stream = api.chat.completions.create(
        model=BUNDLED_MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        stream=True,
    )
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_comeapi_clients_still_read_models_from_models(url: str) -> None:
    body = httpx.get(url + "/models", headers=AUTH, timeout=5).json()
    # ComeAPI's original shape, under the key its clients read ...
    assert body["models"] == [{"name": BUNDLED_MODEL, "size_mb": pytest.approx(241.4, abs=1)}]
    # ... beside OpenAI's, which /v1/models answers alone.
    openai_list = httpx.get(url + "/v1/models", headers=AUTH, timeout=5).json()
    assert body["object"] == "list" and body["data"] == openai_list["data"]
    assert set(openai_list) == {"object", "data"}


# --- CORS -----------------------------------------------------------------------------------


def test_preflight_is_answered_before_the_key_and_answers_carry_the_origin(url: str) -> None:
    preflight = httpx.options(
        url + "/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=5,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    with httpx.stream(
        "POST", url + "/chat/completions", json=body, headers={"Origin": ORIGIN, **AUTH}
    ) as stream:
        assert stream.status_code == 200
        assert stream.headers["access-control-allow-origin"] == ORIGIN
        assert b"[DONE]" in stream.read()
    denied = httpx.get(url + "/models", headers={"Origin": ORIGIN}, timeout=5)
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == ORIGIN


# --- /metrics -------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics as {'name{label="v",...}': value}."""
    text = httpx.get(url + "/metrics", headers=AUTH, timeout=5).text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_metrics_after_real_generations(url: str) -> None:
    before = scrape(url)
    api = client(url)
    usages = []
    for prompt in ("Once upon a time", "The capital of France is"):
        r = httpx.post(
            url + "/v1/completions",
            json={"prompt": prompt, "max_tokens": 8, "temperature": 0},
            headers=AUTH,
            timeout=60,
        )
        usages.append(r.json()["usage"])
    stream = api.chat.completions.create(
        model=BUNDLED_MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    usages.append(usage.model_dump())
    after = scrape(url)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("comeapi_tokens_generated_total") == sum(u["completion_tokens"] for u in usages)
    assert grew("comeapi_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert grew("comeapi_time_to_first_token_seconds_count") == 3
    assert grew('comeapi_requests_total{route="/v1/completions",status="200"}') == 2
    assert grew('comeapi_requests_total{route="/chat/completions",status="200"}') == 1
    assert grew("comeapi_decode_seconds_total") > 0
    assert after["comeapi_last_decode_tokens_per_second"] > 0
    assert after["comeapi_slots_capacity"] == 1
    assert after["comeapi_slots_busy"] == 0 and after["comeapi_queue_depth"] == 0
    assert after["comeapi_ready"] == 1


def test_metrics_show_busy_slots_and_the_queue(url: str) -> None:
    async def scenario() -> dict[str, float]:
        long = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True}
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as http:
            tasks = [asyncio.create_task(_read_forever(http, url, long)) for _ in range(2)]
            try:
                deadline = time.monotonic() + 10
                while (await http.get(url + "/health")).json()["in_flight"] < 2:
                    assert time.monotonic() < deadline, "the two requests never overlapped"
                    await asyncio.sleep(0.02)
                return await asyncio.to_thread(scrape, url)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    during = asyncio.run(scenario())
    assert during["comeapi_slots_busy"] == 1
    assert during["comeapi_queue_depth"] == 1


async def _read_forever(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    async with http.stream("POST", url + "/generate", json=body) as r:
        async for _ in r.aiter_bytes():
            pass
