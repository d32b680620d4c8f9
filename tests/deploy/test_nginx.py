"""Phase 1: real nginx (deploy/nginx) in front of the real comeapi gateway and bundled model.

One comeapi stack and one warmed nginx serve the whole module; tests that stop comeapi come
last. Every pitfall of the issue is reproduced or shown handled: bodies spilled to a temp
file, keys longer than proxy_buffer_size, byte-exact bodies, import while nginx runs.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.cache.key import normalise
from comeapi.cache.prompts import PromptItem, load_prompt_set
from comeapi.errors import RequestError
from tests.deploy.nginx_stack import (
    WORKER_USER,
    Comeapi,
    Nginx,
    count_entries,
    nginx_missing,
    post,
    run_cache_sh,
    run_warmup,
)
from tests.deploy.sshd import HOST_ALIAS, Sshd, sshd_missing
from tests.helpers import BUNDLED_MODEL, REPO, free_port

pytestmark = pytest.mark.slow

PROMPTS_FILE = Path(__file__).with_name("nginx_prompts.yaml")
PROMPT_SET = load_prompt_set(PROMPTS_FILE)
VARIANTS = 5
MODEL = PROMPT_SET.model
# chi-square critical value, 4 degrees of freedom, p = 0.0001 (a fair split fails 1 run in
# 10,000; a split off by 5 points per bucket fails almost always)
CHI2_CRITICAL = 23.51


def client_body(item: PromptItem) -> dict[str, Any]:
    """What a client sends for an item: the warmup body (no seed)."""
    body = item.request_body(0)
    body.pop("seed")
    return body


def route_of(item: PromptItem) -> str:
    return "/v1/chat/completions" if item.kind == "chat" else "/generate"


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode()


# comeapi here runs Gemma (the model_dir fixture) and the set is Gemma's: nginx gets the same
# default model, as docs/nginx.md asks (render.sh's own default is SmolLM2).
GEMMA = {"COMEAPI_DEFAULT_MODEL": BUNDLED_MODEL}


@dataclass
class Stack:
    comeapi: Comeapi
    nginx: Nginx
    warmup: subprocess.CompletedProcess[str]
    client: httpx.Client
    base: Path
    # references[item index][variant]: the answer bytes nginx stored for that slot
    references: dict[int, dict[int, bytes]]

    def slot(self, item: PromptItem, variant: int, nginx: Nginx | None = None) -> httpx.Response:
        """Ask the internal listener for one slot."""
        url = (nginx or self.nginx).warmup_url + route_of(item)
        return post(
            self.client, url, encode(client_body(item)), **{"X-Comeapi-Variant": str(variant)}
        )

    def require_comeapi(self) -> None:
        if not self.comeapi.running:
            pytest.fail(
                "this test needs comeapi running: it must come before the tests that stop it"
            )


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    missing = nginx_missing()
    if missing:
        pytest.fail(missing)
    # Not under pytest's tmp_path: nginx's worker (www-data) must reach the cache directory,
    # and /tmp/pytest-of-root is private to root.
    path = Path(tempfile.mkdtemp(prefix="comeapi-nginx-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(base: Path, model_dir: Path) -> Iterator[Stack]:
    secret = secrets.token_urlsafe(24)
    comeapi = Comeapi(base / "comeapi", model_dir, secret)
    comeapi.root.mkdir()
    nginx = Nginx(
        base / "nginx-a", base / "cache-a", f"127.0.0.1:{comeapi.port}", secret, env=GEMMA
    )
    client = httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0))
    try:
        comeapi.start()
        nginx.start()
        warmup = run_warmup(nginx.warmup_url, PROMPTS_FILE)
        assert warmup.returncode == 0, warmup.stdout + warmup.stderr + nginx.error_log()
        s = Stack(comeapi, nginx, warmup, client, base, {})
        for item in PROMPT_SET.items:
            s.references[item.index] = {}
            for v in range(VARIANTS):
                r = s.slot(item, v)
                assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT", r.text
                s.references[item.index][v] = r.content
        yield s
    finally:
        client.close()
        nginx.stop()
        comeapi.stop()


# --- warmup ------------------------------------------------------------------------------


def test_warmup_fills_exactly_one_entry_per_prompt_and_variant(stack: Stack) -> None:
    out = stack.warmup.stdout
    assert "warmup: 50 requests" in out and "0 HIT, 50 MISS, 0 failed" in out, out
    assert out.count("MISS /generate variant") == 7 * VARIANTS
    assert out.count("MISS /v1/chat/completions variant") == 3 * VARIANTS
    assert count_entries(stack.nginx.cache_dir) == 50

    again = run_warmup(stack.nginx.warmup_url, PROMPTS_FILE, "--verify")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "50 HIT, 0 MISS, 0 failed" in again.stdout
    assert count_entries(stack.nginx.cache_dir) == 50


def test_each_slot_holds_the_variant_comeapi_generated_for_it(stack: Stack) -> None:
    for item in PROMPT_SET.items:
        for v in range(VARIANTS):
            r = stack.slot(item, v)
            assert r.headers["x-cache-variant"] == str(v)
            assert r.content == stack.references[item.index][v]
    # Five seeds give the prompts different answers (not one answer copied five times).
    distinct = {len(set(refs.values())) for refs in stack.references.values()}
    assert max(distinct) > 1


def test_warmup_fails_loudly(stack: Stack) -> None:
    result = run_warmup(f"http://127.0.0.1:{free_port()}", PROMPTS_FILE)
    assert result.returncode != 0
    assert "FAIL" in result.stdout and "50 failed" in result.stdout


# --- the public listener -----------------------------------------------------------------


def test_public_requests_are_hits_spread_over_the_variants(stack: Stack) -> None:
    counts: Counter[int] = Counter()
    items = PROMPT_SET.items
    for i in range(500):
        item = items[i % len(items)]
        r = post(stack.client, stack.nginx.url + route_of(item), encode(client_body(item)))
        assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT", r.text
        variant = int(r.headers["x-cache-variant"])
        assert r.content == stack.references[item.index][variant]
        counts[variant] += 1
    expected = 500 / VARIANTS
    chi2 = sum((counts[v] - expected) ** 2 / expected for v in range(VARIANTS))
    assert sorted(counts) == list(range(VARIANTS))
    assert chi2 < CHI2_CRITICAL, counts
    assert count_entries(stack.nginx.cache_dir) >= 50


def test_the_raw_body_layer_keeps_only_bodies_the_front_door_validated(stack: Stack) -> None:
    raw_cache = stack.nginx.root / "state" / "raw-cache"
    item = next(i for i in PROMPT_SET.items if i.kind != "chat")
    # A byte form nobody sent before: its first request per slot goes through njs.
    body = json.dumps({"max_tokens": 7, "prompt": item.prompt}, indent=3).encode()
    before = count_entries(raw_cache)
    for _ in range(40):
        r = post(stack.client, stack.nginx.url + "/generate", body)
        assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT", r.text
        assert r.content == stack.references[item.index][int(r.headers["x-cache-variant"])]
    stored = count_entries(raw_cache)
    assert 1 <= stored - before <= VARIANTS  # one entry per slot, whatever the requests
    # Invalid bodies are refused every time and never kept, however often they are sent.
    invalid = json.dumps({"prompt": item.prompt, "max_tokens": -3}).encode()
    for _ in range(5):
        r = post(stack.client, stack.nginx.url + "/generate", invalid)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        assert "x-cache-status" not in r.headers
    assert count_entries(raw_cache) == stored


def test_public_client_cannot_choose_the_variant(stack: Stack) -> None:
    item = PROMPT_SET.items[0]
    # Even a client that learnt the secret: nginx overwrites both headers.
    forced = {"X-Comeapi-Variant": "2", "X-Comeapi-Variant-Secret": stack.comeapi.secret}
    seen = Counter(
        post(
            stack.client, stack.nginx.url + route_of(item), encode(client_body(item)), **forced
        ).headers["x-cache-variant"]
        for _ in range(40)
    )
    assert len(seen) > 1, seen
    # The internal listener is the one place where the header counts.
    assert all(stack.slot(item, 2).headers["x-cache-variant"] == "2" for _ in range(10))


# --- the canonical key -------------------------------------------------------------------


def test_equivalent_bodies_share_one_entry(stack: Stack) -> None:
    cafe = next(i for i in PROMPT_SET.items if i.prompt.startswith("Caf"))
    nfd = unicodedata.normalize("NFD", cafe.prompt)
    assert nfd != cafe.prompt
    variants = [
        {"prompt": f"  {nfd}\r\n", "max_tokens": 4},  # NFD, surrounding whitespace, CRLF
        {"max_tokens": 99, "model_name": MODEL.removesuffix(".gguf"), "prompt": cafe.prompt},
        {"prompt": cafe.prompt, "model": MODEL, "temperature": 0.1},
    ]
    before = count_entries(stack.nginx.cache_dir)
    url = stack.nginx.warmup_url + "/generate"
    for body in variants:
        raw = json.dumps(body, indent=2).encode()  # other spacing, other field order
        r = post(stack.client, url, raw, **{"X-Comeapi-Variant": "1"})
        assert r.headers["x-cache-status"] == "HIT", body
        assert r.content == stack.references[cafe.index][1]

    chat = next(i for i in PROMPT_SET.items if i.messages and len(i.messages) == 2)
    assert chat.messages is not None
    parts = [
        {"role": role, "content": [{"type": "text", "text": f"\n{content} "}]}
        for role, content in chat.messages
    ]
    r = post(
        stack.client,
        stack.nginx.warmup_url + "/v1/chat/completions",
        encode({"messages": parts}),
        **{"X-Comeapi-Variant": "3"},
    )
    assert r.headers["x-cache-status"] == "HIT"
    assert r.content == stack.references[chat.index][3]
    assert count_entries(stack.nginx.cache_dir) == before


def test_inner_whitespace_is_another_prompt(stack: Stack) -> None:
    stack.require_comeapi()
    body = encode({"prompt": "Once upon a time  in a magical forest,", "max_tokens": 4})
    url = stack.nginx.warmup_url + "/generate"
    first = post(stack.client, url, body, **{"X-Comeapi-Variant": "0"})
    assert first.status_code == 200 and first.headers["x-cache-status"] == "MISS", first.text
    again = post(stack.client, url, body, **{"X-Comeapi-Variant": "0"})
    assert again.headers["x-cache-status"] == "HIT" and again.content == first.content


def test_nginx_computes_comeapis_key(stack: Stack) -> None:
    url = stack.nginx.warmup_url + "/_comeapi/key"
    for item in PROMPT_SET.items:
        r = stack.client.post(
            url, params={"route": route_of(item)}, content=encode(client_body(item))
        )
        assert r.json()["key"] == item.key
    unkeyed = stack.client.post(url, content=b'{"prompt": "  \\r\\n "}')
    assert unkeyed.json()["key"] is None and unkeyed.json()["error"]["param"] == "prompt"


def test_nginx_normalises_every_code_point_like_python(stack: Stack) -> None:
    """NFC in njs (which lacks String.prototype.normalize) against Python's unicodedata."""
    url = stack.nginx.warmup_url + "/_comeapi/key"

    def document(text: str) -> str:
        r = stack.client.post(url, content=json.dumps({"prompt": text}).encode())
        return str(r.json()["document"])

    def expected(text: str) -> str:
        doc = {"model": MODEL, "prompt": normalise(text), "v": 1}
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    # "|" never composes nor reorders, so each code point is normalised on its own.
    points = [cp for cp in range(0x110000) if not 0xD800 <= cp < 0xE000]
    for i in range(0, len(points), 20000):
        text = "|".join(map(chr, points[i : i + 20000]))
        assert document(text) == expected(text), f"chunk from U+{points[i]:04X}"

    # Sequences: reordering of combining marks, composition, Hangul, CJK compatibility.
    import random

    rng = random.Random(5)
    pools = [
        range(0x41, 0x7B),
        range(0x300, 0x370),
        range(0x1100, 0x1176),
        range(0x11A8, 0x11C3),
        range(0xAC00, 0xAC60),
        range(0x3040, 0x30FF),
        range(0x0900, 0x0980),
        range(0xF900, 0xF920),
        range(0x1D15E, 0x1D16A),
        [0x20, 0x0D, 0x0A, 0x85, 0xA0, 0x3000, 0x1C, 0xFEFF, 0x2028],
    ]
    for _ in range(150):
        text = "".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(1, 16)))
        if normalise(text):
            assert document(text) == expected(text), [hex(ord(c)) for c in text]
    # A long run of combining marks in reverse class order (the usual insertion sort is
    # quadratic in it: minutes of a worker's CPU for one 256 KiB body). comeapi refuses such
    # a run (RequestError, see comeapi.cache.key), and so does nginx, after a normalisation
    # that stays linear (a pytest timeout stands in for "minutes").
    text = "a" + "\u0301\u0316\u0328" * 5000
    with pytest.raises(RequestError):
        normalise(text)
    r = stack.client.post(url, content=json.dumps({"prompt": text}).encode())
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "invalid_unicode")


