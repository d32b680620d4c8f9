"""Everything nginx answers by itself is JSON in OpenAI's error shape (issue 10, item 4).

Real nginx (deploy/nginx rendered, Debian's package with njs) with comeapi unreachable, slow,
or running and then stopped: comeapi down, timeouts, unknown routes, 405, 413, malformed
requests; the model lists answered from nginx's cache, or a fallback naming the default
model, so the official openai client's models.list() works against nginx alone.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from comeapi.balancer.pool import BackendPool
from comeapi.gateway.app import create_app
from comeapi.models.bundled import BUNDLED_MODEL as DEFAULT_MODEL
from comeapi.protocol.requests import KINDS
from comeapi.settings import load_settings
from tests.deploy.nginx_stack import Comeapi, Nginx, nginx_missing
from tests.helpers import BUNDLED_MODEL, free_port

pytestmark = pytest.mark.slow

SECRET = "errors-test-secret-0123456789"


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    missing = nginx_missing()
    if missing:
        pytest.fail(missing)
    path = Path(tempfile.mkdtemp(prefix="comeapi-nginx-errors-"))
    path.chmod(0o755)  # nginx's worker (www-data) reaches its cache directory
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def lone_nginx(base: Path) -> Iterator[Nginx]:
    """nginx whose comeapi is not there at all: every miss fails to connect."""
    nginx = Nginx(base / "lone", base / "lone-cache", f"127.0.0.1:{free_port()}", SECRET).start()
    yield nginx
    nginx.stop()


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code and error["message"] and error["param"] is None
    return dict(error)


def raw_request(port: int, data: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes no HTTP client would; return (status, head, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


def test_comeapi_down_is_502_json_with_retry_after(lone_nginx: Nginx) -> None:
    for url in (lone_nginx.url, lone_nginx.warmup_url):
        chat = {"messages": [{"role": "user", "content": "not cached"}]}
        for path, body in (
            ("/generate", {"prompt": "not cached"}),
            ("/v1/completions", {"prompt": "not cached"}),
            ("/v1/chat/completions", chat),
            ("/chat/completions", chat),
        ):
            r = httpx.post(url + path, json=body, timeout=30)
            error = assert_openai_error(r, 502, "backend_unavailable")
            assert error["type"] == "upstream_error"
            assert r.headers["retry-after"] == "5"
        for path in ("/", "/status", "/metrics", "/health", f"/v1/models/{BUNDLED_MODEL}"):
            r = httpx.get(url + path, timeout=30)
            assert_openai_error(r, 502, "backend_unavailable")
            assert r.headers["retry-after"] == "5"


def test_nginx_refusals_are_json(lone_nginx: Nginx) -> None:
    url = lone_nginx.url
    for path in ("/nope", "/v1/embeddings", "/v1", "/generate/x", '/a"b'):
        r = httpx.get(url + path, timeout=10)
        error = assert_openai_error(r, 404, "not_found")
        assert error["type"] == "invalid_request_error"
        assert "retry-after" not in r.headers
    assert httpx.get(url + "/v1/embeddings").json()["error"]["message"] == (
        "no route for GET /v1/embeddings"
    )
    # A path that would break the JSON is not quoted.
    assert "this path" in httpx.get(url + '/a"b\\').json()["error"]["message"]

    r = httpx.get(url + "/v1/chat/completions", timeout=10)
    assert_openai_error(r, 405, "invalid_value")
    assert r.headers["allow"] == "POST"

    r = httpx.post(url + "/generate", content=b"x" * (300 * 1024), timeout=30)
    assert_openai_error(r, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad_request"),
        (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
            400,
            "header_too_large",
        ),
        (
            b"POST /generate HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "not_implemented",
        ),
    ],
)
def test_malformed_requests_get_json(lone_nginx: Nginx, raw: bytes, status: int, code: str) -> None:
    got, head, body = raw_request(lone_nginx.port, raw)
    assert got == status, head
    assert b"Content-Type: application/json" in head
    assert httpx.Response(status, content=body).json()["error"]["code"] == code


def test_model_lists_fall_back_to_the_default_model(lone_nginx: Nginx) -> None:
    """render.sh's default COMEAPI_DEFAULT_MODEL is comeapi's bundled default model."""
    v1 = httpx.get(lone_nginx.url + "/v1/models", timeout=30)
    assert v1.status_code == 200 and v1.headers["x-cache-status"] == "FALLBACK"
    assert v1.json() == {
        "object": "list",
        "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "comeapi"}],
    }
    plain = httpx.get(lone_nginx.url + "/models", timeout=30)
    assert plain.status_code == 200
    assert plain.json() == {"models": [{"name": DEFAULT_MODEL, "size_mb": None}]}

    client = openai.OpenAI(
        base_url=lone_nginx.url + "/v1", api_key="unused", max_retries=0, timeout=30
    )
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
    with pytest.raises(openai.InternalServerError) as raised:
        client.completions.create(model=DEFAULT_MODEL, prompt="not cached", max_tokens=4)
    assert raised.value.status_code == 502 and raised.value.code == "backend_unavailable"
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model=DEFAULT_MODEL, input="x")
    assert missing.value.code == "not_found"


class BlackHole:
    """A TCP server that accepts connections and never answers: a hung comeapi."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()
        self.thread.join(5)


