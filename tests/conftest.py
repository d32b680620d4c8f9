from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import BUNDLED_MODEL, MODEL_DIR, Proc


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The repo's models directory holding the bundled model (``make test`` prepares it)."""
    if not (MODEL_DIR / BUNDLED_MODEL).is_file():
        from comeapi.models.bundled import prepare

        prepare(MODEL_DIR)
    return MODEL_DIR


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start processes that are stopped (whole group, by PID) when the test ends."""
    procs: list[Proc] = []

    def _spawn(argv: list[str], env: dict[str, str] | None = None, name: str = "proc") -> Proc:
        proc = Proc(argv, tmp_path / f"{name}-{len(procs)}.log", env)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in reversed(procs):
        proc.stop()
