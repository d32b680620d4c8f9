"""The cache snapshot a function package carries, and how the table's changes reach a
container that serves from one: against moto's server over HTTP (a real process)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comeapi.cache.archive import read_archive, write_archive
from comeapi.cache.dynamo import DynamoStore, create_table, make_client
from comeapi.cache.store import Entry
from comeapi.errors import ConfigError, StoreError
from comeapi.serverless.events import http_api_event
from comeapi.serverless.handler import ServerlessApp
from comeapi.serverless.package import build_package
from comeapi.serverless.snapshot import ARCHIVE, META, load_snapshot, write_snapshot
from comeapi.serverless.source import SnapshotSource, TableSource
from tests.aws_local import REGION, dummy_credentials, prompt_entries, start_moto_server
from tests.cache.factory import reviewed
from tests.conformance.table import API_KEY, CASES, check_reply
from tests.conformance.table import entries as conformance_entries
from tests.helpers import REPO, Proc, free_port
from tests.serverless.conftest import GENERATE_PROMPT, cold_start

_tables = itertools.count()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("moto")
    procs: list[Proc] = []

    def spawn(argv: list[str]) -> Proc:
        procs.append(Proc(argv, root / "moto.log"))
        return procs[-1]

    try:
        yield start_moto_server(spawn)
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def store(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> DynamoStore:
    """A fresh table on moto's server holding 5 answers to GENERATE_PROMPT."""
    dummy_credentials(monkeypatch)
    table = f"snapshot-{next(_tables)}"
    client = make_client(REGION, endpoint)
    create_table(client, table)
    store = DynamoStore(client, table)
    store.replace_all(prompt_entries(GENERATE_PROMPT, 5))
    return store


def reader_of(store: DynamoStore, calls: list[str]) -> DynamoStore:
    """Another client on the same table, as a container would make, recording its calls."""
    client = make_client(REGION, store.client.meta.endpoint_url)
    client.meta.events.register(
        "before-call.dynamodb.*", lambda model, **_: calls.append(model.name)
    )
    return DynamoStore(client, store.table)


def post(prompt: str) -> dict[str, Any]:
    return http_api_event("POST", "/generate", body=json.dumps({"prompt": prompt}).encode())


def answer(app: ServerlessApp, prompt: str) -> tuple[int, str]:
    result = app(post(prompt))
    body = json.loads(result["body"])
    return result["statusCode"], body.get("response") or body["error"]["code"]


def renamed(entries: list[Entry], text: str) -> list[Entry]:
    """The same prompt and variants with another answer (a warmup run again)."""
    return [
        Entry(**{**e.to_dict(), "answer": f"{text} {e.variant}", "checksum": ""}).sealed()
        for e in entries
    ]


# --- taking and loading a snapshot --------------------------------------------------------


def test_a_snapshot_is_the_table_at_one_revision(store: DynamoStore, tmp_path: Path) -> None:
    taken = write_snapshot(store, tmp_path)
    loaded = load_snapshot(str(tmp_path))
    assert loaded is not None
    assert loaded.table == store.table
    assert loaded.state == taken.state == (store.catalogue().revision, store.catalogue().updated)
    assert loaded.catalogue() == store.catalogue()
    for entry in prompt_entries(GENERATE_PROMPT, 5):
        assert loaded.get(entry.key, entry.variant) == entry
    # The archive is an ordinary export archive: `comeapi cache import` reads it.
    assert len(read_archive(tmp_path / ARCHIVE)) == 5


def test_a_snapshot_carries_the_review(store: DynamoStore, tmp_path: Path) -> None:
    entries = prompt_entries(GENERATE_PROMPT, 5)
    store.put_many([reviewed(entries[1], state="rejected"), reviewed(entries[2], state="approved")])
    write_snapshot(store, tmp_path)
    loaded = load_snapshot(str(tmp_path))
    assert loaded is not None
    assert [p.marks for p in loaded.catalogue().prompts] == ["prapp"]
    assert loaded.catalogue() == store.catalogue()
    rejected = loaded.get(entries[1].key, 1)
    assert rejected is not None and rejected.state == "rejected"
    # Marks that disagree with the entries (a hand-edited snapshot.json) are refused.
    meta = json.loads((tmp_path / META).read_text())
    meta["catalogue"]["prompts"][0]["marks"] = "paapp"
    (tmp_path / META).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"review marks .* differ from its entries"):
        load_snapshot(str(tmp_path))


