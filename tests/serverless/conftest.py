from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from comeapi.cache.dynamo import DynamoStore, create_table
from comeapi.cache.store import Entry
from tests.aws_local import REGION, chat_entries, dummy_credentials, prompt_entries

EVENTS = Path(__file__).parent / "events"
TABLE = "comeapi-serverless-test"
# The prompts the event fixtures ask for.
GENERATE_PROMPT = "日本の首都はどこですか"
COMPLETION_PROMPT = "Once upon a time"
CHAT = (("user", "こんにちは"),)


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS / name).read_text(encoding="utf-8"))
    return event


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    dummy_credentials(monkeypatch)
    with mock_aws():
        yield


@pytest.fixture
def entries() -> list[Entry]:
    return (
        prompt_entries(GENERATE_PROMPT, 5)
        + prompt_entries(COMPLETION_PROMPT, 5)
        + chat_entries(CHAT, 5)
    )


@pytest.fixture
def store(aws: None, entries: list[Entry]) -> DynamoStore:
    client = boto3.client("dynamodb", region_name=REGION)
    create_table(client, TABLE)
    store = DynamoStore(client, TABLE)
    store.replace_all(entries)
    return store


@pytest.fixture
def calls(store: DynamoStore) -> list[str]:
    """The DynamoDB operations made through ``store``'s client, in order."""
    made: list[str] = []

    def record(model: Any, **kwargs: Any) -> None:
        made.append(model.name)

    store.client.meta.events.register("before-call.dynamodb.*", record)
    return made


COLD = """
import json, sys, time
import comeapi.serverless.handler as h
from comeapi.serverless.events import http_api_event
event = http_api_event("POST", "/generate", body=json.dumps({"prompt": sys.argv[1]}).encode())
result = h.handler(event, None)
print(json.dumps({
    "status": result["statusCode"],
    "cache": result["headers"].get("X-Cache"),
    "file": h.__file__,
    "loaded": sorted(m for m in ("boto3", "botocore") if m in sys.modules),
}))
"""


def cold_start(package: Path, table: str, prompt: str) -> dict[str, Any]:
    """Import the handler from ``package`` in a fresh interpreter without site-packages
    (``-S``: boto3 cannot even be found), as Lambda's init would, and send one event."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(package),
        "PYTHONDONTWRITEBYTECODE": "1",
        "AWS_LAMBDA_FUNCTION_NAME": "comeapi-test",
        "TABLE_NAME": table,
        "AWS_REGION": REGION,
    }
    out = subprocess.run(
        [sys.executable, "-S", "-c", COLD, prompt],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=package,
    )
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result
