"""open_store: the `store` setting's URL forms, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from comeapi.cache.open import open_store
from comeapi.cache.sqlite import SqliteStore
from comeapi.errors import ConfigError


def test_sqlite_url_creates_missing_directories(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "cache.db"
    with open_store(f"sqlite:{path}") as store:
        assert isinstance(store, SqliteStore)
        assert store.path == path
    assert path.is_file()


def test_sqlite_relative_and_triple_slash_forms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:var/x.db") as store:
        assert isinstance(store, SqliteStore)
    assert (tmp_path / "var" / "x.db").is_file()
    with open_store(f"sqlite:///{tmp_path}/y.db") as store:
        assert isinstance(store, SqliteStore)
    assert (tmp_path / "y.db").is_file()


@pytest.mark.parametrize("url", ["", "sqlite:", "redis://x", "cache.db", "dynamodb:", "s3:bucket"])
def test_bad_urls_name_the_store_setting(url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(url)
    assert info.value.param == "store"
    assert "store" in info.value.message


def test_a_directory_is_not_a_store_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file path"):
        open_store(f"sqlite:{tmp_path}")
