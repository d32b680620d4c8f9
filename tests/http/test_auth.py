"""APIKeyMiddleware: Bearer keys on everything but /health, 401 in OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from comeapi.http.auth import APIKeyMiddleware

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"inner"})


def client(keys: list[str]) -> httpx.AsyncClient:
    app = APIKeyMiddleware(inner, keys)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw")


async def test_without_keys_everything_passes() -> None:
    async with client([]) as c:
        assert (await c.get("/generate")).text == "inner"


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("Bearer wrong", "invalid_api_key"),
        ("Bearer secret-1x", "invalid_api_key"),
        ("Bearer ", "missing_api_key"),
        ("Basic c2VjcmV0LTE=", "missing_api_key"),
        ("secret-1", "missing_api_key"),
    ],
)
async def test_a_missing_or_wrong_key_gets_401_in_openai_shape(
    header: str | None, code: str
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    async with client(["secret-1", "secret-2"]) as c:
        response = await c.post("/v1/chat/completions", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error"
    assert error["code"] == code
    assert "secret" not in error["message"]


@pytest.mark.parametrize("header", ["Bearer secret-1", "Bearer secret-2", "bearer  secret-2 "])
async def test_any_configured_key_passes(header: str) -> None:
    async with client(["secret-1", "secret-2"]) as c:
        response = await c.get("/status", headers={"Authorization": header})
    assert response.status_code == 200
    assert response.text == "inner"


async def test_health_needs_no_key() -> None:
    async with client(["secret-1"]) as c:
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/health/")).status_code == 401  # only the exact path is public
        assert (await c.get("/")).status_code == 401
