"""The models directory: listing, GGUF check, resolving a requested name."""

from __future__ import annotations

from pathlib import Path

import pytest

from comeapi.errors import ConfigError, ModelNotFoundError
from comeapi.models.catalogue import check_gguf, list_models, resolve


def make(tmp_path: Path, name: str, data: bytes = b"GGUF" + b"\x00" * 1020) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_list_models_sorted_ggufs_only(tmp_path: Path) -> None:
    make(tmp_path, "b.gguf")
    make(tmp_path, "a.gguf", b"GGUF" + b"\x00" * (2 * 1024 * 1024 - 4))
    make(tmp_path, "notes.txt")
    (tmp_path / "dir.gguf").mkdir()
    models = list_models(tmp_path)
    assert [m.name for m in models] == ["a.gguf", "b.gguf"]
    assert models[0].size_mb == 2.0 and models[0].size_bytes == 2 * 1024 * 1024
    assert models[1].path == tmp_path / "b.gguf"


def test_list_models_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="comeapi models prepare"):
        list_models(tmp_path / "nope")


def test_check_gguf(tmp_path: Path) -> None:
    check_gguf(make(tmp_path, "ok.gguf"))
    with pytest.raises(ConfigError, match="not a GGUF file"):
        check_gguf(make(tmp_path, "html.gguf", b"<!DOCTYPE html>"))
    with pytest.raises(ConfigError, match="not a GGUF file"):
        check_gguf(make(tmp_path, "empty.gguf", b""))
    with pytest.raises(ConfigError, match="cannot be read"):
        check_gguf(tmp_path / "missing.gguf")


def test_resolve(tmp_path: Path) -> None:
    make(tmp_path, "a.gguf")
    make(tmp_path, "b.gguf")
    models = list_models(tmp_path)
    assert resolve(models, "b.gguf").name == "b.gguf"
    assert resolve(models, "b").name == "b.gguf"  # without the suffix
    assert resolve(models, None, "a.gguf").name == "a.gguf"
    assert resolve(models[:1], None).name == "a.gguf"  # the only one
    with pytest.raises(ModelNotFoundError) as err:
        resolve(models, None)  # several and no default
    with pytest.raises(ModelNotFoundError) as err:
        resolve(models, "c.gguf", "a.gguf")
    assert err.value.status == 404
    assert err.value.available == ["a.gguf", "b.gguf"]
    assert err.value.to_dict()["error"]["available_models"] == ["a.gguf", "b.gguf"]
