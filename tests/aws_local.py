"""AWS without AWS for tests: dummy credentials, and moto's server on a free loopback port."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from tests.helpers import Proc, free_port

REGION = "us-east-1"


def dummy_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and region that only moto accepts; never a real account's."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


def start_moto_server(spawn: Callable[..., Proc]) -> str:
    """``moto_server`` as a child process; returns its endpoint URL."""
    port = free_port()
    proc = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(f"{url}/moto-api/", timeout=60)
    return url