def test_streams_are_stored_only_when_complete(stack: Stack) -> None:
    stack.require_comeapi()
    item = PROMPT_SET.items[1]
    url = stack.nginx.warmup_url + route_of(item)
    body = encode({**client_body(item), "stream": True})
    v2 = {"X-Comeapi-Variant": "2"}
    # A warmed slot: comeapi answers from its store, complete and sized: nginx keeps it.
    first = post(stack.client, url, body, **v2)
    assert first.headers["x-cache-status"] == "MISS"
    assert first.text.rstrip().endswith("data: [DONE]")
    again = post(stack.client, url, body, **v2)
    assert again.headers["x-cache-status"] == "HIT" and again.content == first.content
    # A stream generated on the spot could still end in an error event: never stored.
    fresh = encode({"prompt": "A stream nobody asked for before:", "max_tokens": 4, "stream": True})
    generated = post(stack.client, url, fresh, **v2)
    assert generated.status_code == 200 and generated.headers["x-cache-status"] == "MISS"
    assert post(stack.client, url, fresh, **v2).headers["x-cache-status"] != "HIT"


# --- pitfalls ------------------------------------------------------------------------------


def long_body(prompt: str, size: int) -> bytes:
    """A body of about ``size`` bytes: a short prompt plus a field comeapi ignores."""
    return encode({"prompt": prompt, "max_tokens": 4, "user": "x" * size})