def test_no_snapshot_directory_is_none(tmp_path: Path) -> None:
    assert load_snapshot(str(tmp_path / "absent")) is None


def test_a_tampered_snapshot_is_refused(store: DynamoStore, tmp_path: Path) -> None:
    write_snapshot(store, tmp_path)
    archive = tmp_path / ARCHIVE
    entries = read_archive(archive)
    write_archive(renamed(entries, "forged"), archive)  # valid archive, not the one listed
    with pytest.raises(StoreError, match="SHA-256") as info:
        load_snapshot(str(tmp_path))
    assert info.value.code == "corrupt"
    (tmp_path / META).write_text("{}")
    with pytest.raises(StoreError, match="not a comeapi-lambda-snapshot"):
        load_snapshot(str(tmp_path))
    archive.unlink()
    with pytest.raises(StoreError, match="missing"):
        load_snapshot(str(tmp_path))


def test_an_empty_table_gives_no_snapshot(endpoint: str, tmp_path: Path) -> None:
    client = make_client(REGION, endpoint)
    create_table(client, "snapshot-empty")
    with pytest.raises(StoreError, match="push the cache first"):
        write_snapshot(DynamoStore(client, "snapshot-empty"), tmp_path)


def test_a_failed_package_build_keeps_the_previous_package(
    store: DynamoStore, tmp_path: Path
) -> None:
    out = tmp_path / "CacheFunction"
    build_package(out, store)
    before = (out / "comeapi-snapshot" / META).read_text()
    unreachable = DynamoStore(make_client(REGION, f"http://127.0.0.1:{free_port()}"), store.table)
    with pytest.raises(StoreError):
        build_package(out, unreachable)
    assert (out / "comeapi-snapshot" / META).read_text() == before
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


# --- answering from it, and the freshness rule --------------------------------------------


def test_hits_from_a_current_snapshot_read_nothing_but_the_revision(
    store: DynamoStore, tmp_path: Path
) -> None:
    snapshot = write_snapshot(store, tmp_path)
    calls: list[str] = []
    clock = FakeClock()
    table = TableSource(lambda: reader_of(store, calls), catalogue_ttl=60, clock=clock)
    app = ServerlessApp(SnapshotSource(snapshot, table, background=False))
    seen = set()
    for _ in range(60):
        result = app(post(GENERATE_PROMPT))
        assert result["statusCode"] == 200
        seen.add(result["headers"]["X-Cache-Variant"])
    assert seen == {"0", "1", "2", "3", "4"}  # uniform over all 5, from the snapshot
    assert calls == ["GetItem"]  # the check after the first answer; none due since
    clock.now += 61
    app(post(GENERATE_PROMPT))
    assert calls == ["GetItem"] * 2  # checked again after catalogue_ttl
    assert app.source.snapshot is snapshot  # the table has not changed: still the snapshot


def test_a_changed_entry_reaches_the_container_at_the_check(
    store: DynamoStore, tmp_path: Path
) -> None:
    snapshot = write_snapshot(store, tmp_path)
    store.replace_all(renamed(prompt_entries(GENERATE_PROMPT, 5), "new answer"))
    source = SnapshotSource(snapshot, TableSource(lambda: reader_of(store, [])), background=False)
    app = ServerlessApp(source, randbelow=lambda n: 0)
    # The cold answer comes from the snapshot; the check after it sees the new revision.
    assert answer(app, GENERATE_PROMPT) == (200, f"answer 0 to {GENERATE_PROMPT}")
    assert answer(app, GENERATE_PROMPT) == (200, "new answer 0")
    assert source.snapshot is None


