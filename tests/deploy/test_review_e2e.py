"""Issue 19's review flow end to end, with a real backend (the bundled model, few tokens):
generate -> a flagged variant regenerated (CLI, and through a gateway's own pool) -> approve
and reject -> export -> import on a second store -> served; a rejected (or, under
serve_states=approved, an unreviewed) variant is never served by the gateway, the Lambda
handler (table and snapshot, DynamoDB on moto's server) or nginx after warmup."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.cache.archive import read_archive
from comeapi.cache.dynamo import DynamoStore, make_client
from comeapi.cache.prompts import PromptItem, load_prompt_set
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.serverless.events import http_api_event
from comeapi.serverless.handler import ServerlessApp
from comeapi.serverless.snapshot import load_snapshot, write_snapshot
from comeapi.serverless.source import SnapshotSource, TableSource
from tests.aws_local import REGION, dummy_credentials, start_moto_server
from tests.deploy.nginx_stack import Nginx, nginx_missing, run_warmup
from tests.helpers import Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

PROMPTS = """\
variants: 3
max_tokens: 6
temperature: 0.8
prompts:
  - prompt: "The best thing about the sea is"
  - messages:
      - {role: user, content: "Name a colour."}
"""
TABLE = "comeapi-review-e2e"
# What each variant ends as, by item: P (the prompt) approved but variant 2 rejected;
# C (the chat) variant 0 approved, 1 rejected, 2 left pending.
STATES = {0: {0: "approved", 1: "approved", 2: "rejected"}, 1: {0: "approved", 1: "rejected"}}
SERVED = {0: {0, 1}, 1: {0}}  # under serve_states=approved


@dataclass
class Flow:
    base: Path
    prompts: Path
    items: tuple[PromptItem, ...]
    backend: str
    archive: Path
    second: str  # the store the archive was imported into
    log: list[str]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            comeapi_argv(*args), capture_output=True, text=True, timeout=900, check=False
        )
        self.log.append(f"$ comeapi {' '.join(args)}\n{done.stdout}{done.stderr}")
        if check:
            assert done.returncode == 0, "\n".join(self.log[-3:])
        return done


def answers(flow: Flow, store: str) -> dict[tuple[int, int], dict[str, Any]]:
    """(item index, variant) -> the review listing's object."""
    doc = json.loads(flow.cli("cache", "review", "--store", store, "--json").stdout)
    index = {item.key: item.index for item in flow.items}
    return {(index[a["key"]], a["variant"]): a for a in doc["answers"]}


def request_of(item: PromptItem) -> tuple[str, dict[str, Any]]:
    if item.messages is not None:
        return "/v1/chat/completions", {
            "messages": [{"role": r, "content": c} for r, c in item.messages]
        }
    return "/v1/completions", {"prompt": item.prompt}


def text_of(route: str, body: Any) -> str:
    choice = body["choices"][0]
    return str(
        choice["message"]["content"] if route.endswith("chat/completions") else choice["text"]
    )