def test_long_bodies_never_share_an_entry(stack: Stack) -> None:
    stack.require_comeapi()
    url = stack.nginx.warmup_url + "/generate"
    v0 = {"X-Comeapi-Variant": "0"}
    a, b = long_body("The sea at dawn is", 120_000), long_body("The mountains at dusk are", 120_000)
    first_a = post(stack.client, url, a, **v0)
    first_b = post(stack.client, url, b, **v0)
    assert first_a.headers["x-cache-status"] == "MISS"
    assert first_b.headers["x-cache-status"] == "MISS", "B was answered from A's entry"
    assert post(stack.client, url, a, **v0).content == first_a.content
    assert post(stack.client, url, b, **v0).content == first_b.content
    # A body (hence a raw-body key) longer than proxy_buffer_size is still cached.
    c = long_body("A key longer than a buffer", 20_000)
    assert post(stack.client, url, c, **v0).headers["x-cache-status"] == "MISS"
    assert post(stack.client, url, c, **v0).headers["x-cache-status"] == "HIT"


def test_body_over_the_limit_is_413(stack: Stack) -> None:
    before = count_entries(stack.nginx.cache_dir)
    r = post(stack.client, stack.nginx.url + "/generate", long_body("too big", 300 * 1024))
    assert r.status_code == 413
    assert count_entries(stack.nginx.cache_dir) == before