def test_a_prompt_pushed_after_the_build_is_found_at_once(
    store: DynamoStore, tmp_path: Path
) -> None:
    snapshot = write_snapshot(store, tmp_path)
    store.put_many(prompt_entries("pushed later", 2))
    source = SnapshotSource(snapshot, TableSource(lambda: reader_of(store, [])), background=False)
    app = ServerlessApp(source)
    assert answer(app, "pushed later")[0] == 200  # the miss looked at the table
    assert answer(app, "never pushed") == (404, "prompt_not_cached")


def test_a_miss_on_a_current_snapshot_is_404_and_keeps_it(
    store: DynamoStore, tmp_path: Path
) -> None:
    snapshot = write_snapshot(store, tmp_path)
    calls: list[str] = []
    clock = FakeClock()
    table = TableSource(lambda: reader_of(store, calls), clock=clock)
    source = SnapshotSource(snapshot, table, background=False)
    app = ServerlessApp(source)
    for _ in range(3):
        assert answer(app, "never pushed") == (404, "prompt_not_cached")
    assert calls == ["GetItem"]  # one look at the table; misses within 5 s do not repeat it
    assert source.snapshot is snapshot


def test_a_miss_with_a_snapshot_goes_to_the_backend_after_looking_at_the_table(
    store: DynamoStore, tmp_path: Path
) -> None:
    from comeapi.serverless.events import HttpRequest, Reply

    snapshot = write_snapshot(store, tmp_path)
    forwarded: list[str] = []

    def backend(request: HttpRequest) -> Reply:
        forwarded.append(json.loads(request.body)["prompt"])
        return Reply(200, json.dumps({"response": "generated"}), {"X-Cache": "MISS"})

    calls: list[str] = []
    table = TableSource(lambda: reader_of(store, calls))
    app = ServerlessApp(SnapshotSource(snapshot, table, background=False), on_miss=backend)
    assert answer(app, "never pushed") == (200, "generated")
    assert calls == ["GetItem"]  # the table was asked first: it might have been pushed
    assert answer(app, GENERATE_PROMPT)[0] == 200  # a hit never reaches the backend
    assert forwarded == ["never pushed"]


def test_the_check_runs_in_a_thread_after_the_answer(store: DynamoStore, tmp_path: Path) -> None:
    snapshot = write_snapshot(store, tmp_path)
    store.replace_all(renamed(prompt_entries(GENERATE_PROMPT, 5), "new answer"))
    source = SnapshotSource(snapshot, TableSource(lambda: reader_of(store, [])))
    app = ServerlessApp(source, randbelow=lambda n: 0)
    assert answer(app, GENERATE_PROMPT) == (200, f"answer 0 to {GENERATE_PROMPT}")
    assert source._check is not None
    source._check.join(timeout=60)
    assert answer(app, GENERATE_PROMPT) == (200, "new answer 0")


