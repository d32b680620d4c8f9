"""``comeapi cache ...``: listing, export/import (a bad archive leaves the store
byte-identical), copy over scp, and the default store seeded on first use."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from comeapi.cache.archive import write_archive, write_jsonl
from comeapi.cache.sqlite import SqliteStore
from comeapi.cli import main
from tests.cache.factory import build_archive, file_hash, prompt_entry, sample_entries

pytestmark = pytest.mark.usefixtures("clean_env")  # tests/cli/conftest.py


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def filled(tmp_path: Path) -> str:
    with SqliteStore(tmp_path / "src.db") as store:
        store.put_many(sample_entries(prompts=3, variants=5))
        key = prompt_entry("こんにちは、調子はどうですか？", 0).key
        store.record_hits({(key, 0): 4, (key, 3): 1})
    return f"sqlite:{tmp_path / 'src.db'}"


def test_ls_json_lists_prompts_variants_and_hits(filled: str) -> None:
    result = run("cache", "ls", "--store", filled, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["store"] == filled
    assert len(doc["prompts"]) == 3
    hello = next(p for p in doc["prompts"] if p["prompt"] == "こんにちは、調子はどうですか？")
    assert hello["variants"] == [0, 1, 2, 3, 4]
    assert hello["hits"] == {"0": 4, "1": 0, "2": 0, "3": 1, "4": 0}
    assert hello["total_hits"] == 5
    assert {p["kind"] for p in doc["prompts"]} == {"prompt", "chat"}


def test_ls_table(filled: str) -> None:
    result = run("cache", "ls", "--store", filled)
    assert result.exit_code == 0, result.output
    assert "3 prompts" in result.output
    assert "0:4" in result.output


def test_store_comes_from_the_environment(filled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMEAPI_STORE", filled)
    assert len(json.loads(run("cache", "ls", "--json").output)["prompts"]) == 3


def test_the_default_store_is_seeded_with_the_shipped_answers(tmp_path: Path) -> None:
    doc = json.loads(run("cache", "ls", "--json").output)
    assert doc["store"] == f"sqlite:{tmp_path / 'data' / 'comeapi' / 'cache.db'}"
    assert len(doc["prompts"]) == 10
    assert all(p["variants"] == [0, 1, 2, 3, 4] for p in doc["prompts"])
    assert (tmp_path / "data" / "comeapi" / "cache.db").is_file()


def test_export_import_roundtrip_into_a_fresh_store(filled: str, tmp_path: Path) -> None:
    archive = tmp_path / "out" / "cache.tar.gz"
    result = run("cache", "export", str(archive), "--store", filled)
    assert result.exit_code == 0, result.output
    assert "exported 15 entries (3 prompts)" in result.output
    fresh = f"sqlite:{tmp_path / 'fresh.db'}"
    result = run("cache", "import", str(archive), "--store", fresh)
    assert result.exit_code == 0, result.output
    assert "15 entries (3 prompts) merged into" in result.output
    with SqliteStore(tmp_path / "src.db") as a, SqliteStore(tmp_path / "fresh.db") as b:
        assert list(a.entries()) == list(b.entries())


def test_jsonl_export_is_importable(filled: str, tmp_path: Path) -> None:
    assert run("cache", "export", "d.jsonl", "--store", filled).exit_code == 0
    assert run("cache", "import", "d.jsonl", "--store", "sqlite:j.db").exit_code == 0
    with SqliteStore(tmp_path / "j.db") as store:
        assert len(list(store.entries())) == 15


def test_merge_keeps_and_replace_drops_other_entries(tmp_path: Path) -> None:
    write_archive(sample_entries(prompts=1, variants=2), tmp_path / "a.tar.gz")
    with SqliteStore(tmp_path / "t.db") as store:
        store.put(prompt_entry("local only", 0))
    assert run("cache", "import", "a.tar.gz", "--store", "sqlite:t.db", "--merge").exit_code == 0
    with SqliteStore(tmp_path / "t.db") as store:
        assert len(list(store.entries())) == 3
    result = run("cache", "import", "a.tar.gz", "--store", "sqlite:t.db", "--replace")
    assert result.exit_code == 0 and "replaced the contents of" in result.output
    with SqliteStore(tmp_path / "t.db") as store:
        assert "local only" not in {e.prompt for e in store.entries()}
        assert len(list(store.entries())) == 2


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    fh = tar.extractfile(name)
    assert fh is not None
    return fh.read()


def _bad_archives(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.tar.gz"
    write_archive(sample_entries(prompts=2, variants=5), good)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    # Tampered: the same archive with one answer changed and the sha256s recomputed.
    with tarfile.open(good, "r:gz") as tar:
        manifest = json.loads(_read(tar, "manifest.json"))
        body = _read(tar, "entries.jsonl")
    lines = body.splitlines(keepends=True)
    first = json.loads(lines[0])
    first["answer"] = "injected"
    lines[0] = (json.dumps(first, ensure_ascii=False, sort_keys=True) + "\n").encode()
    body = b"".join(lines)
    manifest["entries_sha256"] = hashlib.sha256(body).hexdigest()
    manifest["sha256"][f"{first['key']}#{first['variant']}"] = hashlib.sha256(lines[0]).hexdigest()
    newer = dict(manifest, version=99)

    def pack(name: str, head: dict[str, object]) -> Path:
        members = {"manifest.json": json.dumps(head).encode(), "entries.jsonl": body}
        return build_archive(tmp_path / name, members)

    return {
        "truncated": truncated,
        "tampered": pack("tampered.tar.gz", manifest),
        "newer version": pack("newer.tar.gz", newer),
    }


@pytest.mark.parametrize("mode", ["--merge", "--replace"])
def test_a_bad_archive_leaves_the_store_byte_identical(
    filled: str, tmp_path: Path, mode: str
) -> None:
    db = tmp_path / "src.db"
    before = file_hash(db)
    expected = {
        "truncated": "truncated",
        "tampered": "fails its checksum",
        "newer version": "format version 99",
    }
    for name, archive in _bad_archives(tmp_path).items():
        result = run("cache", "import", str(archive), "--store", filled, mode)
        assert result.exit_code == 1, (name, result.output)
        assert expected[name] in result.output, (name, result.output)
        assert "Traceback" not in result.output
        assert file_hash(db) == before, name
        assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0


def _entries_in(db: Path) -> int:
    with SqliteStore(db) as store:
        return len(list(store.entries()))


@pytest.mark.parametrize("mode", ["--merge", "--replace"])
def test_an_empty_or_truncated_jsonl_changes_nothing(
    filled: str, tmp_path: Path, mode: str
) -> None:
    """Fault: `cache import e.jsonl --replace` with an empty or truncated file exited 0 and
    emptied (or cut) the store."""
    assert run("cache", "export", "e.jsonl", "--store", filled).exit_code == 0
    lines = (tmp_path / "e.jsonl").read_bytes().splitlines(keepends=True)
    write_jsonl([], tmp_path / "no-entries.jsonl")  # what exporting an empty store writes
    db = tmp_path / "src.db"
    before = file_hash(db)
    cases = {
        "empty.jsonl": (b"", "is empty"),
        "cut.jsonl": (b"".join(lines[:4]), "truncated"),
        "cut-mid-line.jsonl": (b"".join(lines)[:-30], "truncated"),
        "no-entries.jsonl": ((tmp_path / "no-entries.jsonl").read_bytes(), "no entries"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        result = run("cache", "import", name, "--store", filled, mode)
        assert result.exit_code == 1, (name, result.output)
        assert message in result.output, (name, result.output)
        assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
        assert file_hash(db) == before, name
    assert _entries_in(db) == 15


def test_an_empty_archive_does_not_empty_the_store(filled: str, tmp_path: Path) -> None:
    write_archive([], tmp_path / "empty.tar.gz")
    result = run("cache", "import", "empty.tar.gz", "--store", filled, "--replace")
    assert result.exit_code == 1 and "holds no entries" in result.output
    assert _entries_in(tmp_path / "src.db") == 15


def test_hostile_values_are_one_line_errors(filled: str, tmp_path: Path) -> None:
    """Faults: deeply nested JSON (RecursionError) and prompt_tokens of 2^70 (OverflowError
    in the store) were tracebacks."""
    from dataclasses import replace

    from comeapi.cache.archive import entry_line
    from tests.cache.test_archive_limits import archive_with_lines

    huge = replace(prompt_entry("hello", 0), prompt_tokens=2**70).sealed()
    archive_with_lines(tmp_path / "huge.tar.gz", [entry_line(huge)])
    archive_with_lines(tmp_path / "deep.tar.gz", [b"[" * 100_000 + b"\n"])
    before = file_hash(tmp_path / "src.db")
    for name in ("huge.tar.gz", "deep.tar.gz"):
        result = CliRunner().invoke(main, ["cache", "import", name, "--store", filled])
        assert result.exit_code == 1, (name, result.output, result.exception)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert file_hash(tmp_path / "src.db") == before


def test_a_store_url_without_its_scheme_names_the_key() -> None:
    """Fault: `--store /tmp/x.db` gave a garbled message naming no key."""
    result = run("cache", "ls", "--store", "/tmp/x.db")
    assert result.exit_code == 2
    assert result.output.startswith("Error: invalid setting store: ")
    assert "did you mean sqlite:/tmp/x.db" in result.output
    assert "--store, COMEAPI_STORE" in result.output
    assert result.output.count("\n") == 1


def test_an_unusable_store_path_is_a_clear_error(tmp_path: Path) -> None:
    write_archive(sample_entries(prompts=1, variants=2), tmp_path / "a.tar.gz")
    result = run("cache", "import", "a.tar.gz", "--store", "sqlite:/proc/nope/x.db")
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output


def test_bad_store_url_is_a_usage_error() -> None:
    result = run("cache", "ls", "--store", "redis://x")
    assert result.exit_code == 2
    assert "store" in result.output


# --- copy ---------------------------------------------------------------------------------


def _fake_scp(tmp_path: Path, script: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    scp = bindir / "scp"
    scp.write_text("#!/bin/sh\n" + script)
    scp.chmod(scp.stat().st_mode | stat.S_IEXEC)
    return f"{bindir}:{os.environ['PATH']}"


def test_copy_runs_scp_with_batch_mode(
    filled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("cache", "export", "c.tar.gz", "--store", filled)
    # A stand-in scp that records its arguments and copies to the local path after ':'.
    monkeypatch.setenv(
        "PATH",
        _fake_scp(tmp_path, 'echo "$@" > scp.args\ncp "$6" "${7#*:}"\n'),
    )
    result = run("cache", "copy", "c.tar.gz", f"user@host:{tmp_path / 'remote.tar.gz'}")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "remote.tar.gz").read_bytes() == (tmp_path / "c.tar.gz").read_bytes()
    assert "BatchMode=yes" in (tmp_path / "scp.args").read_text()


def test_copy_reports_scp_failure_and_refuses_bad_archives(
    filled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("cache", "export", "c.tar.gz", "--store", filled)
    monkeypatch.setenv(
        "PATH", _fake_scp(tmp_path, 'echo "Permission denied (publickey)." >&2\nexit 1\n')
    )
    result = run("cache", "copy", "c.tar.gz", "user@host:/tmp/")
    assert result.exit_code == 1
    assert "scp to user@host:/tmp/ failed: Permission denied (publickey)." in result.output
    (tmp_path / "bad.tar.gz").write_bytes(b"garbage")
    result = run("cache", "copy", "bad.tar.gz", "user@host:/tmp/")
    assert result.exit_code == 1 and "not a valid gzip" in result.output
    result = run("cache", "copy", "c.tar.gz", "no-colon")
    assert result.exit_code == 2 and "user@host:PATH" in result.output


def test_copy_times_out(filled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run("cache", "export", "c.tar.gz", "--store", filled)
    monkeypatch.setenv("PATH", _fake_scp(tmp_path, "exec sleep 30\n"))
    result = run("cache", "copy", "c.tar.gz", "user@host:/tmp/", "--timeout", "1")
    assert result.exit_code == 1 and "timed out after 1s" in result.output


def test_push_and_pull_are_listed_when_available() -> None:
    result = run("cache", "--help")
    assert result.exit_code == 0
    names = ["copy", "export", "import", "ls"]
    if importlib.util.find_spec("comeapi.cli.cache_dynamo") is not None:
        names += ["push", "pull"]
    for name in names:
        assert f"  {name} " in result.output
