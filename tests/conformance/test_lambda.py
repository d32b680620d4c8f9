"""The conformance table against the Lambda handler: API Gateway v2 events, DynamoDB on
moto's server over HTTP, one answer per key of the table, misses refused. And the same
cached answer from the gateway and from Lambda, chunk for chunk."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from comeapi.serverless.events import http_api_event
from comeapi.serverless.handler import ServerlessApp
from tests.conformance.table import API_KEY, CASES, Case, check_reply


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(lambda_app: ServerlessApp, case: Case) -> None:
    for _ in range(case.asks):
        event = http_api_event("POST", case.route, headers=case.headers, body=case.raw)
        result = lambda_app(event)
        body = result["body"]
        raw = base64.b64decode(body) if result["isBase64Encoded"] else body.encode("utf-8")
        headers = {k.lower(): v for k, v in result["headers"].items()}
        check_reply(case, result["statusCode"], headers, raw, tier="lambda")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
        ("/v1/completions", {"prompt": "Hello", "stream_options": {"include_usage": True}}),
        ("/generate", {"prompt": "Hello"}),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_the_gateway_and_lambda_send_the_same_answer(
    gateway: str,
    client: httpx.Client,
    lambda_app: ServerlessApp,
    route: str,
    body: dict[str, Any],
    stream: bool,
) -> None:
    """The same cached answer, byte for byte but for ids and timestamps, chunk for chunk."""
    raw = json.dumps({**body, "stream": stream}).encode()
    key = {"Authorization": f"Bearer {API_KEY}"}
    over_http = client.post(gateway + route, content=raw, headers=key)
    result = lambda_app(http_api_event("POST", route, headers=key, body=raw))
    assert over_http.status_code == result["statusCode"] == 200
    assert over_http.headers["content-type"] == result["headers"]["Content-Type"]
    assert comparable(over_http.content) == comparable(result["body"].encode())


def comparable(body: bytes) -> list[Any]:
    """The JSON documents of a body (one, or one per SSE event), without id and created."""
    if body.startswith(b"data: "):
        texts = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e]
    else:
        texts = [body]
    docs: list[Any] = []
    for text in texts:
        doc = "[DONE]" if text == b"[DONE]" else json.loads(text)
        if isinstance(doc, dict):
            doc.pop("id", None)
            doc.pop("created", None)
        docs.append(doc)
    return docs
