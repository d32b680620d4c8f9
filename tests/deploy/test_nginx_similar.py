"""nginx in front of ``comeapi serve --match similar``: nginx keeps exact keys only.

Real nginx (deploy/nginx) in front of a real gateway holding the shipped answers and their
calibration. A paraphrase misses nginx's caches, goes to comeapi, which answers it as the
known prompt (X-Cache-Match: similar); nginx keeps it in neither of its caches (the
canonical one: X-Comeapi-No-Store; the raw-body one: X-Cache-Match), so the same paraphrase
goes to comeapi again, and an exact prompt is still kept and replayed by nginx.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from comeapi.cache.archive import read_calibration
from comeapi.cache.default import shipped_cache_path, shipped_entries
from comeapi.cache.sqlite import SqliteStore
from tests.deploy.nginx_stack import Nginx, count_entries, nginx_missing
from tests.helpers import Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

SECRET = "similar-test-secret-0123456789"
JAPAN = "What is the capital of Japan?"
PARAPHRASE = {"messages": [{"role": "user", "content": "What's the capital city of Japan?"}]}
EXACT = {"messages": [{"role": "user", "content": "Write a four-line poem about the sea."}]}


@dataclass
class Stack:
    gateway: Proc
    nginx: Nginx


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    missing = nginx_missing()
    if missing:
        pytest.fail(missing)
    base = Path(tempfile.mkdtemp(prefix="comeapi-nginx-similar-"))
    base.chmod(0o755)  # nginx's worker (www-data) reaches its cache directory
    with SqliteStore(base / "store.db") as store:
        store.put_many(shipped_entries())
        store.set_calibration(read_calibration(shipped_cache_path()))
    port = free_port()
    gateway = Proc(
        comeapi_argv(
            "serve",
            "--port", str(port),
            "--backend", f"http://127.0.0.1:{free_port()}",  # nothing there: hits only
            "--store", f"sqlite:{base / 'store.db'}",
            "--variant-secret", SECRET,
            "--match", "similar",
        ),
        base / "gateway.log",
    )  # fmt: skip
    nginx = Nginx(base / "nginx", base / "nginx-cache", f"127.0.0.1:{port}", SECRET, variants=1)
    try:
        gateway.wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        nginx.start()
        yield Stack(gateway, nginx)
    finally:
        nginx.stop()
        gateway.stop()
        shutil.rmtree(base, ignore_errors=True)


def _chat(stack: Stack, body: dict[str, object]) -> httpx.Response:
    return httpx.post(stack.nginx.url + "/v1/chat/completions", json=body, timeout=30)


def test_a_paraphrase_is_answered_by_comeapi_and_kept_by_no_nginx_cache(stack: Stack) -> None:
    first = _chat(stack, PARAPHRASE)
    assert first.status_code == 200, first.text + stack.nginx.error_log()
    assert first.headers["x-cache-match"] == "similar"
    assert unquote(first.headers["x-cache-prompt"]) == JAPAN
    assert first.headers["x-cache-status"] == "MISS"
    assert "x-comeapi-no-store" not in first.headers  # nginx's own business, not the client's
    stored = count_entries(stack.nginx.cache_dir)
    again = _chat(stack, PARAPHRASE)
    assert again.status_code == 200 and again.headers["x-cache-match"] == "similar"
    assert again.headers["x-cache-status"] == "MISS"  # comeapi answered it again
    assert count_entries(stack.nginx.cache_dir) == stored


def test_an_exact_prompt_is_still_kept_and_replayed_by_nginx(stack: Stack) -> None:
    first = _chat(stack, EXACT)
    assert first.status_code == 200 and first.headers["x-cache-match"] == "exact", first.text
    again = _chat(stack, EXACT)
    assert again.headers["x-cache-status"] == "HIT"
    assert again.json()["choices"] == first.json()["choices"]
