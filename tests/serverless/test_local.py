"""``comeapi aws serve-local``: the handler over HTTP, each request a payload v2 event."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.cache.dynamo import DynamoStore, create_table, make_client
from comeapi.serverless.local import LocalApiGateway
from tests.aws_local import (
    REGION,
    chat_entries,
    dummy_credentials,
    prompt_entries,
    start_moto_server,
)
from tests.helpers import Proc, comeapi_argv, free_port

MODEL = "gemma-3-270m-q4_k_m.gguf"


class Recorder:
    def __init__(self, result: dict[str, Any]) -> None:
        self.events: list[dict[str, Any]] = []
        self.result = result

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        assert context.get_remaining_time_in_millis() > 0
        self.events.append(event)
        return self.result


@pytest.fixture
def gateway() -> Iterator[Callable[[dict[str, Any]], tuple[LocalApiGateway, Recorder]]]:
    servers: list[LocalApiGateway] = []

    def start(result: dict[str, Any]) -> tuple[LocalApiGateway, Recorder]:
        recorder = Recorder(result)
        server = LocalApiGateway(recorder, "127.0.0.1", 0, max_payload=1000)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, recorder

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_request_becomes_a_v2_event(gateway: Any) -> None:
    server, recorder = gateway(
        {
            "statusCode": 201,
            "headers": {"X-Cache-Variant": "3"},
            "body": "made",
            "isBase64Encoded": False,
        }
    )
    response = httpx.post(
        f"{server.url}/v1/completions?a=1&b=2",
        json={"prompt": "日本"},
        headers={"X-Custom": "Yes"},
        timeout=5,
    )
    assert response.status_code == 201
    assert response.text == "made"
    assert response.headers["x-cache-variant"] == "3"
    event = recorder.events[0]
    assert event["version"] == "2.0"
    assert event["rawPath"] == "/v1/completions"
    assert event["rawQueryString"] == "a=1&b=2"
    assert event["requestContext"]["http"]["method"] == "POST"
    assert event["requestContext"]["http"]["sourceIp"] == "127.0.0.1"
    assert event["headers"]["x-custom"] == "Yes"
    assert event["isBase64Encoded"] is False
    assert json.loads(event["body"]) == {"prompt": "日本"}


def test_binary_bodies_travel_as_base64_both_ways(gateway: Any) -> None:
    payload = base64.b64encode(b"\x00\xff").decode()
    server, recorder = gateway({"statusCode": 200, "body": payload, "isBase64Encoded": True})
    response = httpx.post(f"{server.url}/x", content=b"\xfe\x01", timeout=5)
    assert response.content == b"\x00\xff"
    assert recorder.events[0]["isBase64Encoded"] is True
    assert base64.b64decode(recorder.events[0]["body"]) == b"\xfe\x01"


def test_a_body_over_the_payload_limit_is_413(gateway: Any) -> None:
    server, recorder = gateway({"statusCode": 200, "body": ""})
    response = httpx.post(f"{server.url}/generate", content=b"x" * 1001, timeout=5)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert recorder.events == []


def test_serve_local_against_moto_server(
    spawn: Callable[..., Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    from openai import OpenAI

    dummy_credentials(monkeypatch)
    endpoint = start_moto_server(spawn)
    store = DynamoStore(make_client(REGION, endpoint), "local")
    create_table(store.client, "local")
    messages = (("user", "こんにちは"),)
    store.put_many(prompt_entries("日本の首都は", 5) + chat_entries(messages, 5))

    port = free_port()
    proc = spawn(
        comeapi_argv(
            "aws", "serve-local", "--table", "local", "--endpoint-url", endpoint,
            "--region", REGION, "--port", str(port),
        ),
        name="serve-local",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/status", timeout=60)

    variants = set()
    for _ in range(40):
        hit = httpx.post(f"{url}/generate", json={"prompt": "日本の首都は"}, timeout=10)
        assert hit.status_code == 200
        variant = int(hit.headers["x-cache-variant"])
        assert hit.json()["response"] == f"answer {variant} to 日本の首都は"
        variants.add(variant)
    assert variants == {0, 1, 2, 3, 4}

    miss = httpx.post(f"{url}/generate", json={"prompt": "unknown"}, timeout=10)
    assert miss.status_code == 404
    assert sorted(miss.json()["error"]["known_prompts"]) == ["こんにちは", "日本の首都は"]
    bad = httpx.post(f"{url}/generate", content=b"{", timeout=10)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_json"

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=10, max_retries=0)
    chat = [{"role": "user", "content": "こんにちは"}]
    answer = client.chat.completions.create(model=MODEL, messages=chat)  # type: ignore[arg-type]
    assert answer.choices[0].message.content is not None
    assert answer.choices[0].message.content.startswith("chat answer ")
    stream = client.chat.completions.create(model=MODEL, messages=chat, stream=True)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("chat answer ")
    assert "POST /v1/chat/completions 200" in proc.log()


def test_aws_moto_serves_dynamodb_and_needs_no_credentials(
    spawn: Callable[..., Proc], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    port = free_port()
    proc = spawn(comeapi_argv("aws", "moto", "--port", str(port)), name="moto")
    endpoint = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{endpoint}/moto-api/", timeout=60)
    client = make_client(REGION, endpoint)  # no credentials anywhere: dummy ones are used
    assert create_table(client, "t") is True
    assert DynamoStore(client, "t").catalogue().prompts == ()


def test_serve_local_from_a_snapshot(
    spawn: Callable[..., Proc], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The docs' recipe: package from the table, serve from its snapshot; a push then
    reaches the server through its revision check (CATALOGUE_TTL=0: after every answer)."""
    dummy_credentials(monkeypatch)
    endpoint = start_moto_server(spawn)
    store = DynamoStore(make_client(REGION, endpoint), "local")
    create_table(store.client, "local")
    store.put_many(prompt_entries("日本の首都は", 1))
    where = ["--table", "local", "--endpoint-url", endpoint, "--region", REGION]
    package = tmp_path / "CacheFunction"
    subprocess.run(comeapi_argv("aws", "package", str(package), *where), check=True, timeout=120)
    assert (package / "comeapi-snapshot" / "snapshot.json").is_file()

    port = free_port()
    monkeypatch.setenv("CATALOGUE_TTL", "0")
    proc = spawn(
        comeapi_argv(
            "aws", "serve-local", *where, "--port", str(port),
            "--snapshot", str(package / "comeapi-snapshot"),
        ),
        name="serve-local",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/status", timeout=60)
    status = httpx.get(f"{url}/status", timeout=10).json()["status"]
    assert status["answers_from"] == "snapshot"
    assert status["catalogue_revision"] == 1

    store.put_many(prompt_entries("日本の首都は", 2))  # revision 2: a second variant
    seen = set()
    for _ in range(60):
        hit = httpx.post(f"{url}/generate", json={"prompt": "日本の首都は"}, timeout=10)
        assert hit.status_code == 200
        seen.add(hit.headers["x-cache-variant"])
        if seen == {"0", "1"}:
            break
    assert seen == {"0", "1"}  # variant 1 exists only in the table
    assert httpx.get(f"{url}/status", timeout=10).json()["status"]["answers_from"] == "table"
