"""The conformance table against real nginx with njs (deploy/nginx), in front of a real
`comeapi serve` holding one answer per key of the table, then with comeapi stopped.

nginx's verdict on each body (its internal /_comeapi/key endpoint) must be the table's: the
same key document, the same 400 `param`, the same reason not to cache. Through the public
listener nginx must answer the 400s and the 401s (both hold the table's API key) itself and,
once its cache is filled, every keyed case from the cache alone.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from comeapi.cache.sqlite import SqliteStore
from tests.conformance.table import (
    API_KEY,
    CASES,
    DEFAULT_MODEL,
    Case,
    answer_text,
    check_reply,
    entries,
)
from tests.deploy.nginx_stack import Nginx, nginx_missing
from tests.helpers import Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    nginx: Nginx
    comeapi: Proc
    client: httpx.Client

    def stop_comeapi(self) -> None:
        self.comeapi.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    missing = nginx_missing()
    if missing:
        pytest.fail(missing)
    # Not under pytest's tmp_path: nginx's worker user must reach the cache directory.
    base = Path(tempfile.mkdtemp(prefix="comeapi-conformance-nginx-"))
    base.chmod(0o755)
    with SqliteStore(base / "store.db") as store:
        store.put_many(entries())
    port = free_port()
    # No --variant-secret: comeapi ignores nginx's slot choice and answers its one variant,
    # which nginx then keeps in every slot it asks for.
    argv = comeapi_argv(
        "serve",
        "--port", str(port),
        "--store", f"sqlite:{base / 'store.db'}",
        "--default-model", DEFAULT_MODEL,
        "--on-miss", "reject",
        "--api-keys", API_KEY,
    )  # fmt: skip
    comeapi = Proc(argv, base / "gateway.log")
    nginx = Nginx(
        base / "nginx",
        base / "cache",
        f"127.0.0.1:{port}",
        secrets.token_hex(16),
        env={"COMEAPI_API_KEYS": API_KEY},
    )
    client = httpx.Client(timeout=30.0)
    try:
        comeapi.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        nginx.start()
        yield Stack(nginx, comeapi, client)
    finally:
        client.close()
        nginx.stop()
        comeapi.stop()
        shutil.rmtree(base, ignore_errors=True)


def verdict(stack: Stack, case: Case) -> dict[str, object]:
    r = stack.client.post(
        stack.nginx.warmup_url + "/_comeapi/key", params={"route": case.route}, content=case.raw
    )
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_njs_verdict_and_cache_fill(stack: Stack, case: Case) -> None:
    if case.outcome == "unauthorized":  # refused before the body is read, on both listeners
        r = stack.client.post(
            stack.nginx.warmup_url + case.route, content=case.raw, headers=case.headers
        )
        headers = {k.lower(): v for k, v in r.headers.items()}
        check_reply(case, r.status_code, headers, r.content, tier="nginx (internal)")
        return
    v = verdict(stack, case)
    if case.keyed:
        doc = case.expect[case.outcome]
        assert v["document"] == json.dumps(
            doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True
        )
        assert v["key"] == case.key
        # Fill every slot of the entry through the internal listener: comeapi answers each
        # with a variant it serves; a prompt with none is comeapi's 404, which nginx keeps
        # nowhere.
        for slot in range(stack.nginx.variants):
            r = stack.client.post(
                stack.nginx.warmup_url + case.route,
                content=case.raw,
                headers={**case.headers, "X-Comeapi-Variant": str(slot)},
            )
            if case.outcome == "miss":
                assert r.status_code == 404, r.text
                assert r.json()["error"]["code"] == "prompt_not_cached"
                continue
            assert r.status_code == 200, r.text
            stream = r.headers["content-type"].startswith("text/event-stream")
            assert answer_text(case.route, r.content, stream) in case.served
    elif case.outcome == "error":
        error = v["error"]
        assert isinstance(error, dict), v
        assert error["param"] == case.expect["error"], error
        if "code" in case.expect:
            assert error["code"] == case.expect["code"]
        assert v["key"] is None
    else:
        assert v["uncacheable"] == case.expect["uncacheable"], v
        assert v["key"] is None and v["error"] is None


@pytest.mark.parametrize("case", CASES, ids=str)
def test_nginx_alone(stack: Stack, case: Case) -> None:
    """comeapi stopped: nginx answers the 400s and every keyed case from its cache."""
    if stack.comeapi.popen.poll() is None:
        stack.stop_comeapi()
    r = stack.client.post(stack.nginx.url + case.route, content=case.raw, headers=case.headers)
    if case.outcome in ("uncacheable", "miss"):
        # A miss that only comeapi could answer, and comeapi is stopped: a prompt whose
        # answers were all rejected is not a hit here either.
        assert r.status_code in (502, 503, 504), r.text
        return
    headers = {k.lower(): v for k, v in r.headers.items()}
    if case.outcome == "key":
        assert headers.get("x-cache-status") == "HIT", (r.status_code, r.text[:300])
        headers["x-cache"] = "HIT"  # nginx reports its own cache in X-Cache-Status
    check_reply(case, r.status_code, headers, r.content, tier="nginx")