def test_naive_config_reproduces_the_pitfalls(stack: Stack) -> None:
    """The same checks against nginx's defaults and a raw-body key fail: the tests can fail."""
    stack.require_comeapi()
    naive = Nginx(
        stack.base / "nginx-naive",
        stack.base / "cache-naive",
        stack.nginx.upstream,
        stack.comeapi.secret,
        env=GEMMA,
    )
    naive.render()
    conf = naive.conf_dir / "comeapi-locations.conf"
    text = conf.read_text()
    for old, new in [
        ("client_body_buffer_size 256k;", "client_body_buffer_size 16k;"),
        ("$uri:$comeapi_cache_key:$comeapi_variant", "$uri:$request_body:$comeapi_variant"),
        ("proxy_buffer_size 16k;", "proxy_buffer_size 4k;"),
        ("proxy_cache_bypass $comeapi_skip_cache;", ""),
        ("proxy_no_cache $comeapi_no_store $upstream_http_x_comeapi_no_store;", ""),
    ]:
        assert old in text
        text = text.replace(old, new)
    conf.write_text(text)
    naive.start()
    try:
        url = naive.warmup_url + "/generate"
        v0 = {"X-Comeapi-Variant": "0"}
        a, b = long_body("The sea at dawn is", 120_000), long_body("Mountains at dusk", 120_000)
        assert post(stack.client, url, a, **v0).headers["x-cache-status"] == "MISS"
        wrong = post(stack.client, url, b, **v0)
        assert wrong.headers["x-cache-status"] == "HIT"  # B got A's answer
        # A key longer than proxy_buffer_size: nginx drops the cache for the request (every
        # time: no X-Cache-Status at all) and only says so in its error log.
        c = long_body("A key longer than a buffer", 8_000)
        for _ in range(2):
            r = post(stack.client, url, c, **v0)
            assert r.status_code == 200 and "x-cache-status" not in r.headers
        log = naive.error_log()
        assert "request body is buffered to a temporary file" in log
        assert "proxy_buffer_size 4096 is not enough for cache key" in log
    finally:
        naive.stop()


