"""Fixtures of the CLI tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No COMEAPI_* variable from the caller's shell, the test's folder as the working
    directory and as the data directory's home (where the default store lives)."""
    for name in list(os.environ):
        if name.startswith("COMEAPI_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