def test_timeout_is_504_json_with_retry_after(base: Path) -> None:
    hole = BlackHole()
    slow = Nginx(
        base / "slow",
        base / "slow-cache",
        f"127.0.0.1:{hole.port}",
        SECRET,
        env={"NGINX_GENERATION_TIMEOUT": "2s"},
    )
    slow.start()
    try:
        started = time.monotonic()
        r = httpx.post(slow.url + "/generate", json={"prompt": "hangs"}, timeout=30)
        assert 1.5 < time.monotonic() - started < 20
        error = assert_openai_error(r, 504, "backend_timeout")
        assert error["type"] == "upstream_error" and r.headers["retry-after"] == "5"
    finally:
        slow.stop()
        hole.close()


# --- with a real comeapi, then without ------------------------------------------------------


def comeapi_routes() -> list[str]:
    """Every route of comeapi's gateway, read from its app (so a new route is checked too)."""
    settings = load_settings(None, backends=["http://127.0.0.1:9"])
    app = create_app(settings, BackendPool.from_settings(settings))  # no CORS: GenerationRoutes
    router = app.app  # the Starlette app behind the generation routes
    assert isinstance(router, Starlette)
    paths = [route.path for route in router.routes if isinstance(route, Route)] + list(KINDS)
    params = {"{model:path}": BUNDLED_MODEL, "{key}": "ab" * 32, "{variant:int}": "0"}
    for name, value in params.items():
        paths = [p.replace(name, value) for p in paths]
    return paths


@pytest.fixture(scope="module")
def behind(base: Path, model_dir: Path) -> Iterator[tuple[Comeapi, Nginx]]:
    comeapi = Comeapi(base / "comeapi", model_dir, SECRET)
    comeapi.root.mkdir()
    nginx = Nginx(base / "front", base / "front-cache", f"127.0.0.1:{comeapi.port}", SECRET)
    try:
        comeapi.start()
        nginx.start()
        yield comeapi, nginx
    finally:
        nginx.stop()
        comeapi.stop()


def test_nginx_serves_exactly_comeapis_routes(behind: tuple[Comeapi, Nginx]) -> None:
    comeapi, nginx = behind
    routes = comeapi_routes()
    assert "/v1/models" in routes and "/generate" in routes
    for path in [*routes, "/nope", "/v1/embeddings", "/v1/models/"]:
        method = "POST" if path in KINDS else "GET"
        body = {"prompt": "x", "max_tokens": 1}
        direct = httpx.request(method, comeapi.url + path, json=body, timeout=60)
        proxied = httpx.request(method, nginx.url + path, json=body, timeout=60)
        assert proxied.status_code == direct.status_code, (path, proxied.text, direct.text)
        if direct.status_code == 404:
            assert proxied.json()["error"]["code"] == direct.json()["error"]["code"]


def test_model_lists_come_from_nginx_cache_when_comeapi_stops(
    behind: tuple[Comeapi, Nginx],
) -> None:
    comeapi, nginx = behind
    assert comeapi.running, "this test needs comeapi running first"
    listed = httpx.get(nginx.url + "/v1/models", timeout=60)
    assert listed.status_code == 200 and listed.headers["x-cache-status"] in ("MISS", "HIT")
    plain = httpx.get(nginx.url + "/models", timeout=60)
    assert plain.status_code == 200
    comeapi.stop()

    client = openai.OpenAI(base_url=nginx.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == [m["id"] for m in listed.json()["data"]]
    again = httpx.get(nginx.url + "/v1/models", timeout=30)
    # comeapi's own answer, kept by nginx (not the fallback)
    assert again.headers["x-cache-status"] in ("HIT", "STALE")
    assert again.content == listed.content
    assert httpx.get(nginx.url + "/models", timeout=30).content == plain.content