def test_a_failed_check_keeps_the_snapshot(
    store: DynamoStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshot = write_snapshot(store, tmp_path)
    unreachable = DynamoStore(make_client(REGION, f"http://127.0.0.1:{free_port()}"), store.table)
    source = SnapshotSource(snapshot, TableSource(lambda: unreachable), background=False)
    app = ServerlessApp(source)
    with caplog.at_level(logging.WARNING, logger="comeapi.serverless.source"):
        assert answer(app, GENERATE_PROMPT)[0] == 200
    assert "revision check failed" in caplog.text
    assert answer(app, GENERATE_PROMPT)[0] == 200
    assert source.snapshot is snapshot


def test_from_env_uses_the_snapshot_of_its_table_only(
    store: DynamoStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_snapshot(store, tmp_path)
    env = {
        "TABLE_NAME": store.table,
        "SNAPSHOT_DIR": str(tmp_path),
        "DYNAMODB_ENDPOINT_URL": store.client.meta.endpoint_url,
    }
    assert ServerlessApp.from_env(env).source.answers_from == "snapshot"
    assert ServerlessApp.from_env({**env, "SNAPSHOT": "off"}).source.answers_from == "table"
    with caplog.at_level(logging.ERROR, logger="comeapi.serverless.snapshot"):
        other = ServerlessApp.from_env({**env, "TABLE_NAME": "another-table"})
    assert other.source.answers_from == "table"
    assert "of table" in caplog.text


def test_the_conformance_table_from_a_snapshot(endpoint: str, tmp_path: Path) -> None:
    """Every case of tests/conformance/requests.jsonl, answered from a snapshot of the
    conformance tier's table: the same outcomes as from the table itself."""
    client = make_client(REGION, endpoint)
    create_table(client, "snapshot-conformance")
    store = DynamoStore(client, "snapshot-conformance")
    store.replace_all(conformance_entries())
    snapshot = write_snapshot(store, tmp_path)
    source = SnapshotSource(snapshot, TableSource(lambda: store), background=False)
    app = ServerlessApp(source, default_model=None, api_keys=(API_KEY,))
    for case in CASES:
        result = app(http_api_event("POST", case.route, headers=case.headers, body=case.raw))
        headers = {k.lower(): v for k, v in result["headers"].items()}
        body = result["body"].encode("utf-8")
        check_reply(case, result["statusCode"], headers, body, tier="lambda, snapshot")
    assert source.snapshot is snapshot  # answered from it throughout


# --- a cold start in a fresh interpreter -------------------------------------------------


def test_a_cold_hit_needs_no_boto3(store: DynamoStore, tmp_path: Path) -> None:
    package = tmp_path / "CacheFunction"
    build_package(package, store)
    result = cold_start(package, store.table, GENERATE_PROMPT)
    assert result["file"].startswith(str(package))
    assert result == {**result, "status": 200, "cache": "HIT", "loaded": []}


def test_without_its_snapshot_the_package_needs_boto3(store: DynamoStore, tmp_path: Path) -> None:
    """The same cold start fails without a snapshot: the test above can fail."""
    package = tmp_path / "CacheFunction"
    build_package(package, None)
    with pytest.raises(subprocess.CalledProcessError) as info:
        cold_start(package, store.table, GENERATE_PROMPT)
    assert "No module named 'boto" in info.value.stderr


def test_the_package_command(store: DynamoStore, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from comeapi.cli import main

    where = ["--endpoint-url", store.client.meta.endpoint_url, "--region", REGION]
    out = tmp_path / "CacheFunction"
    refused = CliRunner().invoke(main, ["aws", "package", str(out)])
    assert refused.exit_code == 2 and "--table is required" in refused.output
    done = CliRunner().invoke(main, ["aws", "package", str(out), "--table", store.table, *where])
    assert done.exit_code == 0, done.output
    assert "at catalogue revision 1: 5 answers to 1 prompts" in done.output
    assert (out / "Makefile").is_file() and (out / "comeapi-snapshot" / META).is_file()
    bare = CliRunner().invoke(main, ["aws", "package", str(out), "--no-snapshot"])
    assert bare.exit_code == 0 and "without a snapshot" in bare.output
    assert not (out / "comeapi-snapshot").exists()
    assert "comeapi-snapshot" not in (out / "Makefile").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    kept = CliRunner().invoke(main, ["aws", "package", str(tmp_path / "mine"), "--no-snapshot"])
    assert kept.exit_code != 0 and "not a function package" in kept.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def no_region_env(tmp_path: Path) -> dict[str, str]:
    """The environment without any AWS region (nor a config file that could name one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    return env


def test_make_lambda_package_without_a_region_says_how_to_give_one(tmp_path: Path) -> None:
    """Issue 22: it said "(or ?region= in the store URL)", which this command has not."""
    result = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "lambda-package",
         f"LAMBDA_PACKAGE={tmp_path / 'CacheFunction'}"],
        cwd=REPO, env=no_region_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "no AWS region" in output and "LAMBDA_PACKAGE_ARGS='--region R'" in output, output
    assert "store URL" not in output, output


def test_a_store_url_without_a_region_says_where_it_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in no_region_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"add \?region=R to the store URL 'dynamodb:t'"):
        DynamoStore.from_url("dynamodb:t")
