"""``comeapi cache push/pull dynamodb`` against moto's server over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from comeapi.cache.archive import write_archive
from comeapi.cache.dynamo import DynamoStore, make_client
from comeapi.cache.open import open_store
from comeapi.cache.store import Entry
from comeapi.cli import main
from tests.aws_local import (
    REGION,
    chat_entries,
    dummy_credentials,
    prompt_entries,
    start_moto_server,
)
from tests.helpers import Proc, comeapi_argv

TABLE = "comeapi-cli-test"


def source_entries() -> list[Entry]:
    return (
        prompt_entries("富士山の高さは", 5)
        + prompt_entries("Once upon a time", 5)
        + chat_entries((("user", "こんにちは"),), 5)
        + prompt_entries("長" * 700, 2)  # 2100 bytes: longer than a partition key may be
    )


def ordered(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.key, e.variant))


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def endpoint(spawn: Callable[..., Proc], monkeypatch: pytest.MonkeyPatch) -> str:
    dummy_credentials(monkeypatch)
    return start_moto_server(spawn)


def test_push_then_pull_roundtrip(endpoint: str, tmp_path: Path) -> None:
    src, dst = f"sqlite:{tmp_path / 'src.db'}", f"sqlite:{tmp_path / 'dst.db'}"
    with open_store(src) as store:
        store.put_many(source_entries())
    where = ["--table", TABLE, "--endpoint-url", endpoint, "--region", REGION]
    out = run("cache", "push", "dynamodb", *where, "--create", "--store", src)
    assert "created table" in out
    assert "17 entries (4 prompts)" in out
    assert "catalogue revision 1." in out
    # Idempotent: a second push changes nothing (and the table exists now).
    again = run("cache", "push", "dynamodb", *where, "--create", "--store", src)
    assert "catalogue revision 2." in again and "make lambda-package" in again
    table = DynamoStore(make_client(REGION, endpoint), TABLE)
    assert ordered(list(table.entries())) == ordered(source_entries())
    assert sorted(table.catalogue().variants().values()) == [2, 5, 5, 5]

    run("cache", "pull", "dynamodb", *where, "--store", dst)
    with open_store(dst) as pulled:
        assert ordered(list(pulled.entries())) == ordered(source_entries())


def test_push_an_archive_with_replace(endpoint: str, tmp_path: Path) -> None:
    where = ["--table", TABLE, "--endpoint-url", endpoint, "--region", REGION]
    first = tmp_path / "first.tar.gz"
    write_archive(source_entries(), first)
    run("cache", "push", "dynamodb", *where, "--create", "--from-archive", str(first))
    smaller = prompt_entries("only this one", 3)
    second = tmp_path / "second.tar.gz"
    write_archive(smaller, second)
    out = run("cache", "push", "dynamodb", *where, "--replace", "--from-archive", str(second))
    assert "replaced the contents" in out
    table = DynamoStore(make_client(REGION, endpoint), TABLE)
    assert ordered(list(table.entries())) == ordered(smaller)
    assert table.catalogue().variants() == {smaller[0].key: 3}


def test_push_to_a_missing_table_says_how_to_create_it(endpoint: str, tmp_path: Path) -> None:
    src = f"sqlite:{tmp_path / 'src.db'}"
    with open_store(src) as store:
        store.put_many(prompt_entries("p", 1))
    result = CliRunner().invoke(
        main,
        [
            "cache",
            "push",
            "dynamodb",
            "--table",
            "nope",
            "--endpoint-url",
            endpoint,
            "--store",
            src,
        ],
    )
    assert result.exit_code == 1
    assert "--create" in result.output


def test_an_empty_source_is_refused(endpoint: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "cache", "push", "dynamodb", "--table", TABLE, "--endpoint-url", endpoint,
            "--create", "--replace", "--store", f"sqlite:{tmp_path / 'empty.db'}",
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "nothing to push" in result.output


def test_the_installed_command(endpoint: str, tmp_path: Path) -> None:
    """The real `comeapi` entry point in a child process, as a user runs it."""
    import subprocess

    archive = tmp_path / "cache.tar.gz"
    write_archive(source_entries(), archive)
    argv = comeapi_argv(
        "cache", "push", "dynamodb", "--table", TABLE, "--endpoint-url", endpoint,
        "--region", REGION, "--create", "--from-archive", str(archive),
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "17 entries" in done.stdout
