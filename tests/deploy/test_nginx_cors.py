"""CORS through the nginx tier: nginx answers browsers as comeapi's gateway does.

Real nginx (deploy/nginx rendered with COMEAPI_CORS_ORIGINS and COMEAPI_API_KEYS) in front
of a real `comeapi serve` holding the shipped answers, configured the same way (its own
--cors-origin and --api-key). The gateway is the reference: a preflight gets the same
status and CORS headers from both, before any key check. A stored answer carries the
Access-Control-Allow-Origin of the origin asking now, never of the page whose request
filled it; nginx's own answers (400 from njs, 401, 404, 405, 413, 502) carry it too.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.cache.default import shipped_entries
from comeapi.cache.prompts import load_prompt_set
from comeapi.cache.sqlite import SqliteStore
from tests.deploy.nginx_stack import RENDER, Nginx, nginx_missing
from tests.helpers import Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

SECRET = "cors-test-secret-0123456789"
KEY = "cors-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
A, B, EVIL = "https://a.example", "http://localhost:5173", "https://evil.example"
ORIGINS = f"{A}, {B}"
# Shipped answers (src/comeapi/data/prompts.yaml): answered by comeapi from its store.
CHAT = {"messages": [{"role": "user", "content": "Hello! What can you help me with?"}]}
PROMPT = {"prompt": "Once upon a time in a magical forest,"}
EXPOSED = "X-Cache-Status, X-Cache-Variant, Retry-After"
SHIPPED_MODEL = load_prompt_set().model  # the only model the gateway's store holds


@dataclass
class Stack:
    gateway: str  # comeapi serve, the reference
    nginx: Nginx  # COMEAPI_CORS_ORIGINS=ORIGINS, in front of the gateway
    plain: Nginx  # no COMEAPI_CORS_ORIGINS, in front of the same gateway
    lone: Nginx  # COMEAPI_CORS_ORIGINS=ORIGINS, comeapi unreachable
    any: Nginx  # COMEAPI_CORS_ORIGINS=*, comeapi unreachable


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    missing = nginx_missing()
    if missing:
        pytest.fail(missing)
    base = Path(tempfile.mkdtemp(prefix="comeapi-nginx-cors-"))
    base.chmod(0o755)  # nginx's worker (www-data) reaches its cache directory
    with SqliteStore(base / "store.db") as store:
        store.put_many(shipped_entries())
    port = free_port()
    gateway = Proc(
        comeapi_argv(
            "serve",
            "--port", str(port),
            "--backend", f"http://127.0.0.1:{free_port()}",  # nothing there: hits only
            "--store", f"sqlite:{base / 'store.db'}",
            "--variant-secret", SECRET,
            "--api-key", KEY,
        ),
        base / "gateway.log",
        env={"COMEAPI_CORS_ORIGINS": ORIGINS},
    )  # fmt: skip
    upstream = f"127.0.0.1:{port}"
    dead = f"127.0.0.1:{free_port()}"
    keyed = {"COMEAPI_API_KEYS": KEY}
    cors = {**keyed, "COMEAPI_CORS_ORIGINS": ORIGINS}
    # One variant: the second request for a prompt is a HIT of the entry the first filled.
    nginxes = [
        Nginx(base / name, base / f"{name}-cache", up, SECRET, variants=1, env=env)
        for name, up, env in (
            ("nginx", upstream, cors),
            ("plain", upstream, keyed),
            ("lone", dead, cors),
            ("any", dead, {**keyed, "COMEAPI_CORS_ORIGINS": "*"}),
        )
    ]
    try:
        gateway.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        for nginx in nginxes:
            nginx.start()
        yield Stack(f"http://127.0.0.1:{port}", *nginxes)
    finally:
        for nginx in nginxes:
            nginx.stop()
        gateway.stop()
        shutil.rmtree(base, ignore_errors=True)


def cors(r: httpx.Response) -> dict[str, list[str]]:
    """The CORS headers of an answer, each with every value it was sent with."""
    out: dict[str, list[str]] = {}
    for name, value in r.headers.multi_items():
        if name.startswith("access-control-") or name == "vary":
            out.setdefault(name, []).append(value)
    return out


def preflight(url: str, origin: str, method: str, **headers: str) -> httpx.Response:
    sent = {"Origin": origin, "Access-Control-Request-Method": method, **headers}
    return httpx.options(url, headers=sent, timeout=30)


PREFLIGHTS: list[tuple[str, str, dict[str, str]]] = [
    (A, "POST", {"Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}),
    (B, "GET", {}),
    (EVIL, "POST", {"Access-Control-Request-Headers": "authorization"}),
    (A, "PUT", {}),
    (EVIL, "DELETE", {}),
    (A, "POST", {"Access-Control-Request-Private-Network": "true"}),
]


@pytest.mark.parametrize(("origin", "method", "headers"), PREFLIGHTS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/completions", "/v1/models", "/nope"])
def test_preflight_is_answered_before_the_key_check_as_by_the_gateway(
    stack: Stack, path: str, origin: str, method: str, headers: dict[str, str]
) -> None:
    reference = preflight(stack.gateway + path, origin, method, **headers)
    got = preflight(stack.nginx.url + path, origin, method, **headers)
    assert got.status_code == reference.status_code, (got.text, reference.text)
    assert cors(got) == cors(reference)
    assert "www-authenticate" not in got.headers
    if reference.status_code == 200:
        assert got.text == reference.text == "OK"
        assert got.headers["access-control-allow-origin"] == origin
    else:
        error, expected = got.json()["error"], reference.json()["error"]
        assert (error["code"], error["param"]) == (expected["code"], expected["param"])
        # "this origin, method is not allowed (see ...)": the same refusal named
        assert error["message"].split("(see")[0] == expected["message"].split("(see")[0]
        assert got.headers["content-type"] == "application/json"


def post(url: str, body: dict[str, Any], origin: str | None) -> httpx.Response:
    headers = {**AUTH, **({"Origin": origin} if origin else {})}
    return httpx.post(url, json=body, headers=headers, timeout=30)


def assert_answer_headers(r: httpx.Response, origin: str | None) -> None:
    """What a browser on ``origin`` must get: its own origin back if allowed, else none."""
    headers = cors(r)
    if origin in (A, B):
        assert headers.pop("access-control-allow-origin") == [origin], r.headers
    if origin is not None:
        assert headers.pop("access-control-expose-headers") == [EXPOSED], r.headers
    assert headers == {"vary": ["Origin"]}, r.headers


@pytest.mark.parametrize(
    ("path", "body", "order"),
    [
        ("/v1/chat/completions", CHAT, [A, B, EVIL, None, A]),
        ("/generate", PROMPT, [B, A, None, EVIL, B]),
        ("/v1/completions", {**PROMPT, "stream": True}, [A, B, EVIL]),
    ],
)
def test_a_stored_answer_carries_the_asking_origin_only(
    stack: Stack, path: str, body: dict[str, Any], order: list[str | None]
) -> None:
    statuses = []
    for origin in order:
        r = post(stack.nginx.url + path, body, origin)
        assert r.status_code == 200, r.text
        statuses.append(r.headers["x-cache-status"])
        assert_answer_headers(r, origin)
        # comeapi's own answer to the same origin carries the same origin back.
        direct = post(stack.gateway + path, body, origin)
        want = direct.headers.get_list("access-control-allow-origin")
        assert r.headers.get_list("access-control-allow-origin") == want
    assert statuses[0] == "MISS" and set(statuses[1:]) == {"HIT"}, statuses


def test_the_stored_model_list_carries_the_asking_origin_only(stack: Stack) -> None:
    seen = []
    for origin in (A, B, EVIL, None):
        headers = {**AUTH, **({"Origin": origin} if origin else {})}
        r = httpx.get(stack.nginx.url + "/v1/models", headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == SHIPPED_MODEL
        seen.append(r.headers["x-cache-status"])
        assert_answer_headers(r, origin)
    assert "HIT" in seen[1:], seen


@pytest.mark.parametrize("origin", [A, EVIL, None])
def test_nginx_own_answers_carry_cors_headers(stack: Stack, origin: str | None) -> None:
    url = stack.nginx.url
    sent = {"Origin": origin} if origin else {}
    answers = {
        "njs 400": (400, post(url + "/v1/chat/completions", {"messages": []}, origin)),
        "401": (401, httpx.post(url + "/generate", json=PROMPT, headers=sent, timeout=30)),
        "status 401": (401, httpx.get(url + "/status", headers=sent, timeout=30)),
        "405": (405, httpx.get(url + "/generate", headers={**sent, **AUTH}, timeout=30)),
        "404": (404, httpx.get(url + "/nope", headers={**sent, **AUTH}, timeout=30)),
        "413": (
            413,
            httpx.post(url + "/generate", content=b"x" * 300_000, headers=sent, timeout=30),
        ),
        "502": (502, post(stack.lone.url + "/v1/completions", PROMPT, origin)),
        "502 fallback": (
            200,
            httpx.get(stack.lone.url + "/v1/models", headers={**sent, **AUTH}, timeout=30),
        ),
    }
    for what, (status, r) in answers.items():
        assert r.status_code == status, (what, r.text)
        assert r.headers["content-type"] == "application/json", what
        assert_answer_headers(r, origin)
    assert answers["401"][1].headers["www-authenticate"] == "Bearer"
    assert answers["502"][1].headers["retry-after"] == "5"


def test_any_origin(stack: Stack) -> None:
    r = preflight(stack.any.url + "/v1/chat/completions", EVIL, "POST")
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    r = post(stack.any.url + "/v1/chat/completions", CHAT, EVIL)
    assert r.status_code == 502
    assert r.headers["access-control-allow-origin"] == "*"
    r = post(stack.any.url + "/v1/chat/completions", CHAT, None)
    assert "access-control-allow-origin" not in r.headers


def test_without_cors_origins_nginx_allows_no_origin(stack: Stack) -> None:
    """The default: comeapi's own CORS headers (it has --cors-origin) do not get through."""
    r = preflight(stack.plain.url + "/v1/chat/completions", A, "POST")
    assert r.status_code == 401  # as comeapi without --cors-origin: the key is checked
    assert "access-control-allow-origin" not in r.headers
    r = preflight(stack.plain.url + "/v1/models", A, "GET", **AUTH)
    assert cors(r) == {}, r.headers  # comeapi's preflight answer, its CORS headers hidden
    for _ in range(2):  # a MISS through comeapi, then a HIT
        r = post(stack.plain.url + "/v1/chat/completions", CHAT, A)
        assert r.status_code == 200
        assert cors(r) == {}, r.headers


@pytest.mark.parametrize(
    "origins", ["https://a.example/", "https://a.example, evil", 'https://a"b', "a.example"]
)
def test_render_refuses_what_is_not_an_origin(tmp_path: Path, origins: str) -> None:
    nginx = Nginx(tmp_path, tmp_path / "cache", "127.0.0.1:9", SECRET)
    env = {**nginx.render_env(), "COMEAPI_CORS_ORIGINS": origins, "NGINX_USER": ""}
    done = subprocess.run(
        ["sh", str(RENDER), str(tmp_path / "conf")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert "COMEAPI_CORS_ORIGINS" in done.stderr
