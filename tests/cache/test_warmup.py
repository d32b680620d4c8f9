"""Warmup: the dispatch logic against mock backends, then the real thing (bundled model,
real backend process): exactly N per prompt, and a SIGKILLed run resumed without loss."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from comeapi.cache.checks import check_answer, failing
from comeapi.cache.prompts import DEFAULT_MODEL, PromptSet, parse_prompt_set
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry, ResponseStore
from comeapi.cache.warmup import CHECK_RETRIES, RESEED_STRIDE, run_warmup
from comeapi.errors import StoreError, UnavailableError
from tests.helpers import BUNDLED_MODEL, Proc, comeapi_argv, free_port

SET = """
max_tokens: 4
prompts:
  - prompt: "Once upon a time"
  - messages:
      - {role: user, content: "こんにちは"}
"""


def prompt_set(text: str = SET) -> PromptSet:
    return parse_prompt_set(text, "test.yaml")


class FakeBackends:
    """Backends behind httpx.MockTransport: /health with ``capacity``, OpenAI answers."""

    def __init__(self, capacities: dict[str, int | None], delay: float = 0.02):
        self.capacities = capacities
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.requests: list[tuple[str, dict[str, Any], httpx.Headers]] = []
        self.fail: Callable[[str, dict[str, Any]], httpx.Response | None] = lambda u, b: None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == "/health":
            capacity = self.capacities[base]
            doc: dict[str, Any] = {"status": "ok"}
            if capacity is not None:
                doc["capacity"] = capacity
            return httpx.Response(200, json=doc)
        body = json.loads(request.content)
        self.requests.append((base, body, request.headers))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        failure = self.fail(base, body)
        if failure is not None:
            return failure
        text = answer_text(body)
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        if request.url.path == "/v1/chat/completions":
            choice = {"message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        else:
            choice = {"text": text, "finish_reason": "length"}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})


def answer_text(body: dict[str, Any]) -> str:
    """What the fake backends answer: a sentence in the prompt's language (passes the
    checks)."""
    asked = body.get("prompt") or body["messages"][-1]["content"]
    if any("\u3040" <= ch <= "\u30ff" for ch in asked):
        return f"答えは{body['seed']}です。"
    return f"Answer seed {body['seed']}."


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    with SqliteStore(tmp_path / "w.db") as s:
        yield s


def warm(store: ResponseStore, backends: FakeBackends, urls: list[str], **kwargs: Any) -> Any:
    kwargs.setdefault("variants", 3)
    return asyncio.run(
        run_warmup(
            kwargs.pop("prompts", prompt_set()),
            store,
            urls,
            transport=httpx.MockTransport(backends),
            **kwargs,
        )
    )


def test_fills_every_variant_with_seed_params_and_usage(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 1})
    report = warm(store, fake, ["http://a:1"])
    assert report.ok
    assert report.totals() == {
        "present": 0,
        "generated": 6,
        "failed": 0,
        "regenerated": 0,
        "flagged": 0,
    }
    index = store.load_index()
    assert sorted(len(v) for v in index.values()) == [3, 3]
    for group in index.values():
        for e in group:
            assert e.answer == answer_text({**request_of(e), "seed": e.variant})
            assert e.flags == () and e.state == "pending"
            assert e.params == {
                "max_tokens": 4,
                "temperature": 0.8,
                "top_k": 40,
                "top_p": 0.9,
                "seed": e.variant,
            }
            assert (e.prompt_tokens, e.completion_tokens, e.finish_reason) == (3, 4, "length")
            assert e.model == DEFAULT_MODEL  # the set names none
    for _, _body, headers in fake.requests:
        assert headers["cache-control"] == "no-cache"
    chat = [b for _, b, _ in fake.requests if "messages" in b]
    assert len(chat) == 3
    assert chat[0]["messages"] == [{"role": "user", "content": "こんにちは"}]


def test_keyed_backends_get_the_key(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 1})
    assert warm(store, fake, ["http://a:1"], api_key="backend-key").ok
    assert fake.requests
    for _, _body, headers in fake.requests:
        assert headers["authorization"] == "Bearer backend-key"


def test_a_rerun_fills_only_what_is_missing(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 1})
    warm(store, fake, ["http://a:1"], variants=2)
    before = {(e.key, e.variant): e for e in store.entries()}
    fake.requests.clear()
    report = warm(store, fake, ["http://a:1"], variants=3)
    assert report.totals() == {
        "present": 4,
        "generated": 2,
        "failed": 0,
        "regenerated": 0,
        "flagged": 0,
    }
    assert sorted(b["seed"] for _, b, _ in fake.requests) == [2, 2]
    after = {(e.key, e.variant): e for e in store.entries()}
    assert all(after[k] == e for k, e in before.items())  # untouched
    fake.requests.clear()
    report = warm(store, fake, ["http://a:1"], variants=3)
    assert report.ok and report.totals()["generated"] == 0 and fake.requests == []
    report = warm(store, fake, ["http://a:1"], variants=2, force=True)
    assert report.totals()["generated"] == 4
    assert [row.extra for row in report.rows] == [1, 1]  # variant 2 kept, reported


def test_concurrency_is_the_pools_capacity(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 2, "http://b:2": 1}, delay=0.1)
    report = warm(store, fake, ["http://a:1", "http://b:2"])
    assert report.concurrency == 3
    assert fake.peak == 3
    per_url = {
        u: sum(1 for b, _, _ in fake.requests if b == u) for u in ("http://a:1", "http://b:2")
    }
    assert per_url["http://a:1"] > per_url["http://b:2"] > 0


def test_without_capacity_the_default_or_flag_applies(store: SqliteStore) -> None:
    fake = FakeBackends({"http://gw:9": None}, delay=0.1)
    assert warm(store, fake, ["http://gw:9"]).concurrency == 2
    assert fake.peak == 2
    fake = FakeBackends({"http://gw:9": None}, delay=0.1)
    report = warm(store, fake, ["http://gw:9"], variants=6, concurrency=4)
    assert report.concurrency == 4 and fake.peak == 4


def test_busy_backends_are_waited_for(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 1})
    busy = {"left": 2}

    def fail(url: str, body: dict[str, Any]) -> httpx.Response | None:
        if busy["left"]:
            busy["left"] -= 1
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": {}})
        return None

    fake.fail = fail
    report = warm(store, fake, ["http://a:1"], variants=1)
    assert report.ok


def test_failures_are_reported_and_the_rest_is_kept(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 1, "http://b:2": 1})

    def fail(url: str, body: dict[str, Any]) -> httpx.Response | None:
        if "messages" in body and body["seed"] == 1:
            return httpx.Response(500, json={"error": {"message": "llama exploded"}})
        if "prompt" in body and body["seed"] == 2:
            return httpx.Response(200, json={"choices": []})
        return None

    fake.fail = fail
    report = warm(store, fake, ["http://a:1", "http://b:2"])
    assert not report.ok
    totals = report.totals()
    assert (totals["present"], totals["generated"], totals["failed"]) == (0, 4, 2)
    assert [r.complete for r in report.rows] == [False, False]
    text = "\n".join(report.failures)
    assert "prompts[1] variant 1" in text and "llama exploded" in text
    assert "prompts[0] variant 2" in text and "malformed answer" in text
    assert len(list(store.entries())) == 4


def test_no_ready_backend_is_a_clear_error(store: SqliteStore) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        if request.url.host == "loading":
            return httpx.Response(503, json={"status": "loading"})
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(UnavailableError, match="no backend is ready") as info:
        asyncio.run(
            run_warmup(
                prompt_set(),
                store,
                ["http://down:1", "http://loading:2"],
                variants=1,
                wait=0,
                transport=httpx.MockTransport(down),
            )
        )
    message = info.value.message
    assert "http://down:1: nothing listens there" in message
    assert "http://loading:2: still loading its model" in message
    assert store.is_empty()


def test_a_store_that_cannot_write_stops_the_run(tmp_path: Path) -> None:
    class Broken(SqliteStore):
        def _put_many(self, entries: list[Entry]) -> int:
            raise StoreError("disk on fire")

    fake = FakeBackends({"http://a:1": 1})
    with Broken(tmp_path / "b.db") as broken, pytest.raises(StoreError, match="disk on fire"):
        warm(broken, fake, ["http://a:1"], variants=5)
    assert len(fake.requests) == 1  # not 10 generations thrown away


# --- the real thing: the bundled model in a real backend ---------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    proc = Proc(comeapi_argv("backend", "--port", str(port), "--model-dir", str(model_dir)), log)
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{url}/health", timeout=120)
        yield url
    finally:
        proc.stop()


def on_gemma(text: str) -> str:
    """A prompt set for the real backend below, which holds Gemma 3 270M only (the default
    model, SmolLM2, would be a 404 there)."""
    return f"model: {BUNDLED_MODEL}\n" + text


def assert_checked(entry: Entry, log: str) -> None:
    """The entry's flags are what the checks say of its text, and its seed says how many
    tries the checks rejected (listed in warmup's report)."""
    flags = check_answer(
        entry.answer,
        kind=entry.kind,
        prompt=entry.prompt,
        messages=entry.messages,
        finish_reason=entry.finish_reason,
    )
    assert entry.flags == flags
    seed = entry.params["seed"]
    assert seed % RESEED_STRIDE == entry.variant
    tries = seed // RESEED_STRIDE
    assert tries <= CHECK_RETRIES
    if failing(flags):
        assert tries == CHECK_RETRIES or not tries  # kept only when every try failed
    said = " ".join(log.split())
    if tries:
        assert re.search(rf"regenerated: prompts\[\d\] variant {entry.variant}: seed", said)


def _warmup_argv(prompts: Path, db: Path, url: str, *extra: str) -> list[str]:
    return comeapi_argv(
        "warmup", "--prompts", str(prompts), "--store", f"sqlite:{db}", "--url", url, *extra
    )


@pytest.mark.slow
def test_real_warmup_fills_exactly_n_per_prompt(
    backend: str, tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(on_gemma(SET) + "variants: 3\n", encoding="utf-8")
    db = tmp_path / "cache.db"
    first = spawn(_warmup_argv(prompts, db, backend), name="warmup")
    assert first.popen.wait(240) == 0, first.log()
    said = " ".join(first.log().split())
    assert re.search(r"6 generated \(.*\), 0 already present, 0 failed", said)
    with SqliteStore(db) as store:
        index = store.load_index()
    assert {k: [e.variant for e in g] for k, g in index.items()} == {
        item.key: [0, 1, 2] for item in prompt_set(on_gemma(SET)).items
    }
    for group in index.values():
        for e in group:
            assert e.answer and e.completion_tokens <= 4
            assert_checked(e, first.log())
    again = spawn(_warmup_argv(prompts, db, backend), name="again")
    assert again.popen.wait(120) == 0, again.log()
    assert (
        "0 generated (0 rejected tries generated again, 0 kept with flags), 6 already "
        in " ".join(again.log().split())
    )
    with SqliteStore(db) as store:
        assert store.load_index() == index
    # seed = variant: generating variant 0 again gives the same answers.
    forced = spawn(_warmup_argv(prompts, db, backend, "--force", "--variants", "1"), name="force")
    assert forced.popen.wait(120) == 0, forced.log()
    with SqliteStore(db) as store:
        regenerated = store.load_index()
    for key, group in index.items():
        assert regenerated[key][0].created > group[0].created
        assert regenerated[key][0].answer == group[0].answer
        assert regenerated[key][0].params == group[0].params  # the same seeds were tried
        assert [h["why"] for h in regenerated[key][0].history] == ["regenerate"]
        assert regenerated[key][1:] == group[1:]


KILL_SET = """
max_tokens: 24
variants: 3
prompts:
  - prompt: "Once upon a time in a magical forest,"
  - messages:
      - {role: user, content: "おすすめの朝ごはんを教えてください。"}
"""


@pytest.mark.slow
def test_real_warmup_killed_mid_run_resumes_to_exactly_n(
    backend: str, tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(on_gemma(KILL_SET), encoding="utf-8")
    db = tmp_path / "cache.db"
    SqliteStore(db).close()
    victim = spawn(_warmup_argv(prompts, db, backend, "--concurrency", "1"), name="victim")
    with SqliteStore(db) as store:
        deadline = time.monotonic() + 180
        while store.is_empty() and time.monotonic() < deadline:
            assert victim.popen.poll() is None, victim.log()
            time.sleep(0.01)
        os.killpg(victim.pid, signal.SIGKILL)
        assert victim.popen.wait(10) == -signal.SIGKILL
        survivors = {(e.key, e.variant): e for g in store.load_index().values() for e in g}
    assert 1 <= len(survivors) < 6, "the kill did not land mid-run"
    resumed = spawn(_warmup_argv(prompts, db, backend), name="resumed")
    assert resumed.popen.wait(240) == 0, resumed.log()
    said = " ".join(resumed.log().split())
    assert re.search(
        rf"{6 - len(survivors)} generated \(.*\), {len(survivors)} already present", said
    )
    with SqliteStore(db) as store:
        index = store.load_index()  # verifies every checksum
    assert sorted([e.variant for e in g] for g in index.values()) == [[0, 1, 2], [0, 1, 2]]
    flat = {(e.key, e.variant): e for g in index.values() for e in g}
    assert all(flat[k] == e for k, e in survivors.items())  # nothing written was redone


def test_cli_exits_non_zero_when_no_backend_answers(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(SET, encoding="utf-8")
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [*_warmup_argv(prompts, tmp_path / "c.db", url), "--wait", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 1
    assert "no backend is ready" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_fails_fast_when_nothing_listens(tmp_path: Path) -> None:
    """Fault: with nothing listening, warmup printed nothing for 120 s, then failed."""
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(SET, encoding="utf-8")
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        _warmup_argv(prompts, tmp_path / "c.db", url),  # the default --wait of 120 s
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    assert f"{url}: nothing listens there" in done.stderr
    assert "comeapi up" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_what_warmup_waits_for_is_said(store: SqliteStore) -> None:
    calls = 0

    def loading_then_ready(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        if request.url.path == "/health":
            calls += 1
            if calls <= 2:
                return httpx.Response(503, json={"status": "loading"})
            return httpx.Response(200, json={"status": "ok", "capacity": 1})
        body = json.loads(request.content)
        choice = {"text": f"answer {body['seed']}", "finish_reason": "length"}
        return httpx.Response(200, json={"choices": [choice], "usage": {}})

    waits: list[tuple[str, str]] = []
    report = asyncio.run(
        run_warmup(
            prompt_set("prompts: [Hello]\n"),
            store,
            ["http://slow:1"],
            variants=1,
            wait=30,
            on_wait=lambda url, why: waits.append((url, why)),
            transport=httpx.MockTransport(loading_then_ready),
        )
    )
    assert report.ok
    assert waits == [("http://slow:1", "still loading its model")]  # said once, not per poll


def test_cli_targets_come_from_backends_range(tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run(
        comeapi_argv(
            "warmup",
            "--store",
            f"sqlite:{tmp_path / 'c.db'}",
            "--wait",
            "0",
            "--backends",
            f"127.0.0.1:{port}:2",
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    flat = " ".join(done.stderr.split())
    assert f"http://127.0.0.1:{port}: nothing listens there" in flat
    assert f"http://127.0.0.1:{port + 1}: nothing listens there" in flat


def request_of(entry: Entry) -> dict[str, Any]:
    if entry.messages is not None:
        return {"messages": [{"role": r, "content": c} for r, c in entry.messages]}
    return {"prompt": entry.prompt}


ONE_PROMPT = SET.split("  - messages")[0]


def test_a_rejected_answer_is_generated_again_with_a_further_seed(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 1})
    bad = {  # seed -> answer: variant 1 fails twice, then passes
        1: "The sea<start_of_image> is wide.",
        1
        + RESEED_STRIDE: "Once upon a time, once upon a time, once upon a time, once upon a time.",
        2: " \n\u3000",
    }

    def answer(base: str, body: dict[str, Any]) -> httpx.Response | None:
        if body["seed"] in bad:
            choice = {"text": bad[body["seed"]], "finish_reason": "stop"}
            return httpx.Response(200, json={"choices": [choice], "usage": {}})
        return None

    fake.fail = answer
    report = warm(store, fake, ["http://a:1"], prompts=prompt_set(ONE_PROMPT))
    assert report.ok
    [row] = report.rows
    assert {v: [(r.seed, r.flags) for r in tries] for v, tries in row.rejected.items()} == {
        1: [(1, ("special_token",)), (1 + RESEED_STRIDE, ("echo", "loop"))],
        2: [(2, ("empty",))],
    }
    assert report.totals()["regenerated"] == 3 and report.totals()["flagged"] == 0
    group = next(iter(store.load_index().values()))
    assert [e.params["seed"] for e in group] == [0, 1 + 2 * RESEED_STRIDE, 2 + RESEED_STRIDE]
    assert all(e.flags == () for e in group)
    assert group[1].answer == f"Answer seed {1 + 2 * RESEED_STRIDE}."


def test_when_every_try_is_rejected_the_best_is_kept_flagged(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 1})

    def answer(base: str, body: dict[str, Any]) -> httpx.Response | None:
        if body["seed"] % RESEED_STRIDE != 0:
            return None
        # variant 0: a loop with markup first, then only a loop, then markup again
        text = {0: "<b>Sea</b> " * 8, RESEED_STRIDE: "Sea sea. " * 8}.get(body["seed"], "<b>x</b>")
        choice = {"text": text, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice], "usage": {}})

    fake.fail = answer
    report = warm(store, fake, ["http://a:1"], prompts=prompt_set(ONE_PROMPT), retries=2)
    assert report.ok  # every variant is stored: flagged, not missing
    [row] = report.rows
    assert row.flagged == {0: ("loop",)}
    assert [r.seed for r in row.rejected[0]] == [0, RESEED_STRIDE, 2 * RESEED_STRIDE]
    kept = store.get(row.item.key, 0)
    assert kept is not None
    assert kept.flags == ("loop",) and kept.params["seed"] == RESEED_STRIDE
    assert kept.state == "pending"


def test_the_policy_decides_what_is_regenerated(store: SqliteStore) -> None:
    fake = FakeBackends({"http://a:1": 1})

    def cut(base: str, body: dict[str, Any]) -> httpx.Response | None:
        if body["seed"] == 0:
            choice = {"text": "It was a dark and", "finish_reason": "length"}
            return httpx.Response(200, json={"choices": [choice], "usage": {}})
        return None

    fake.fail = cut
    one = prompt_set(ONE_PROMPT)
    report = warm(store, fake, ["http://a:1"], prompts=one, variants=1)
    assert report.rows[0].flagged == {0: ("truncated",)}  # by default truncated only flags
    strict = one.policy(["truncated=reject"])
    report = warm(store, fake, ["http://a:1"], prompts=one, variants=1, force=True, policy=strict)
    assert report.rows[0].flagged == {}
    entry = store.get(one.items[0].key, 0)
    assert entry is not None and entry.params["seed"] == RESEED_STRIDE
    # the forced run kept the replaced text in the entry's history
    assert [h["answer"] for h in entry.history] == ["It was a dark and"]
    assert entry.history[0]["why"] == "regenerate"


def test_force_leaves_pinned_variants_alone(store: SqliteStore) -> None:

    fake = FakeBackends({"http://a:1": 1})
    one = prompt_set(ONE_PROMPT)
    warm(store, fake, ["http://a:1"], prompts=one, variants=2)
    pinned = store.get(one.items[0].key, 1)
    assert pinned is not None
    store.put(replace(pinned, pinned=True, state="approved", checksum=""))
    fake.requests.clear()
    report = warm(store, fake, ["http://a:1"], prompts=one, variants=2, force=True)
    assert [b["seed"] for _, b, _ in fake.requests] == [0]
    assert report.rows[0].pinned == 1
    after = store.get(one.items[0].key, 1)
    assert after is not None and after.pinned and after.history == ()


def test_generate_variant_for_one_entry() -> None:
    """The public coroutine that `comeapi cache regenerate` uses: an entry's prompt item,
    a new seed, the checks run (the first try is rejected, the second kept)."""
    from comeapi.cache.warmup import generate_variant, prompt_item

    fake = FakeBackends({"http://a:1": 1})

    def first_empty(base: str, body: dict[str, Any]) -> httpx.Response | None:
        if body["seed"] == 77:
            choice = {"message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}
            return httpx.Response(200, json={"choices": [choice], "usage": {}})
        return None

    fake.fail = first_empty
    item = prompt_set().items[1]  # the chat
    old = Entry(
        item.key, 3, "chat", item.prompt, "old", item.model, item.messages,
        {**item.params, "seed": 3},
    ).sealed()  # fmt: skip
    rebuilt = prompt_item(old)
    assert (rebuilt.key, rebuilt.messages, rebuilt.params) == (item.key, item.messages, item.params)

    async def run() -> Entry:
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
            return await generate_variant(rebuilt, 3, 77, ["http://a:1"], client=client)

    fresh = asyncio.run(run())
    assert fresh.variant == 3 and fresh.key == item.key
    assert fresh.params == {**item.params, "seed": 77 + RESEED_STRIDE}
    assert fresh.answer == f"答えは{77 + RESEED_STRIDE}です。" and fresh.flags == ()
    fresh.verify()
    assert [b["seed"] for _, b, _ in fake.requests] == [77, 77 + RESEED_STRIDE]
