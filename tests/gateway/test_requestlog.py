"""The request log against stand-in backends (httpx.MockTransport) and a real SqliteStore:
one record per request with what the cache and the forwarder know, the bounded ring, the
access log's two line formats, and /dashboard's key rule and data."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.balancer.pool import BackendPool
from comeapi.cache.sqlite import SqliteStore
from comeapi.gateway.app import Gateway, create_app
from comeapi.gateway.cache import ResponseCache
from comeapi.gateway.requestlog import ACCESS_LOGGER, FIELDS, AccessLog, RequestRecord
from comeapi.settings import load_settings
from tests.balancer.fakes import FakeCluster
from tests.cache.factory import MODEL, sample_entries

pytestmark = pytest.mark.anyio

KNOWN = "こんにちは、調子はどうですか？"  # prompt 0 of sample_entries: 8 completion tokens


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """What the access logger writes (a handler of the test's own, so none goes to stdout)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    saved = logger.handlers[:], logger.level, logger.propagate
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield out
    logger.handlers[:], logger.level, logger.propagate = saved


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, fakes: FakeCluster | None = None, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    fakes = fakes or FakeCluster(1, models=(MODEL,))
    store = SqliteStore(tmp_path / "cache.db")
    store.put_many(sample_entries(prompts=2, variants=3))
    settings = load_settings(None, backends=fakes.urls, variants=3, **overrides)
    cache = ResponseCache(store, variants=3)
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


def newest(gateway: Gateway, count: int = 1) -> list[dict[str, Any]]:
    return list(gateway.requests.latest(count))


# --- records --------------------------------------------------------------------------------


async def test_a_hit_records_its_variant_model_and_tokens(tmp_path: Path) -> None:
    async with running(tmp_path) as (client, gateway):
        response = await client.post("/generate", json={"prompt": KNOWN})
        [record] = newest(gateway)
    assert response.headers["x-cache"] == "HIT"
    assert record["cache"] == "HIT"
    assert record["variant"] == int(response.headers["x-cache-variant"])
    assert (record["model"], record["prompt_tokens"], record["completion_tokens"]) == (MODEL, 5, 8)
    assert (record["method"], record["path"], record["status"]) == ("POST", "/generate", 200)
    assert record["backend"] is None
    assert record["client"] == "127.0.0.1"
    assert record["duration_ms"] >= 0 and record["time"] > 0
    assert list(record) == list(FIELDS)


async def test_a_miss_records_the_backend_and_the_answers_tokens(tmp_path: Path) -> None:
    fakes = FakeCluster(2, models=(MODEL,))
    async with running(tmp_path, fakes) as (client, gateway):
        first = await client.post("/generate", json={"prompt": "not cached", "max_tokens": 2})
        second = await client.post("/v1/completions", json={"prompt": "nor this", "model": MODEL})
        records = newest(gateway, 2)
    assert first.headers["x-cache"] == second.headers["x-cache"] == "MISS"
    assert [r["cache"] for r in records] == ["MISS", "MISS"]
    # Round robin: each fake answered one, and the record names it.
    assert {r["backend"] for r in records} == set(fakes.urls)
    for record in records:
        assert (record["prompt_tokens"], record["completion_tokens"]) == (3, 2)
        assert record["model"] == MODEL  # from the answer's body
        assert record["variant"] is None and record["status"] == 200


async def test_a_streamed_miss_counts_the_streams_tokens(tmp_path: Path) -> None:
    async with running(tmp_path) as (client, gateway):
        async with client.stream(
            "POST", "/generate", json={"prompt": "stream me", "stream": True}
        ) as response:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        [record] = newest(gateway)
    assert b'"Hel"' in body
    assert record["cache"] == "MISS" and record["backend"] == "http://backend-0:8000"
    assert record["completion_tokens"] == 2  # two text events, no usage reported
    assert record["prompt_tokens"] is None


async def test_skipping_the_cache_and_errors_have_no_cache_verdict(tmp_path: Path) -> None:
    async with running(tmp_path) as (client, gateway):
        await client.post(
            "/generate", json={"prompt": KNOWN}, headers={"cache-control": "no-cache"}
        )
        bad = await client.post("/generate", content=b"{not json")
        records = newest(gateway, 2)
    assert bad.status_code == 400
    error, bypass = records
    assert (error["status"], error["cache"], error["backend"]) == (400, None, None)
    assert (bypass["status"], bypass["cache"]) == (200, None)
    assert bypass["backend"] == "http://backend-0:8000"


async def test_a_rejected_miss_is_a_miss_without_a_backend(tmp_path: Path) -> None:
    async with running(tmp_path, on_miss="reject") as (client, gateway):
        response = await client.post("/generate", json={"prompt": "unknown"})
        [record] = newest(gateway)
    assert response.status_code == 404
    assert (record["status"], record["cache"], record["backend"]) == (404, "MISS", None)


async def test_other_routes_are_recorded_but_not_the_dashboards_polling(tmp_path: Path) -> None:
    async with running(tmp_path) as (client, gateway):
        await client.get("/status")
        await client.get("/no/such/route")
        await client.get("/dashboard")
        await client.get("/dashboard/data")
        records = newest(gateway, 10)
    assert [(r["path"], r["status"]) for r in records] == [
        ("/no/such/route", 404),
        ("/status", 200),
    ]
    assert records[0]["cache"] is None and records[0]["model"] is None


async def test_only_the_last_n_are_kept(tmp_path: Path) -> None:
    async with running(tmp_path, request_log_size=3) as (client, gateway):
        for i in range(5):
            await client.get(f"/route-{i}")
        records = newest(gateway, 10)
        assert gateway.requests.total == 5
    assert [r["path"] for r in records] == ["/route-4", "/route-3", "/route-2"]


# --- the access log -------------------------------------------------------------------------


async def test_access_log_is_off_by_default(tmp_path: Path, access_lines: io.StringIO) -> None:
    async with running(tmp_path) as (client, _):
        await client.post("/generate", json={"prompt": KNOWN})
        await client.get("/status")
    assert access_lines.getvalue() == ""


async def test_json_access_log_has_fixed_fields(tmp_path: Path, access_lines: io.StringIO) -> None:
    async with running(tmp_path, access_log="json") as (client, _):
        hit = await client.post("/generate", json={"prompt": KNOWN})
        await client.post("/generate", json={"prompt": "not cached"})
        await client.get("/dashboard/data")  # logged, though kept out of the table
    lines = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    assert [list(line) for line in lines] == [list(FIELDS)] * 3
    first, second, third = lines
    assert first["cache"] == "HIT" and first["variant"] == int(hit.headers["x-cache-variant"])
    assert (first["prompt_tokens"], first["completion_tokens"]) == (5, 8)
    assert second["cache"] == "MISS" and second["backend"] == "http://backend-0:8000"
    assert third["path"] == "/dashboard/data" and third["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])


TEXT_LINE = re.compile(
    r'(?P<client>"(?:[^"\\]|\\.)*"|[^\s"]+) - - '
    r"\[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000)\] "
    r'(?P<request>"(?:[^"\\]|\\.)*") (?P<status>\d{3}) - (?P<extra>.*)'
)


async def test_text_access_log_is_common_log_format_plus_fields(
    tmp_path: Path, access_lines: io.StringIO
) -> None:
    async with running(tmp_path, access_log="text") as (client, _):
        await client.post("/generate", json={"prompt": KNOWN})
        await client.post("/generate", json={"prompt": 'a "quoted"\nprompt', "model": 'm "x"\n'})
    hit, odd = access_lines.getvalue().splitlines()
    match = TEXT_LINE.fullmatch(hit)
    assert match is not None, hit
    assert json.loads(match["request"]) == "POST /generate" and match["status"] == "200"
    extra = dict(part.split("=", 1) for part in match["extra"].split(" "))
    assert list(extra) == list(FIELDS[5:])
    assert extra["cache"] == "HIT" and extra["model"] == MODEL and extra["backend"] == "-"
    assert (extra["prompt_tokens"], extra["completion_tokens"]) == ("5", "8")
    # A client's model name cannot break the line or forge a field: it is quoted.
    match = TEXT_LINE.fullmatch(odd)
    assert match is not None, odd
    assert "\n" not in odd and 'model="m \\"x\\"\\n"' in odd


def test_a_forwarded_client_cannot_forge_the_start_of_a_line() -> None:
    # X-Forwarded-For (trusted from loopback by default) becomes the record's client.
    forged = '6.6.6.6 - - [01/Jan/2020:00:00:00 +0000] "GET /forged-by-xff" 200 - cache=HIT'
    for client, path in ((forged, "/health"), ("10.0.0.1", '/x" 200 -\nforged')):
        record = RequestRecord("GET", path, (client, 0))
        record.time, record.status, record.seconds = 1.0e9, 404, 0.001
        line = AccessLog("text").text_line(record.fields())
        match = TEXT_LINE.fullmatch(line)
        assert match is not None and "\n" not in line, line
        assert match["status"] == "404" and match["time"].endswith("+0000")
        shown = match["client"]
        assert (json.loads(shown) if shown.startswith('"') else shown) == client
        assert json.loads(match["request"]) == f"GET {path}"
    assert TEXT_LINE.fullmatch(line) is not None and line.startswith("10.0.0.1 - - [")


# --- /dashboard ----------------------------------------------------------------------------


async def test_dashboard_page_is_public_and_its_data_needs_the_key(tmp_path: Path) -> None:
    async with running(tmp_path, api_keys=["k1"]) as (client, _):
        page = await client.get("/dashboard")
        script = await client.get("/dashboard/dashboard.js")
        without = await client.get("/dashboard/data")
        wrong = await client.get("/dashboard/data", headers={"Authorization": "Bearer nope"})
        keyed = await client.get("/dashboard/data", headers={"Authorization": "Bearer k1"})
        in_url = await client.get("/dashboard/data?api_key=k1")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert script.status_code == 200 and "sessionStorage" in script.text
    assert (without.status_code, wrong.status_code, in_url.status_code) == (401, 401, 401)
    assert keyed.status_code == 200 and keyed.headers["cache-control"] == "no-store"
    # The public files carry no data of the gateway.
    assert "backend-0" not in page.text and KNOWN not in page.text


async def test_dashboard_data_shows_backends_queue_hits_and_requests(tmp_path: Path) -> None:
    fakes = FakeCluster(2, models=(MODEL,))
    fakes.backends[1].up = False
    async with running(tmp_path, fakes, queue_size=7) as (client, _):
        variants = set()
        for _ in range(12):
            hit = await client.post("/generate", json={"prompt": KNOWN})
            variants.add(int(hit.headers["x-cache-variant"]))
        await client.post("/generate", json={"prompt": "not cached"})
        data = (await client.get("/dashboard/data", params={"rows": 5})).json()
    up, down = data["backends"]
    assert up["healthy"] is True and up["served"] == 1 and up["capacity"] == 1
    assert down["healthy"] is False and down["reason"] == "connection refused"
    assert "restarts" in up and "last_check" in up and "latency_ms" in up
    assert data["queue"] == {"depth": 0, "limit": 7, "timeout": 60.0}
    cache = data["cache"]
    assert (cache["hits"], cache["misses"]) == (12, 1)
    [known] = [p for p in cache["prompts_shown"] if p["prompt"] == KNOWN]
    assert sum(known["hits_by_variant"].values()) == 12
    assert {int(v) for v, n in known["hits_by_variant"].items() if n} == variants
    assert data["tokens_generated"] == 2
    recent = data["requests"]["recent"]
    assert len(recent) == 5 and data["requests"]["total"] == 13
    assert recent[0]["cache"] == "MISS" and recent[1]["cache"] == "HIT"