@pytest.fixture(scope="module")
def flow(smollm2_dir: Path) -> Iterator[Flow]:
    if nginx_missing():
        pytest.fail(str(nginx_missing()))
    # Not under pytest's tmp_path: nginx's worker user must reach its cache directory.
    base = Path(tempfile.mkdtemp(prefix="comeapi-review-e2e-"))
    base.chmod(0o755)
    prompts = base / "prompts.yaml"
    prompts.write_text(PROMPTS)
    port = free_port()
    argv = comeapi_argv(
        # The default model: the prompt set names none, nor do the requests nginx keys.
        "backend", "--model-dir", str(smollm2_dir), "--port", str(port), "--threads", "1",
        "--ctx", "256",
    )  # fmt: skip
    backend = Proc(argv, base / "backend.log")
    try:
        backend.wait_http(f"http://127.0.0.1:{port}/health", timeout=300)
        yield Flow(
            base, prompts, load_prompt_set(prompts).items, f"http://127.0.0.1:{port}",
            base / "reviewed.tar.gz", f"sqlite:{base / 'second.db'}", [],
        )  # fmt: skip
    finally:
        backend.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def reviewed(flow: Flow) -> Flow:
    """Generate, regenerate, review, export, import: the flow up to the second store."""
    first = f"sqlite:{flow.base / 'first.db'}"
    flow.cli(
        "warmup", "--prompts", str(flow.prompts), "--store", first, "--url", flow.backend,
        "--check-retries", "1",
    )  # fmt: skip
    generated = answers(flow, first)
    assert len(generated) == 6 and {a["state"] for a in generated.values()} == {"pending"}
    flagged = [slot for slot, a in generated.items() if a["flags"]]
    assert flagged, f"6-token answers are flagged (at least truncated): {generated}"

    # A flagged variant regenerated with the CLI: a new seed, the old text in its history.
    item, variant = flagged[0]
    old = generated[(item, variant)]
    flow.cli(
        "cache", "regenerate", "--key", flow.items[item].key, "--variant", str(variant),
        "--url", flow.backend, "--store", first,
    )  # fmt: skip
    new = answers(flow, first)[(item, variant)]
    assert new["history"][-1]["answer"] == old["text"]
    assert new["history"][-1]["why"] == "regenerate"
    assert new["params"]["seed"] != old["params"]["seed"]
    assert new["state"] == "pending" and not new["edited"]
    assert {k: v for k, v in new["params"].items() if k != "seed"} == {
        k: v for k, v in old["params"].items() if k != "seed"
    }

    # Another one through a running gateway's API: its own backend pool generates it.
    gateway = gateway_over(flow, first, "--backend", flow.backend)
    try:
        other = next(slot for slot in generated if slot != (item, variant))
        key = flow.items[other[0]].key
        r = httpx.post(
            f"{gateway}/cache/answers/{key}/{other[1]}", json={"action": "regenerate"}, timeout=600
        )
        assert r.status_code == 200, r.text
        done = r.json()["answers"][0]
        assert done["history"][-1]["answer"] == generated[other]["text"]
        assert done["params"]["seed"] != generated[other]["params"]["seed"]
        # Served at once: the regenerated text is among this gateway's answers.
        route, body = request_of(flow.items[other[0]])
        texts = {text_of(route, httpx.post(gateway + route, json=body, timeout=30).json())
                 for _ in range(30)}  # fmt: skip
        assert done["text"] in texts
    finally:
        stop(gateway)

    # The review: approve, reject (one write per command).
    for index, states in STATES.items():
        key = flow.items[index].key
        for variant, state in states.items():
            verb = "approve" if state == "approved" else "reject"
            flow.cli("cache", verb, "--key", key, "--variant", str(variant), "--store", first)
    flow.cli("cache", "export", str(flow.archive), "--store", first)
    flow.cli("cache", "import", str(flow.archive), "--store", flow.second)
    moved = answers(flow, flow.second)
    assert {slot: a["state"] for slot, a in moved.items()} == {
        (i, v): STATES[i].get(v, "pending") for i in (0, 1) for v in range(3)
    }
    assert moved == answers(flow, first)  # texts, flags, history: all of it travelled
    return flow


_procs: dict[str, Proc] = {}


def gateway_over(flow: Flow, store: str, *args: str) -> str:
    port = free_port()
    argv = comeapi_argv("serve", "--port", str(port), "--store", store, *args)
    proc = Proc(argv, flow.base / f"gateway-{port}.log")
    url = f"http://127.0.0.1:{port}"
    _procs[url] = proc
    proc.wait_http(url + "/health", timeout=60)
    return url


def stop(url: str) -> None:
    _procs.pop(url).stop()


def served_variants(ask: Any, item: PromptItem, n: int = 40) -> dict[int, str]:
    """variant -> text of what a tier answers for ``item`` (``ask(route, body)`` gives the
    status, headers and JSON of one request)."""
    route, body = request_of(item)
    seen: dict[int, str] = {}
    for _ in range(n):
        status, headers, doc = ask(route, body)
        assert status == 200, doc
        seen[int(headers["x-cache-variant"])] = text_of(route, doc)
    return seen


def check(flow: Flow, seen: dict[int, dict[int, str]], tier: str) -> None:
    texts = {(i, v): a["text"] for (i, v), a in answers(flow, flow.second).items()}
    for index, variants in seen.items():
        assert set(variants) == SERVED[index], f"{tier}: item {index} served {variants}"
        for variant, text in variants.items():
            assert text == texts[(index, variant)], tier


