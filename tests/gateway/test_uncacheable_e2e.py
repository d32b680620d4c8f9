"""The cache and the parameters a stored answer cannot carry, end to end: a gateway with a
store holding the prompt, in front of a real (keyed) backend with the bundled model.

A request for log probabilities, several choices, a format or a grammar, echo or tools on a
cached prompt (or OpenAI's null prompt) is a MISS that reaches the backend (its own /metrics
count it); where misses are refused it is a 400 naming the field. The same prompt without
them is a HIT that never reaches it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from tests.gateway.test_balancer_e2e import Node, start_gateway, wait_healthy
from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

BACKEND_KEY = "backend-secret"
CHAT = [{"role": "user", "content": "What is cached?"}]
PROMPT = "A cached prompt"
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object", "required": ["a"]}},
}
# (route, what is added to a cached request, the field named when misses are refused)
UNCACHEABLE = [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"tools": [TOOL]}, "tools"),
    ("/v1/chat/completions", {"logit_bias": {"531": 5}}, "logit_bias"),
    ("/chat/completions", {"n": 3}, "n"),
    ("/v1/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"prompt": [PROMPT, PROMPT]}, "prompt"),
    ("/completions", {"echo": True}, "echo"),
    ("/chat/completions", {"response_format": JSON_SCHEMA}, "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/completions", {"response_format": JSON_SCHEMA}, "response_format"),
    # llama-server's request extensions, and OpenAI's null prompt (a new document)
    ("/v1/completions", {"grammar": 'root ::= "yes" | "no"'}, "grammar"),
    ("/v1/chat/completions", {"grammar": 'root ::= "yes" | "no"'}, "grammar"),
    ("/v1/chat/completions", {"json_schema": {"type": "object"}}, "json_schema"),
    (
        "/v1/chat/completions",
        {"response_format": {"type": "json_object", "schema": {"type": "object"}}},
        "response_format",
    ),
    ("/v1/completions", {"prompt": None}, "prompt"),
]


@dataclass
class Setup:
    backend: Node
    forwarding: Node
    rejecting: Node


@pytest.fixture(scope="module")
def setup(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("uncacheable")
    db = tmp / "cache.db"
    with SqliteStore(db) as store:
        store.put_many(
            [
                Entry(prompt_key(PROMPT, BUNDLED_MODEL), 0, "prompt", PROMPT, "stored",
                      BUNDLED_MODEL),
                Entry(chat_key([("user", CHAT[0]["content"])], BUNDLED_MODEL), 0, "chat",
                      CHAT[0]["content"], "stored", BUNDLED_MODEL,
                      messages=(("user", CHAT[0]["content"]),)),
            ]
        )  # fmt: skip
    procs: list[Proc] = []

    def spawn(argv: list[str], name: str = "proc") -> Proc:
        procs.append(Proc(argv, tmp / f"{name}.log"))
        return procs[-1]

    try:
        port = free_port()
        backend = Node(
            f"http://127.0.0.1:{port}",
            port,
            spawn(
                comeapi_argv(
                    "backend", "--model-dir", str(model_dir), "--port", str(port),
                    "--threads", "1", "--ctx", "256", "--api-key", BACKEND_KEY,
                ),
                name="backend",
            ),
        )  # fmt: skip
        store = ("--store", f"sqlite:{db}", "--backend-api-key", BACKEND_KEY)
        forwarding = start_gateway(spawn, [backend], *store)
        rejecting = start_gateway(spawn, [backend], *store, "--on-miss", "reject")
        # Health probes work against the keyed backend: /health needs no key.
        wait_healthy(forwarding, 1)
        wait_healthy(rejecting, 1)
        yield Setup(backend, forwarding, rejecting)
    finally:
        for proc in reversed(procs):
            proc.stop()


def base_body(route: str) -> dict[str, Any]:
    if route.endswith("chat/completions"):
        return {"messages": CHAT, "max_tokens": 2}
    return {"prompt": PROMPT, "max_tokens": 2}


def backend_requests(setup: Setup) -> float:
    """Generation requests the backend has answered, whatever their status."""
    text = httpx.get(
        setup.backend.url + "/metrics",
        headers={"Authorization": f"Bearer {BACKEND_KEY}"},
        timeout=5,
    ).text
    routes = ("/generate", "/completions", "/chat/completions")
    total = 0.0
    for line in text.splitlines():
        if line.startswith("comeapi_requests_total{") and any(
            f'route="{r}"' in line or f'route="/v1{r}"' in line for r in routes
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/chat/completions", "/completions"])
def test_the_cached_prompt_alone_is_a_hit(setup: Setup, route: str) -> None:
    before = backend_requests(setup)
    for gateway in (setup.forwarding, setup.rejecting):
        r = httpx.post(gateway.url + route, json=base_body(route), timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-cache"] == "HIT"
    assert backend_requests(setup) == before


@pytest.mark.parametrize(("route", "extra", "param"), UNCACHEABLE)
def test_a_field_no_stored_answer_carries_is_a_miss_or_a_named_400(
    setup: Setup, route: str, extra: dict[str, Any], param: str
) -> None:
    body = {**base_body(route), **extra}
    before = backend_requests(setup)
    forwarded = httpx.post(setup.forwarding.url + route, json=body, timeout=60)
    # The backend answers it, or refuses what its engine does not do yet: either way it
    # was asked, and the stored answer was not given.
    assert forwarded.headers["x-cache"] == "MISS", forwarded.text
    assert forwarded.status_code in (200, 400), forwarded.text
    assert "stored" not in forwarded.text
    assert backend_requests(setup) == before + 1

    refused = httpx.post(setup.rejecting.url + route, json=body, timeout=60)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("not_cacheable", param)
    assert backend_requests(setup) == before + 1
