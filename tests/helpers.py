"""Start comeapi (or any) processes for tests on free loopback ports, and always stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "models"
# The model the tests run inference on: Gemma 3 270M, bundled (comeapi's default model is
# SmolLM2, comeapi.models.bundled.BUNDLED_MODEL; the smollm2_dir fixture has it).
BUNDLED_MODEL = "gemma-3-270m-q4_k_m.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process in its own session (so the whole group can be stopped by PID)."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        self._log = log_path.open("ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=REPO,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 60.0, status: int = 200) -> None:
        """Poll ``url`` until it answers ``status``; fail with the process log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.argv} exited {self.popen.returncode}:\n{self.log()}")
            try:
                if httpx.get(url, timeout=1.0).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{url} not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, then SIGKILL it if it has not exited in ``timeout``."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        # Stray grandchildren of a killed parent still carry the group id.
        _signal_group(self.pid, signal.SIGKILL)
        self._log.close()
        return self.popen.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def comeapi_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "comeapi", *args]


def group_alive(pgid: int) -> list[int]:
    """PIDs still alive in process group ``pgid`` (zombies excluded)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            alive.append(int(entry.name))
    return alive
