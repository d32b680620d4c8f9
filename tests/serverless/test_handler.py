"""The Lambda handler, called directly with API Gateway events (moto cannot run Lambda)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from comeapi.cache.dynamo import DynamoStore
from comeapi.cache.dynamo_items import Catalogue, encode_catalogue, encode_entry
from comeapi.cache.store import Entry, PromptInfo
from comeapi.errors import ConfigError
from comeapi.serverless import handler as handler_module
from comeapi.serverless.events import http_api_event
from comeapi.serverless.handler import ServerlessApp
from comeapi.serverless.source import TableSource
from tests.aws_local import REGION, dummy_credentials, prompt_entries
from tests.serverless.conftest import (
    CHAT,
    COMPLETION_PROMPT,
    GENERATE_PROMPT,
    TABLE,
    load_event,
)

MODEL = "gemma-3-270m-q4_k_m.gguf"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def post(path: str, body: Any) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_api_event("POST", path, headers={"content-type": "application/json"}, body=raw)


def decoded(result: dict[str, Any]) -> Any:
    assert result["isBase64Encoded"] is False
    return json.loads(result["body"])


def assert_error(result: dict[str, Any], status: int, code: str) -> dict[str, Any]:
    assert result["statusCode"] == status, result
    assert result["headers"]["Content-Type"] == "application/json"
    error: dict[str, Any] = decoded(result)["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


# --- the documented event shapes ----------------------------------------------------------


def test_http_api_v2_generate(store: DynamoStore) -> None:
    result = ServerlessApp(TableSource(store))(load_event("http_api_v2_generate.json"), None)
    assert result["statusCode"] == 200
    variant = int(result["headers"]["X-Cache-Variant"])
    assert result["headers"]["X-Cache"] == "HIT"
    body = decoded(result)
    assert body == {
        "response": f"answer {variant} to {GENERATE_PROMPT}",
        "model": MODEL,
        "finish_reason": "stop",
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 7 + variant,
            "total_tokens": 12 + variant,
        },
        "variant": variant,
    }


def test_http_api_v2_chat_with_a_stage_and_a_base64_body(store: DynamoStore) -> None:
    event = load_event("http_api_v2_chat_base64_prod_stage.json")
    assert event["isBase64Encoded"] and event["rawPath"].startswith("/prod/")
    result = ServerlessApp(TableSource(store), api_keys=("sk-local-test",))(event, None)
    assert result["statusCode"] == 200, result
    body = decoded(result)
    variant = int(result["headers"]["X-Cache-Variant"])
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": f"chat answer {variant}",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"


def test_rest_api_v1_completions(store: DynamoStore) -> None:
    result = ServerlessApp(TableSource(store))(load_event("rest_api_v1_completions.json"), None)
    assert result["statusCode"] == 200, result
    body = decoded(result)
    variant = int(result["headers"]["X-Cache-Variant"])
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == f"answer {variant} to {COMPLETION_PROMPT}"
    assert body["usage"]["completion_tokens"] == 7 + variant


def test_http_api_v2_models(store: DynamoStore) -> None:
    result = ServerlessApp(TableSource(store))(load_event("http_api_v2_get_models.json"), None)
    assert decoded(result) == {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "comeapi"}],
    }


def test_models_without_v1_serves_openai_and_comeapi_clients(store: DynamoStore) -> None:
    app = ServerlessApp(TableSource(store))
    body = decoded(app(http_api_event("GET", "/models"), None))
    entry = {"id": MODEL, "object": "model", "created": 0, "owned_by": "comeapi"}
    assert body == {
        "object": "list",
        "data": [entry],
        "models": [MODEL],
        "default_model": MODEL,
    }
    for path in (f"/models/{MODEL}", "/v1/models/" + MODEL.removesuffix(".gguf")):
        assert decoded(app(http_api_event("GET", path), None)) == entry
    assert_error(app(http_api_event("GET", "/models/nope"), None), 404, "model_not_found")


def test_chat_without_v1_is_a_hit(store: DynamoStore) -> None:
    body = {"messages": [{"role": r, "content": c} for r, c in CHAT]}
    result = ServerlessApp(TableSource(store))(post("/chat/completions", body), None)
    assert result["statusCode"] == 200, result["body"]
    assert result["headers"]["X-Cache"] == "HIT"
    assert decoded(result)["object"] == "chat.completion"


def test_status_lists_what_is_cached(store: DynamoStore) -> None:
    body = decoded(ServerlessApp(TableSource(store))(http_api_event("GET", "/status"), None))
    assert body["status"]["cached_prompts"] == 3
    assert body["status"]["cached_answers"] == 15


# --- the cache path ---------------------------------------------------------------------


def test_random_choice_covers_every_variant(store: DynamoStore) -> None:
    app = ServerlessApp(TableSource(store))
    seen: Counter[int] = Counter()
    for _ in range(150):
        result = app(post("/generate", {"prompt": GENERATE_PROMPT}), None)
        variant = int(result["headers"]["X-Cache-Variant"])
        assert decoded(result)["response"] == f"answer {variant} to {GENERATE_PROMPT}"
        seen[variant] += 1
    assert set(seen) == {0, 1, 2, 3, 4}


def test_a_hit_is_one_get_item_and_writes_nothing(store: DynamoStore, calls: list[str]) -> None:
    app = ServerlessApp(TableSource(store))
    app(post("/generate", {"prompt": GENERATE_PROMPT}), None)  # reads the catalogue once
    calls.clear()
    for _ in range(10):
        result = app(post("/v1/completions", {"prompt": COMPLETION_PROMPT}), None)
        assert result["statusCode"] == 200
    assert calls == ["GetItem"] * 10


def test_generate_and_completions_share_a_key(store: DynamoStore) -> None:
    app = ServerlessApp(TableSource(store), randbelow=lambda n: n - 1)
    result = app(post("/v1/completions", {"prompt": f"  {GENERATE_PROMPT}\r\n"}), None)
    assert decoded(result)["choices"][0]["text"] == f"answer 4 to {GENERATE_PROMPT}"


def test_model_name_selects_the_cached_model(store: DynamoStore) -> None:
    app = ServerlessApp(TableSource(store))
    ok = app(post("/generate", {"prompt": GENERATE_PROMPT, "model_name": MODEL}), None)
    assert ok["statusCode"] == 200
    other = app(post("/generate", {"prompt": GENERATE_PROMPT, "model_name": "other.gguf"}), None)
    assert_error(other, 404, "prompt_not_cached")


def test_stream_is_one_complete_sse_body(store: DynamoStore) -> None:
    app = ServerlessApp(TableSource(store), randbelow=lambda n: 2)
    messages = [{"role": r, "content": c} for r, c in CHAT]
    result = app(
        post(
            "/v1/chat/completions",
            {"messages": messages, "stream": True, "stream_options": {"include_usage": True}},
        ),
        None,
    )
    assert result["statusCode"] == 200
    assert result["headers"]["Content-Type"] == "text/event-stream"
    events = [line[6:] for line in result["body"].split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "chat answer 2"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_content_parts_match_the_plain_text_prompt(store: DynamoStore) -> None:
    parts = [{"type": "text", "text": "こん"}, {"type": "text", "text": "にちは"}]
    result = ServerlessApp(TableSource(store))(
        post("/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]}), None
    )
    assert result["statusCode"] == 200


def test_a_prompt_over_2048_bytes_works(store: DynamoStore) -> None:
    prompt = "東" * 683
    assert len(prompt.encode()) == 2049
    store.put_many(prompt_entries(prompt, 3))
    result = ServerlessApp(TableSource(store))(post("/generate", {"prompt": prompt}), None)
    assert result["statusCode"] == 200
    assert decoded(result)["response"].endswith(prompt)


def test_a_push_after_the_catalogue_was_read(store: DynamoStore, entries: list[Entry]) -> None:
    clock = FakeClock()
    app = ServerlessApp(
        TableSource(store, clock=clock, catalogue_ttl=60), randbelow=lambda n: n - 1
    )
    assert app(post("/generate", {"prompt": GENERATE_PROMPT}), None)["statusCode"] == 200
    # The table now holds 2 variants of that prompt and a new prompt; this container still
    # believes in 5 variants and picks variant 4, which is gone: it reads the catalogue again.
    fewer = [e for e in entries if not (e.prompt == GENERATE_PROMPT and e.variant > 1)]
    store.replace_all([*fewer, *prompt_entries("new prompt", 1)])
    result = app(post("/generate", {"prompt": GENERATE_PROMPT}), None)
    assert result["headers"]["X-Cache-Variant"] == "1"
    # A new prompt is found after miss_refresh seconds without waiting for the TTL.
    clock.now += 6
    assert app(post("/generate", {"prompt": "new prompt"}), None)["statusCode"] == 200


# --- what is served: the catalogue's review marks under serve_states ----------------------


def _reviewed(store: DynamoStore, prompt: str, review: dict[int, dict[str, Any]]) -> None:
    changed = []
    for variant, fields in review.items():
        entry = store.get(prompt_entries(prompt, 1)[0].key, variant)
        assert entry is not None
        changed.append(replace(entry, **fields, checksum=""))
    store.put_many(changed)


def _variants_served(app: ServerlessApp, prompt: str, n: int = 120) -> set[int]:
    seen = set()
    for _ in range(n):
        result = app(post("/generate", {"prompt": prompt}), None)
        assert result["statusCode"] == 200, result["body"]
        seen.add(int(result["headers"]["X-Cache-Variant"]))
    return seen


def test_serve_states_and_pins_decide_what_the_table_serves(store: DynamoStore) -> None:
    _reviewed(
        store,
        GENERATE_PROMPT,
        {0: {"state": "approved"}, 1: {"state": "rejected"}, 2: {"state": "approved"}},
    )
    assert _variants_served(ServerlessApp(TableSource(store)), GENERATE_PROMPT) == {0, 2, 3, 4}
    approved_only = ServerlessApp(TableSource(store, serve_states={"approved"}))
    assert _variants_served(approved_only, GENERATE_PROMPT) == {0, 2}
    # A prompt with nothing approved is a miss when only approved answers are served.
    assert_error(
        approved_only(post("/generate", {"prompt": COMPLETION_PROMPT}), None),
        404,
        "prompt_not_cached",
    )
    _reviewed(store, GENERATE_PROMPT, {2: {"pinned": True}})
    assert _variants_served(ServerlessApp(TableSource(store)), GENERATE_PROMPT) == {2}


def test_a_rejected_only_prompt_is_a_miss_and_not_listed(store: DynamoStore) -> None:
    _reviewed(store, GENERATE_PROMPT, {v: {"state": "rejected"} for v in range(5)})
    app = ServerlessApp(TableSource(store))
    error = assert_error(
        app(post("/generate", {"prompt": GENERATE_PROMPT}), None), 404, "prompt_not_cached"
    )
    assert GENERATE_PROMPT not in error["known_prompts"]
    status = decoded(app(http_api_event("GET", "/status"), None))["status"]
    assert status["served_answers"] == 10 and status["cached_answers"] == 15


def test_an_answer_rejected_after_the_catalogue_was_read_is_not_served(
    store: DynamoStore,
) -> None:
    """The table's entry says rejected while the cached catalogue still lists it: the
    handler reads the catalogue again rather than serve it."""
    app = ServerlessApp(TableSource(store, catalogue_ttl=3600), randbelow=lambda n: 0)
    assert (
        app(post("/generate", {"prompt": GENERATE_PROMPT}), None)["headers"]["X-Cache-Variant"]
        == "0"
    )
    key = prompt_entries(GENERATE_PROMPT, 1)[0].key
    entry = store.get(key, 0)
    assert entry is not None
    # Only the item changes (a push that died before its catalogue write, say).
    store.client.put_item(
        TableName=TABLE, Item=encode_entry(replace(entry, state="rejected", checksum="").sealed())
    )
    result = app(post("/generate", {"prompt": GENERATE_PROMPT}), None)
    assert result["statusCode"] == 200
    assert result["headers"]["X-Cache-Variant"] != "0"


def test_serve_states_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TABLE_NAME", TABLE)
    monkeypatch.setenv("SNAPSHOT", "off")
    monkeypatch.setenv("SERVE_STATES", "approved")
    assert ServerlessApp.from_env(os.environ, client=object()).source.serve_states == {"approved"}
    monkeypatch.setenv("SERVE_STATES", "approved,rejected")
    with pytest.raises(ConfigError, match="SERVE_STATES: 'rejected': a rejected answer is never"):
        ServerlessApp.from_env(os.environ, client=object())


# --- errors, in the gateway's shape ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        ("/generate", b"{not json", "invalid_json", None),
        ("/generate", b"[1, 2]", "invalid_json", None),
        ("/generate", b"\xff\xfe", "invalid_json", None),
        ("/generate", {"model_name": MODEL}, "invalid_value", "prompt"),
        ("/generate", {"prompt": ""}, "invalid_value", "prompt"),
        ("/generate", {"prompt": 5}, "invalid_value", "prompt"),
        ("/generate", {"prompt": "x", "model_name": 3}, "invalid_value", "model_name"),
        ("/generate", {"prompt": "x", "stream": "yes"}, "invalid_value", "stream"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "not_cacheable", "prompt"),
        ("/v1/chat/completions", {"messages": []}, "invalid_value", "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "robot", "content": "x"}]},
            "invalid_value",
            "messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "invalid_value",
            "messages.0.content.0.image_url",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "invalid_value",
            "messages.0.content.0.text",
        ),
    ],
)
def test_bad_requests_are_400(
    store: DynamoStore, path: str, body: Any, code: str, param: str | None
) -> None:
    error = assert_error(ServerlessApp(TableSource(store))(post(path, body), None), 400, code)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_an_unknown_prompt_is_404_with_the_known_prompts(
    store: DynamoStore, calls: list[str]
) -> None:
    app = ServerlessApp(TableSource(store))
    for _ in range(5):
        result = app(post("/generate", {"prompt": "not cached"}), None)
        error = assert_error(result, 404, "prompt_not_cached")
        assert sorted(error["known_prompts"]) == sorted(
            [GENERATE_PROMPT, COMPLETION_PROMPT, CHAT[-1][1]]
        )
    assert calls == ["GetItem"]  # the catalogue, once: misses cost no further reads


def test_an_empty_table_is_404_with_no_prompts(aws: None) -> None:
    client = boto3.client("dynamodb", region_name=REGION)
    from comeapi.cache.dynamo import create_table

    create_table(client, "empty")
    result = ServerlessApp(TableSource(DynamoStore(client, "empty")))(
        post("/generate", {"prompt": "x"}), None
    )
    assert assert_error(result, 404, "prompt_not_cached")["known_prompts"] == []


def test_throttling_is_503_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    dummy_credentials(monkeypatch)
    client = boto3.client(
        "dynamodb", region_name=REGION, config=Config(retries={"max_attempts": 1})
    )
    entry = prompt_entries(GENERATE_PROMPT, 1)[0]
    catalogue = Catalogue(1, (PromptInfo(entry.key, "prompt", entry.prompt, MODEL, 1),))
    with Stubber(client) as stub:
        stub.add_response("get_item", {"Item": encode_catalogue(catalogue)})
        stub.add_client_error(
            "get_item", "ProvisionedThroughputExceededException", http_status_code=400
        )
        result = ServerlessApp(TableSource(DynamoStore(client, TABLE)))(
            post("/generate", {"prompt": GENERATE_PROMPT}), None
        )
    assert_error(result, 503, "store_unavailable")
    assert result["headers"]["Retry-After"] == "1"


def test_unknown_routes_and_methods_are_404(store: DynamoStore) -> None:
    app = ServerlessApp(TableSource(store))
    assert_error(app(http_api_event("GET", "/generate"), None), 404, "not_found")
    assert_error(app(post("/v1/embeddings", {"input": "x"}), None), 404, "not_found")


def test_a_body_over_the_limit_is_413(store: DynamoStore) -> None:
    big = {"prompt": "x" * (300 * 1024)}
    assert_error(
        ServerlessApp(TableSource(store))(post("/generate", big), None), 413, "payload_too_large"
    )


def test_an_event_that_is_not_from_api_gateway_is_400(store: DynamoStore) -> None:
    assert_error(ServerlessApp(TableSource(store))({"hello": "world"}, None), 400, "bad_event")


def test_a_bad_base64_body_is_400(store: DynamoStore) -> None:
    event = post("/generate", {"prompt": "x"})
    event.update(body="***", isBase64Encoded=True)
    assert_error(ServerlessApp(TableSource(store))(event, None), 400, "invalid_body")


def test_api_keys(store: DynamoStore) -> None:
    app = ServerlessApp(TableSource(store), api_keys=("k1", "k2"))
    event = post("/generate", {"prompt": GENERATE_PROMPT})
    # The gateway's rule and body (comeapi.protocol.auth): no key is missing_api_key.
    assert_error(app(event, None), 401, "missing_api_key")
    assert app(event, None)["headers"]["WWW-Authenticate"] == "Bearer"
    event["headers"]["authorization"] = "Bearer nope"
    assert_error(app(event, None), 401, "invalid_api_key")
    event["headers"]["authorization"] = "Bearer k2"
    assert app(event, None)["statusCode"] == 200


def test_an_unexpected_error_is_a_json_500(
    store: DynamoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(key: str, variant: int) -> None:
        raise RuntimeError("boom")

    app = ServerlessApp(TableSource(store))
    monkeypatch.setattr(store, "get", broken)
    result = app(post("/generate", {"prompt": GENERATE_PROMPT}), None)
    assert assert_error(result, 500, "internal_error")["message"] == "internal error"


# --- the Lambda entry point ---------------------------------------------------------------


def test_the_entry_point_reads_its_settings_from_the_environment(
    store: DynamoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler_module.default_app.cache_clear()
    monkeypatch.setenv("TABLE_NAME", TABLE)
    monkeypatch.setenv("DEFAULT_MODEL", MODEL)
    try:
        result = handler_module.handler(load_event("http_api_v2_generate.json"), None)
        assert result["statusCode"] == 200
        assert handler_module.default_app() is handler_module.default_app()
    finally:
        handler_module.default_app.cache_clear()


def test_a_missing_table_name_is_a_json_error(monkeypatch: pytest.MonkeyPatch) -> None:
    handler_module.default_app.cache_clear()
    monkeypatch.delenv("TABLE_NAME", raising=False)
    result = handler_module.handler(load_event("http_api_v2_generate.json"), None)
    assert "TABLE_NAME" in assert_error(result, 500, None)["message"]  # type: ignore[arg-type]


def test_the_handler_module_stays_light() -> None:
    code = (
        "import sys, comeapi.serverless.handler\n"
        "heavy = ['pydantic', 'starlette', 'orjson', 'click', 'httpx', 'uvicorn', 'yaml',"
        " 'llama_cpp', 'comeapi.settings']\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_in_lambda_the_app_is_built_at_import_with_the_gc_paused() -> None:
    code = (
        "import gc, comeapi.serverless.handler as h\n"
        "print(h.default_app.cache_info().currsize, gc.isenabled(), gc.get_freeze_count() > 0)"
    )
    env = {
        **os.environ,
        "AWS_LAMBDA_FUNCTION_NAME": "comeapi-test",
        "TABLE_NAME": "t",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["1", "True", "True"]


def test_v2_events_keep_binary_bodies(store: DynamoStore) -> None:
    event = http_api_event("POST", "/generate", body=b"\xff\x00")
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == b"\xff\x00"
    assert_error(ServerlessApp(TableSource(store))(event, None), 400, "invalid_json")