def test_api_keys_are_checked_by_nginx(stack: Stack) -> None:
    """A HIT never reaches comeapi, so with COMEAPI_API_KEYS nginx checks the key itself."""
    guarded = Nginx(
        stack.base / "nginx-keys",
        stack.base / "cache-keys",
        f"127.0.0.1:{free_port()}",  # nothing there: an authorised request gets 502
        stack.comeapi.secret,
        env={"COMEAPI_API_KEYS": "k-1.a+b/c=,other", **GEMMA},
    )
    guarded.start()
    try:
        url = guarded.url + "/generate"
        body = encode({"prompt": "Hello"})
        for auth, code in (
            (None, "missing_api_key"),
            ("Bearer K-1.A+B/C=", "invalid_api_key"),
            ("Bearer k-1xa+b/c=", "invalid_api_key"),
            ("Basic k-1.a+b/c=", "missing_api_key"),
        ):
            headers = {"Authorization": auth} if auth else {}
            r = post(stack.client, url, body, **headers)
            assert r.status_code == 401, auth
            assert r.json()["error"]["code"] == code  # comeapi's (protocol.auth)
            assert r.headers["www-authenticate"] == "Bearer"
        for auth in ("Bearer k-1.a+b/c=", "bearer other"):
            assert post(stack.client, url, body, Authorization=auth).status_code == 502
    finally:
        guarded.stop()


# --- comeapi stopped: Phase 1 proper --------------------------------------------------------


def assert_every_slot_hits(stack: Stack, nginx: Nginx) -> None:
    for item in PROMPT_SET.items:
        for v in range(VARIANTS):
            r = stack.slot(item, v, nginx)
            assert r.status_code == 200 and r.headers["x-cache-status"] == "HIT", r.text
            assert r.content == stack.references[item.index][v]
        public = post(stack.client, nginx.url + route_of(item), encode(client_body(item)))
        assert public.status_code == 200 and public.headers["x-cache-status"] == "HIT"


def test_cache_answers_with_comeapi_stopped_and_survives_a_restart(stack: Stack) -> None:
    stack.comeapi.stop()
    entries = count_entries(stack.nginx.cache_dir)
    assert_every_slot_hits(stack, stack.nginx)
    unknown = post(stack.client, stack.nginx.url + "/generate", encode({"prompt": "never asked"}))
    assert unknown.status_code == 502

    stack.nginx.stop()
    stack.nginx.start()
    assert_every_slot_hits(stack, stack.nginx)
    assert count_entries(stack.nginx.cache_dir) == entries


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_export_import_into_a_fresh_directory(stack: Stack) -> None:
    stack.comeapi.stop()
    archive = stack.base / "nginx_cache.tar.gz"
    fresh = stack.base / "cache-b"
    exported = make("cache-export", f"CACHE_DIR={stack.nginx.cache_dir}", f"EXPORT_FILE={archive}")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    entries = count_entries(stack.nginx.cache_dir)
    assert f"exported {entries} cache entries" in exported.stdout

    imported = make("cache-import", f"CACHE_DIR={fresh}", f"EXPORT_FILE={archive}")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert count_entries(fresh) == entries
    if WORKER_USER:
        uid = int(subprocess.check_output(["id", "-u", WORKER_USER], text=True))
        assert {p.stat().st_uid for p in fresh.rglob("*")} == {uid}
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in fresh.rglob("*") if p.is_file())

    # A second nginx on the imported directory, its upstream dead: every answer is a HIT.
    second = Nginx(
        stack.base / "nginx-b", fresh, f"127.0.0.1:{free_port()}", stack.comeapi.secret, env=GEMMA
    )
    second.start()
    try:
        assert_every_slot_hits(stack, second)
        refused = run_cache_sh(
            "import",
            "--dir",
            str(fresh),
            "--file",
            str(archive),
            "--pid-file",
            str(second.pid_file),
        )
        assert refused.returncode != 0 and "nginx is running" in refused.stderr
    finally:
        second.stop()


