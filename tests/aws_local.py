"""AWS without AWS for tests: dummy credentials, and moto's server on a free loopback port."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest

from comeapi.cache.key import chat_key, prompt_key
from comeapi.cache.store import Entry
from tests.helpers import Proc, free_port

REGION = "us-east-1"
MODEL = "gemma-3-270m-q4_k_m.gguf"


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


def prompt_entries(prompt: str, variants: int, model: str = MODEL) -> list[Entry]:
    """Sealed entries ``answer {v} to {prompt}`` for v in 0..variants-1."""
    key = prompt_key(prompt, model)
    return [
        Entry(
            key=key,
            variant=v,
            kind="prompt",
            prompt=prompt,
            answer=f"answer {v} to {prompt}",
            model=model,
            params={"temperature": 0.8, "top_p": 0.9, "max_tokens": 100},
            prompt_tokens=5,
            completion_tokens=7 + v,
            created=1_760_000_000.125,
        ).sealed()
        for v in range(variants)
    ]


def chat_entries(
    messages: tuple[tuple[str, str], ...], variants: int, model: str = MODEL
) -> list[Entry]:
    """Sealed chat entries ``chat answer {v}``."""
    key = chat_key(messages, model)
    return [
        Entry(
            key=key,
            variant=v,
            kind="chat",
            prompt=messages[-1][1],
            answer=f"chat answer {v}",
            model=model,
            messages=messages,
            prompt_tokens=3,
            completion_tokens=4,
        ).sealed()
        for v in range(variants)
    ]