def test_the_gateway_serves_only_approved_answers(reviewed: Flow) -> None:
    url = gateway_over(
        reviewed, reviewed.second, "--serve-states", "approved", "--on-miss", "reject"
    )
    try:
        with httpx.Client(base_url=url, timeout=30) as client:

            def ask(route: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
                r = client.post(route, json=body)
                return r.status_code, r.headers, r.json()

            check(reviewed, {i.index: served_variants(ask, i) for i in reviewed.items}, "gateway")
    finally:
        stop(url)


def test_the_lambda_handler_serves_only_approved_answers(
    reviewed: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    dummy_credentials(monkeypatch)
    procs: list[Proc] = []

    def spawn(argv: list[str]) -> Proc:
        procs.append(Proc(argv, reviewed.base / "moto.log"))
        return procs[-1]

    try:
        endpoint = start_moto_server(spawn)
        reviewed.cli(
            "cache", "push", "dynamodb", "--table", TABLE, "--create", "--endpoint-url",
            endpoint, "--region", REGION, "--store", reviewed.second,
        )  # fmt: skip
        table = DynamoStore(make_client(REGION, endpoint), TABLE)
        snapshot_dir = reviewed.base / "snapshot"
        write_snapshot(table, snapshot_dir)
        assert len(read_archive(snapshot_dir / "cache.tar.gz")) == 6  # rejected ones kept too
        snapshot = load_snapshot(str(snapshot_dir))
        assert snapshot is not None
        apps = {
            "lambda (table)": ServerlessApp(TableSource(table, serve_states={"approved"})),
            "lambda (snapshot)": ServerlessApp(
                SnapshotSource(
                    snapshot,
                    TableSource(table, serve_states={"approved"}),
                    background=False,
                )
            ),
        }
        for tier, app in apps.items():

            def ask(
                route: str, body: dict[str, Any], app: ServerlessApp = app
            ) -> tuple[int, Any, Any]:
                result = app(http_api_event("POST", route, body=json.dumps(body).encode()))
                headers = {k.lower(): v for k, v in result["headers"].items()}
                return result["statusCode"], headers, json.loads(result["body"])

            check(reviewed, {i.index: served_variants(ask, i) for i in reviewed.items}, tier)
        source = apps["lambda (snapshot)"].source
        assert source.answers_from == "snapshot"  # it answered from the snapshot
    finally:
        for proc in procs:
            proc.stop()


def test_nginx_after_warmup_serves_only_approved_answers(reviewed: Flow) -> None:
    secret = secrets.token_hex(16)
    url = gateway_over(
        reviewed, reviewed.second, "--serve-states", "approved", "--on-miss", "reject",
        "--variant-secret", secret,
    )  # fmt: skip
    nginx = Nginx(
        reviewed.base / "nginx",
        reviewed.base / "cache",
        url.removeprefix("http://"),
        secret,
        variants=3,
    )
    try:
        nginx.start()
        warmup = run_warmup(nginx.warmup_url, reviewed.prompts, "--verify", "-r", "/v1/completions")
        assert warmup.returncode == 0, warmup.stdout + warmup.stderr + nginx.error_log()
        assert "slots hold a served variant in place of theirs" in warmup.stdout
        stop(url)  # from here on, nginx answers alone
        with httpx.Client(base_url=nginx.url, timeout=30) as client:

            def ask(route: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
                r = client.post(route, json=body)
                assert r.headers["x-cache-status"] == "HIT", r.text
                return r.status_code, r.headers, r.json()

            check(reviewed, {i.index: served_variants(ask, i, 60) for i in reviewed.items}, "nginx")
    finally:
        nginx.stop()
        if url in _procs:
            stop(url)


def test_the_archive_carries_the_review(reviewed: Flow) -> None:
    entries: list[Entry] = read_archive(reviewed.archive)
    by_slot = {(e.key, e.variant): e for e in entries}
    for index, states in STATES.items():
        for variant, state in states.items():
            assert by_slot[(reviewed.items[index].key, variant)].state == state
    assert any(e.history for e in entries) and any(e.flags for e in entries)
    with SqliteStore(reviewed.second.removeprefix("sqlite:")) as store:
        assert sorted(store.entries(), key=lambda e: (e.key, e.variant)) == sorted(
            entries, key=lambda e: (e.key, e.variant)
        )