def test_copy_and_import_on_a_remote_host(stack: Stack) -> None:
    """cache-copy and cache-import with REMOTE_HOST through a real sshd on a loopback port
    (the "remote host" is this machine): scp carries the archive, ssh runs cache.sh there."""
    missing = sshd_missing()
    if missing:
        pytest.fail(missing)
    sshd = Sshd(stack.base / "sshd").start()
    try:
        remote_root = stack.base / "remote"
        archive = stack.base / "remote-export.tar.gz"
        remote = [
            f"REMOTE_HOST={HOST_ALIAS}",
            f"REMOTE_PATH={remote_root / 'incoming'}",
            f"SSH_OPTS=-F {sshd.config_file}",
        ]
        steps = [
            ("cache-export", f"CACHE_DIR={stack.nginx.cache_dir}", f"EXPORT_FILE={archive}"),
            ("cache-copy", f"EXPORT_FILE={archive}", *remote),
            (
                "cache-import",
                f"EXPORT_FILE={archive}",
                f"CACHE_DIR={remote_root / 'cache'}",
                *remote,
            ),
        ]
        for step in steps:
            result = make(*step)
            assert result.returncode == 0, step[0] + result.stdout + result.stderr + sshd.log()
        assert (remote_root / "incoming" / archive.name).read_bytes() == archive.read_bytes()
        assert count_entries(remote_root / "cache") == count_entries(stack.nginx.cache_dir)
        assert f"Accepted publickey for {sshd.user}" in sshd.log()
    finally:
        sshd.stop()


def test_import_rejects_unsafe_archives(stack: Stack) -> None:
    evil_dir = stack.base / "evil"
    evil_dir.mkdir()
    (evil_dir / "link").symlink_to("/etc/passwd")
    archive = stack.base / "evil.tar.gz"
    subprocess.run(["tar", "czf", str(archive), "-C", str(evil_dir), "."], check=True, timeout=30)
    target = stack.base / "cache-evil"
    result = run_cache_sh("import", "--dir", str(target), "--file", str(archive))
    assert result.returncode != 0 and "links" in result.stderr
    assert not target.exists()
    assert os.path.exists("/etc/passwd")


def _archive(path: Path, members: list[tarfile.TarInfo]) -> Path:
    """A tar.gz of ``members`` (files are empty; links point where they say)."""
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(b"") if member.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, 0o644
    return info


MANY = 3000  # a listing longer than a pipe's buffer (64 KiB)


def test_import_rejects_links_among_many_entries(tmp_path: Path) -> None:
    """The checks piped the listing into ``grep -q``, which stops reading at its first match:
    with a long listing the writer died of SIGPIPE and, under ``set -o pipefail``, the
    check counted as not matched, so 3,000 links to /etc/passwd were imported."""
    links = [_member(f"./link{i}", tarfile.SYMTYPE, "/etc/passwd") for i in range(MANY)]
    archive = _archive(tmp_path / "links.tar.gz", links)
    target = tmp_path / "cache"
    result = run_cache_sh("import", "--dir", str(target), "--file", str(archive))
    assert result.returncode != 0 and "links" in result.stderr, result.stdout + result.stderr
    assert not target.exists()


def test_import_rejects_a_parent_path_before_many_entries(tmp_path: Path) -> None:
    members = [_member("../escaped")] + [_member(f"./f{i:05d}") for i in range(MANY)]
    archive = _archive(tmp_path / "parent.tar.gz", members)
    target = tmp_path / "cache"
    result = run_cache_sh("import", "--dir", str(target), "--file", str(archive))
    assert result.returncode != 0 and "parent (..)" in result.stderr, result.stdout + result.stderr
    assert not target.exists() and not (tmp_path / "escaped").exists()


def test_import_takes_an_empty_archive(tmp_path: Path) -> None:
    """The rewritten checks must not refuse what is fine: an archive of nothing."""
    archive = _archive(tmp_path / "empty.tar.gz", [])
    target = tmp_path / "cache"
    result = run_cache_sh("import", "--dir", str(target), "--file", str(archive))
    assert result.returncode == 0, result.stdout + result.stderr
