"""The models directory: listing, GGUF check, resolving a requested name."""

from __future__ import annotations

from pathlib import Path

import pytest

from comeapi.errors import ConfigError, ModelNotFoundError
from comeapi.models.catalogue import check_gguf, check_model_dir, list_models, resolve
from comeapi.settings import load_settings


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


SMOLLM2 = "smollm2-135m-instruct-q4_1.gguf"


@pytest.mark.parametrize(
    ("files", "default"),
    [
        (["gemma-3-270m-q4_k_m.gguf", SMOLLM2], SMOLLM2),
        (["alpha.gguf", "gemma-3-270m-q4_k_m.gguf"], "alpha.gguf"),  # first by name
        (["gemma-3-270m-q4_k_m.gguf"], "gemma-3-270m-q4_k_m.gguf"),  # the only one
    ],
)
def test_the_default_model_of_a_directory(tmp_path: Path, files: list[str], default: str) -> None:
    """default_model, else the only file, else the bundled SmolLM2, else the first by name."""
    for name in files:
        (tmp_path / name).write_bytes(b"GGUF" + b"\0" * 8)
    _, chosen = check_model_dir(load_settings(model_dir=tmp_path))
    assert chosen.name == default
    _, configured = check_model_dir(load_settings(model_dir=tmp_path, default_model=files[0]))
    assert configured.name == files[0]
