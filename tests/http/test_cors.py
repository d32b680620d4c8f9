"""comeapi's CORSMiddleware: the headers of actual answers are Starlette's, added cheaply;
preflights are Starlette's, a refused one in OpenAI's error shape."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
from starlette.middleware.cors import CORSMiddleware as StarletteCORS
from starlette.types import ASGIApp, Receive, Scope, Send

from comeapi.http.cors import (
    ALLOW_HEADERS,
    ALLOW_METHODS,
    EXPOSE_HEADERS,
    CORSMiddleware,
    cors_middleware,
)

pytestmark = pytest.mark.anyio

SENT_HEADERS = [(b"content-type", b"application/json"), (b"x-cache", b"HIT")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    # One list for every answer, as the gateway's pre-encoded cache hits are.
    await send({"type": "http.response.start", "status": 200, "headers": SENT_HEADERS})
    await send({"type": "http.response.body", "body": b"{}"})


def wrap(cls: type[StarletteCORS], origins: list[str]) -> ASGIApp:
    return cls(
        inner,
        allow_origins=origins,
        allow_methods=ALLOW_METHODS,
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
    )


async def answer(app: ASGIApp, method: str, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        return await client.request(method, "/v1/models", headers=headers)


def cors_headers(response: httpx.Response) -> Counter[tuple[str, str]]:
    return Counter(
        (k, v) for k, v in response.headers.multi_items() if k.startswith(("access-", "vary"))
    )


@pytest.mark.parametrize("origins", [["https://a.example"], ["https://a.example", "*"]])
@pytest.mark.parametrize(
    "request_headers",
    [
        {},
        {"Origin": "https://a.example"},
        {"Origin": "https://b.example"},
        {"Origin": "https://a.example", "Authorization": "Bearer k"},
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_actual_answers_get_what_starlette_would_add(
    origins: list[str], request_headers: dict[str, str], method: str
) -> None:
    ours = await answer(wrap(CORSMiddleware, origins), method, request_headers)
    stock = await answer(wrap(StarletteCORS, origins), method, request_headers)
    assert cors_headers(ours) == cors_headers(stock)
    assert (ours.status_code, ours.content) == (stock.status_code, stock.content)


async def test_the_inner_apps_header_list_is_not_changed() -> None:
    app = wrap(CORSMiddleware, ["https://a.example"])
    for _ in range(3):
        await answer(app, "GET", {"Origin": "https://a.example"})
    assert SENT_HEADERS == [(b"content-type", b"application/json"), (b"x-cache", b"HIT")]


@pytest.mark.parametrize("origin", ["https://a.example", "https://b.example"])
async def test_preflights_are_starlettes(origin: str) -> None:
    preflight = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang",
    }
    ours = await answer(wrap(CORSMiddleware, ["https://a.example"]), "OPTIONS", preflight)
    stock = await answer(wrap(StarletteCORS, ["https://a.example"]), "OPTIONS", preflight)
    assert ours.status_code == stock.status_code
    assert cors_headers(ours) == cors_headers(stock)
    if stock.status_code == 200:
        assert (
            ours.headers["access-control-allow-headers"]
            == preflight["Access-Control-Request-Headers"]
        )
    else:
        assert ours.json()["error"] == {
            "message": "CORS preflight refused: this origin is not allowed (see --cors-origin)",
            "type": "invalid_request_error",
            "param": None,
            "code": "cors_not_allowed",
        }


async def test_a_preflight_for_another_method_is_refused() -> None:
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "DELETE"}
    refused = await answer(wrap(CORSMiddleware, ["https://a.example"]), "OPTIONS", preflight)
    assert refused.status_code == 400
    assert "method" in refused.json()["error"]["message"]


def test_nothing_is_installed_without_origins() -> None:
    assert cors_middleware([]) == []
    [layer] = cors_middleware(["https://a.example"])
    assert layer.cls is CORSMiddleware
