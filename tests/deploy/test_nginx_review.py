"""Phase 1 and the review: real nginx (deploy/nginx) in front of a real `comeapi serve` whose
store holds reviewed answers (no backend: every slot is answered from the store).

warmup.sh fills a slot whose variant is not served with one that is; a rejected-only prompt
is never stored by nginx; and a variant rejected after nginx stored it stops being served
once `cache.sh purge` (make cache-purge) has removed that prompt's entries, nginx running.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from comeapi.cache.prompts import PromptItem, load_prompt_set
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from tests.deploy.nginx_stack import Nginx, count_entries, nginx_missing, run_cache_sh, run_warmup
from tests.helpers import Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

PROMPTS = """\
variants: 5
max_tokens: 16
prompts:
  - prompt: "Write a short poem about the sea:"
"""
RAW_VALID = 2  # s (NGINX_RAW_CACHE_VALID)
REJECTED_ONLY = "A prompt whose answers were all rejected"


@dataclass
class Stack:
    base: Path
    store: str
    prompts: Path
    item: PromptItem
    comeapi: Proc
    nginx: Nginx
    client: httpx.Client

    def public(self, n: int = 60) -> dict[int, set[str]]:
        """Variants the public listener serves for the prompt, each with the X-Cache-Status
        values it came with."""
        seen: dict[int, set[str]] = {}
        for _ in range(n):
            r = self.client.post(self.nginx.url + "/generate", json={"prompt": self.item.prompt})
            assert r.status_code == 200, r.text
            variant = int(r.headers["x-cache-variant"])
            assert r.json()["response"] == f"sea answer {variant}"
            seen.setdefault(variant, set()).add(r.headers["x-cache-status"])
        return seen

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            comeapi_argv("cache", *args, "--store", self.store),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip


def entries(item: PromptItem) -> list[Entry]:
    states = {1: "rejected", 3: "rejected"}
    out = [
        Entry(
            key=item.key, variant=v, kind="prompt", prompt=item.prompt, answer=f"sea answer {v}",
            model=item.model, params={"seed": v}, state=states.get(v, "pending"),  # type: ignore[arg-type]
        ).sealed()
        for v in range(5)
    ]  # fmt: skip
    rejected = load_prompt_set(None).model
    from comeapi.cache.key import prompt_key

    out += [
        Entry(
            key=prompt_key(REJECTED_ONLY, rejected), variant=v, kind="prompt",
            prompt=REJECTED_ONLY, answer="never served", model=rejected, state="rejected",
        ).sealed()
        for v in range(5)
    ]  # fmt: skip
    return out


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    missing = nginx_missing()
    if missing:
        pytest.fail(missing)
    # Not under pytest's tmp_path: nginx's worker user must reach the cache directory.
    base = Path(tempfile.mkdtemp(prefix="comeapi-nginx-review-"))
    base.chmod(0o755)
    prompts = base / "prompts.yaml"
    prompts.write_text(PROMPTS)
    item = load_prompt_set(prompts).items[0]
    with SqliteStore(base / "store.db") as db:
        db.put_many(entries(item))
    secret = secrets.token_hex(16)
    port = free_port()
    store = f"sqlite:{base / 'store.db'}"
    argv = comeapi_argv(
        "serve", "--port", str(port), "--store", store, "--variant-secret", secret,
        "--on-miss", "reject", "--cache-refresh", "0.2",
    )  # fmt: skip
    comeapi = Proc(argv, base / "gateway.log")
    # The raw-body layer re-asks the canonical cache after RAW_VALID: a purge reaches the
    # public listener within that time.
    nginx = Nginx(
        base / "nginx",
        base / "cache",
        f"127.0.0.1:{port}",
        secret,
        env={"NGINX_RAW_CACHE_VALID": f"{RAW_VALID}s"},
    )
    client = httpx.Client(timeout=30.0)
    try:
        comeapi.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        nginx.start()
        yield Stack(base, store, prompts, item, comeapi, nginx, client)
    finally:
        client.close()
        nginx.stop()
        comeapi.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_rejected_variants_are_never_served_and_a_later_rejection_is_purged(
    stack: Stack,
) -> None:
    warmup = run_warmup(stack.nginx.warmup_url, stack.prompts, "--verify")
    out = warmup.stdout
    assert warmup.returncode == 0, out + warmup.stderr + stack.nginx.error_log()
    assert "5 requests" in out and "2 slots hold a served variant in place of theirs" in out
    assert "variant 1 prompts[0] Write a short poem about the sea: (holds variant 2" in out, out
    assert "verify: 5 requests: 5 HIT" in out
    assert count_entries(stack.nginx.cache_dir) == 5
    served = stack.public()
    assert set(served) == {0, 2, 4} and set().union(*served.values()) == {"HIT"}

    # Variant 2 is rejected after nginx stored it: comeapi stops serving it at once, nginx
    # still has it in two slots (its own and the stand-in for slot 1).
    result = stack.cli("reject", "--prompt", stack.item.prompt, "--variant", "2")
    assert result.returncode == 0, result.stderr
    assert f"make cache-purge KEYS={stack.item.key}" in result.stdout
    assert 2 in stack.public(), "nginx kept serving what it stored, as expected before a purge"

    purged = run_cache_sh(
        "purge", "--dir", str(stack.nginx.cache_dir), "--key", stack.item.key,
    )  # fmt: skip
    assert purged.returncode == 0, purged.stderr
    assert "purged 5 cache entries of 1 prompt(s)" in purged.stdout
    assert count_entries(stack.nginx.cache_dir) == 0
    # nginx kept running; once its raw-body layer has asked the canonical cache again, the
    # next requests are misses comeapi answers with served variants.
    time.sleep(RAW_VALID + 0.5)
    stack.public()  # the background refresh of each raw entry starts here
    # Stale entries are served while their refresh runs (0.5 s was not always enough on a
    # loaded CI machine): wait for it, up to a deadline.
    deadline = time.monotonic() + 20
    served = stack.public()
    while set(served) != {0, 4} and time.monotonic() < deadline:
        time.sleep(0.5)
        served = stack.public()
    assert set(served) == {0, 4}
    # Refilled through comeapi with served variants only.
    assert count_entries(stack.nginx.cache_dir) > 0
    warmup = run_warmup(stack.nginx.warmup_url, stack.prompts, "--verify")
    assert warmup.returncode == 0, warmup.stdout + warmup.stderr
    assert set(stack.public()) == {0, 4}


def test_a_prompt_with_nothing_served_is_never_stored(stack: Stack) -> None:
    before = count_entries(stack.nginx.cache_dir)
    for url in (stack.nginx.url, stack.nginx.warmup_url):
        for slot in range(5):
            r = stack.client.post(
                url + "/generate",
                json={"prompt": REJECTED_ONLY},
                headers={"X-Comeapi-Variant": str(slot)},
            )
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "prompt_not_cached"
            assert REJECTED_ONLY not in r.json()["error"]["known_prompts"]
    assert count_entries(stack.nginx.cache_dir) == before


def test_purge_refuses_what_is_not_a_key(stack: Stack) -> None:
    for args in ([], ["--key", "not-a-key"], ["--key", "A" * 64]):
        result = run_cache_sh("purge", "--dir", str(stack.nginx.cache_dir), *args)
        assert result.returncode == 1, result.stdout
        assert "cache key" in result.stderr


def test_the_review_api_passes_through_nginx_uncached(stack: Stack) -> None:
    r = stack.client.get(stack.nginx.url + "/cache/answers")
    assert r.status_code == 200, r.text
    answers = r.json()["answers"]
    assert {(a["prompt"], a["variant"]): a["state"] for a in answers}[
        (stack.item.prompt, 1)
    ] == "rejected"
    assert "x-cache-status" not in r.headers
    assert json.loads(r.text)["serve_states"] == ["approved", "pending"]
