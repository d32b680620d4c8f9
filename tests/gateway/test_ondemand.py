"""``comeapi serve --on-demand`` with a real backend: nothing runs until a miss, the miss is
answered 503 + Retry-After while the backend starts, then served; idle, it stops again."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from comeapi.cache.default import shipped_entries
from comeapi.cache.prompts import load_prompt_set
from comeapi.cache.sqlite import SqliteStore
from tests.helpers import Proc, comeapi_argv, free_port

Spawn = Callable[..., Proc]


def _port_open(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    except httpx.TransportError:
        return False
    return True


def test_backends_start_on_a_miss_and_stop_when_idle(
    spawn: Spawn, tmp_path: Path, model_dir: Path
) -> None:
    with SqliteStore(tmp_path / "c.db") as store:
        store.put_many(shipped_entries())
    port, backend_port = free_port(), free_port()
    proc = spawn(
        comeapi_argv(
            "serve", "--on-demand", "--port", str(port), "--store", f"sqlite:{tmp_path / 'c.db'}",
            "--count", "1", "--base-port", str(backend_port), "--model-dir", str(model_dir),
            "--threads", "1", "--idle-timeout", "3", "--health-interval", "1",
        ),
        env={"COMEAPI_BACKENDS": "", "COMEAPI_BACKENDS_RANGE": ""},
        name="serve",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc.wait_http(url + "/health", timeout=30)
    assert not _port_open(backend_port)  # nothing runs before it is needed

    item = load_prompt_set().items[0]
    hit = httpx.post(url + item.route, json=item.request_body(0), timeout=5)
    assert hit.status_code == 200 and hit.headers["x-cache"] == "HIT"
    assert not _port_open(backend_port)  # a hit never starts a backend

    miss_body = {"prompt": "A prompt nobody cached", "max_tokens": 4, "temperature": 0}
    first = httpx.post(url + "/generate", json=miss_body, timeout=5)
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "backend_starting"
    assert int(first.headers["retry-after"]) >= 1

    deadline = time.monotonic() + 90
    while True:
        answer = httpx.post(url + "/generate", json=miss_body, timeout=60)
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        assert answer.status_code == 503, answer.text
        time.sleep(0.5)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-cache"] == "MISS" and answer.json()["usage"]["completion_tokens"] > 0
    assert httpx.get(url + "/status", timeout=5).json()["on_demand"]["state"] == "running"
    # The backends it started take only the key it generated for them and sends them.
    backend = f"http://127.0.0.1:{backend_port}"
    assert httpx.get(backend + "/models", timeout=5).status_code == 401
    assert httpx.get(backend + "/health", timeout=5).status_code == 200

    deadline = time.monotonic() + 30  # idle_timeout 3 s, checked every 0.75 s
    while _port_open(backend_port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _port_open(backend_port), proc.log()
    status = httpx.get(url + "/status", timeout=5).json()["on_demand"]
    assert status["state"] == "stopped" and status["starts"] == 1
    again = httpx.post(url + item.route, json=item.request_body(0), timeout=5)
    assert again.status_code == 200  # the cache keeps answering with nothing running
