"""`comeapi backend` and `comeapi models` as a user runs them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from comeapi.cli import main
from tests.helpers import BUNDLED_MODEL, REPO, Proc, comeapi_argv, free_port

Spawn = Callable[..., Proc]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        comeapi_argv(*args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_backend_reports_loading_then_ok_and_stops_on_sigterm(
    spawn: Spawn, model_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("alpha.gguf", "beta.gguf"):  # two names for the bundled model
        try:
            os.link(model_dir / BUNDLED_MODEL, models / name)
        except OSError:  # another file system
            shutil.copyfile(model_dir / BUNDLED_MODEL, models / name)
    port = free_port()
    url = f"http://127.0.0.1:{port}/health"
    argv = comeapi_argv(
        "backend", "--model-dir", str(models), "--port", str(port), "--threads", "1",
        "--max-loaded-models", "1",
    )  # fmt: skip
    backend = spawn(argv, name="backend")
    seen: list[str] = []
    deadline = time.monotonic() + 120
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(url)
            except httpx.TransportError:
                time.sleep(0.01)
                continue
            status = r.json()["status"]
            assert r.status_code == (200 if status == "ok" else 503)
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == "ok":
                break
            time.sleep(0.01)
    assert seen == ["loading", "ok"], backend.log()
    assert httpx.get(url, timeout=5).json()["loaded_models"] == ["alpha.gguf"]
    r = httpx.post(
        url.replace("/health", "/generate"),
        json={"prompt": "Hi", "model_name": "beta", "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["model"] == "beta.gguf"
    assert httpx.get(url, timeout=5).json()["loaded_models"] == ["beta.gguf"]  # alpha evicted
    os.kill(backend.pid, signal.SIGTERM)
    backend.popen.wait(30)  # graceful shutdown, no hang
    assert "Shutting down" in backend.log()


def test_non_gguf_model_is_a_clear_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_text("Entry not found")
    started = time.monotonic()
    result = run_cli("backend", "--model-dir", str(tmp_path), "--port", str(free_port()))
    assert result.returncode == 78  # EX_CONFIG: the pool backs off instead of looping
    assert "model.gguf is not a GGUF file" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_bad_setting_names_the_key() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["backend", "--ctx", "10"])
    assert result.exit_code == 2
    assert "ctx" in result.output and "COMEAPI_CTX" in result.output
    result = runner.invoke(main, ["backend"], env={"COMEAPI_N_GPU_LAYERS": "lots"})
    assert result.exit_code == 2
    assert "n_gpu_layers" in result.output


def test_backend_help_lists_the_flags() -> None:
    result = CliRunner().invoke(main, ["backend", "--help"])
    assert result.exit_code == 0
    for flag in ("--model-dir", "--host", "--port", "--threads", "--n-gpu-layers", "--ctx"):
        assert flag in result.output
    assert "--parent-pid" not in result.output  # internal
    result = CliRunner().invoke(main, ["backends", "start", "--help"])
    for flag in ("--base-port", "--count", "--host", "--restart-backoff-max"):
        assert flag in result.output


def test_models_ls(model_dir: Path) -> None:
    result = CliRunner().invoke(main, ["models", "ls", "--model-dir", str(model_dir)])
    assert result.exit_code == 0
    assert BUNDLED_MODEL in result.output and "241.4" in result.output
    result = CliRunner().invoke(main, ["models", "ls", "--model-dir", "/nonexistent"])
    assert result.exit_code == 1 and "does not exist" in result.output


@pytest.mark.slow
def test_models_prepare_is_idempotent(tmp_path: Path, model_dir: Path) -> None:
    target = tmp_path / "models"
    first = run_cli("models", "prepare", "--model-dir", str(target), "--only", BUNDLED_MODEL)
    assert first.returncode == 0, first.stderr
    path = target / BUNDLED_MODEL
    assert first.stdout.strip() == str(path)
    assert path.stat().st_size == (model_dir / BUNDLED_MODEL).stat().st_size
    assert path.read_bytes()[:4] == b"GGUF"
    mtime = path.stat().st_mtime_ns
    second = run_cli("models", "prepare", "--model-dir", str(target), "--only", BUNDLED_MODEL)
    assert second.returncode == 0 and second.stdout.strip() == str(path)
    assert path.stat().st_mtime_ns == mtime  # not written again
    assert [p.name for p in target.iterdir()] == [BUNDLED_MODEL]  # no partial files left
