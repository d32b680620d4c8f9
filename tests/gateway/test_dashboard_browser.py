"""/dashboard in a real headless Chromium, against a gateway with API keys in front of two
real ``comeapi backend`` processes (the bundled model, few tokens) and the shipped cache:
the key prompt comes first and no data before the key; then the page shows the backends,
the hits per prompt x variant and the requests as they were made."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By

from comeapi.cache.default import shipped_cache_path
from comeapi.cache.prompts import load_prompt_set
from tests.chromium import Browser, headless_chromium
from tests.gateway.test_balancer_e2e import Node, Spawn, start_backend, start_gateway
from tests.helpers import comeapi_argv

pytestmark = pytest.mark.slow

KEY = "dashboard-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MARKUP = '<img src=x onerror="document.title=1">'
#: Set to a path (docs/dashboard.png) to keep the screenshot the test takes.
SCREENSHOT_ENV = "COMEAPI_DASHBOARD_SCREENSHOT"


def wait_backends(gateway: Node, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = httpx.get(gateway.url + "/status", headers=AUTH, timeout=2).json()
        except httpx.HTTPError:
            status = {}
        if status.get("healthy_backends") == count:
            return
        assert gateway.proc.popen.poll() is None, gateway.proc.log()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"not {count} healthy backends: {status}")


def drive_traffic(url: str) -> dict[str, Any]:
    """Hits of several variants, misses (one streamed), errors; what each answered."""
    items = load_prompt_set().items
    prompt = next(item for item in items if item.messages is None)
    chat = next(item for item in items if item.messages is not None)
    hits: list[int] = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        # A path made to be markup: the page must show it as text.
        assert client.get("/" + MARKUP).status_code == 404
        for _ in range(20):
            response = client.post("/generate", json={"prompt": prompt.prompt})
            assert response.headers["x-cache"] == "HIT", response.text
            hits.append(int(response.headers["x-cache-variant"]))
        assert chat.messages is not None
        messages = [{"role": r, "content": c} for r, c in chat.messages]
        for _ in range(3):
            response = client.post("/v1/chat/completions", json={"messages": messages})
            assert response.headers["x-cache"] == "HIT"
        misses = []
        for text in ("Count to three:", "The capital of France is"):
            response = client.post("/generate", json={"prompt": text, "max_tokens": 3})
            assert response.status_code == 200 and response.headers["x-cache"] == "MISS"
            misses.append(response.json())
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 3, "stream": True}
        ) as stream:
            assert stream.headers["x-cache"] == "MISS"
            stream.read()
        # A stream is recorded once its relay has finished, which may be just after the
        # client has the last byte: wait, so the table's order is the order made here.
        wait_recorded(client, "/v1/completions")
        bad = client.post("/v1/completions", json={"prompt": 12})
        assert bad.status_code == 400
    unauthorized = httpx.post(url + "/generate", json={"prompt": prompt.prompt}, timeout=10)
    assert unauthorized.status_code == 401
    return {"prompt": prompt.prompt, "hits": hits, "misses": misses}


def wait_recorded(client: httpx.Client, path: str, timeout: float = 30.0) -> None:
    """Until the newest record is a request to ``path``."""
    deadline = time.monotonic() + timeout
    while (
        client.get("/dashboard/data", params={"rows": 1}).json()["requests"]["recent"][0]["path"]
        != path
    ):
        assert time.monotonic() < deadline, f"no record of {path}"
        time.sleep(0.05)


def table_rows(browser: Browser, table: str) -> list[dict[str, Any]]:
    """Each row of ``#table``'s body: its data attributes and its cells' text."""
    rows = browser.script(
        f"""return [...document.querySelectorAll('#{table} tbody tr')].map(tr => ({{
            data: {{...tr.dataset}},
            cells: [...tr.cells].map(td => td.textContent),
            variants: Object.fromEntries([...tr.querySelectorAll('td[data-variant]')]
                .map(td => [td.dataset.variant, td.textContent])),
        }}))"""
    )
    assert isinstance(rows, list)
    return rows


def test_dashboard_shows_the_gateway_after_the_key(
    spawn: Spawn, model_dir: Path, tmp_path: Path
) -> None:
    store = f"sqlite:{tmp_path / 'store.db'}"
    subprocess.run(
        comeapi_argv("cache", "import", "--store", store, str(shipped_cache_path())),
        check=True,
        capture_output=True,
        timeout=120,
    )
    backends = [start_backend(spawn, model_dir) for _ in range(2)]
    gateway = start_gateway(
        spawn, backends, "--store", store, "--api-key", KEY, "--access-log", "json"
    )
    wait_backends(gateway, 2)
    made = drive_traffic(gateway.url)

    with headless_chromium(tmp_path / "profile") as browser:
        driver = browser.driver
        driver.get(gateway.url + "/dashboard")
        key_form = driver.find_element(By.ID, "key-form")
        browser.wait_for(key_form.is_displayed, what="the key prompt")
        # Nothing of the gateway's is on the page before the key.
        assert not driver.find_element(By.ID, "main").is_displayed()
        assert table_rows(browser, "backends") == table_rows(browser, "requests") == []
        assert not any(b.url in driver.page_source for b in backends)

        driver.find_element(By.ID, "key").send_keys("not-the-key")
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        error = driver.find_element(By.ID, "key-error")
        browser.wait_for(lambda: error.is_displayed() and "refused" in error.text, what="refusal")
        assert table_rows(browser, "requests") == []

        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        browser.wait_for(driver.find_element(By.ID, "main").is_displayed, what="the dashboard")
        assert KEY not in driver.current_url
        browser.wait_for(lambda: len(table_rows(browser, "backends")) == 2, what="backend rows")

        check_backends(browser, backends)
        check_hits(browser, made)
        check_requests(browser, made, backends)
        tokens = driver.find_element(By.ID, "tokens-total").text
        assert int(tokens.split()[0]) >= 9, tokens  # 3 misses of up to 3 tokens each

        browser.wait_for(lambda: driver.find_element(By.ID, "rps").text != "–", what="a rate")
        driver.set_window_size(1200, 1400)
        screenshot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get(SCREENSHOT_ENV):
            driver.save_screenshot(os.environ[SCREENSHOT_ENV])
        assert screenshot.stat().st_size > 10_000

        # A narrow window: the page itself never scrolls sideways (tables scroll in place).
        driver.set_window_size(400, 900)
        browser.wait_for(lambda: browser.script("return window.innerWidth") <= 400, what="resize")
        overflow = browser.script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow == 0

    check_access_log(gateway, made)


def check_backends(browser: Browser, backends: list[Node]) -> None:
    rows = table_rows(browser, "backends")
    assert {row["data"]["url"] for row in rows} == {b.url for b in backends}
    for row in rows:
        assert row["data"]["healthy"] == "true"
        _, state, slots, _, latency, failures, restarts, _, models = row["cells"]
        assert state == "healthy" and slots == "0 / 1"
        assert latency.endswith("ms") and failures.isdigit() and restarts == "0"
        assert "gemma-3-270m-q4_k_m.gguf" in models


def check_hits(browser: Browser, made: dict[str, Any]) -> None:
    expected = Counter(made["hits"])
    assert len(expected) >= 2, "20 random picks of 5 should reach several variants"
    [row] = [r for r in table_rows(browser, "cache-hits") if r["cells"][0] == made["prompt"]]
    assert row["variants"] == {str(v): str(expected[v]) for v in range(5)}
    assert row["cells"][-1] == "20"


def check_requests(browser: Browser, made: dict[str, Any], backends: list[Node]) -> None:
    rows = table_rows(browser, "requests")
    kept = [(r["data"]["path"], r["data"]["cache"], r["data"]["status"]) for r in rows]
    # Newest first: the 401, the 400, the streamed miss, two misses, 3 chat hits, 20 hits.
    assert kept[:28] == [
        ("/generate", "", "401"),
        ("/v1/completions", "", "400"),
        ("/v1/completions", "MISS", "200"),
        *[("/generate", "MISS", "200")] * 2,
        *[("/v1/chat/completions", "HIT", "200")] * 3,
        *[("/generate", "HIT", "200")] * 20,
    ]
    columns = ("time", "request", "model", "status", "cache", "variant", "backend", "duration")
    cells = [dict(zip((*columns, "tokens"), r["cells"], strict=False)) for r in rows[:28]]
    hit_variants = [int(c["variant"]) for c in cells[8:28]]
    assert hit_variants == made["hits"][::-1]
    stream, *plain = cells[2:5]  # misses: a backend answered, and its tokens are shown
    assert {c["backend"] for c in cells[2:5]} <= {b.url for b in backends}
    assert re.fullmatch(r"\? → [1-3]", stream["tokens"]), stream
    for c, answer in zip(plain, made["misses"][::-1], strict=True):
        usage = answer["usage"]
        assert c["tokens"] == f"{usage['prompt_tokens']} → {usage['completion_tokens']}"
    for c in cells[5:28]:  # hits: the shipped answers' model
        assert c["backend"] == "–" and c["model"] == load_prompt_set().model
        assert c["duration"].endswith("ms")
    markup = rows[28]
    assert markup["data"]["path"] == "/" + MARKUP and markup["cells"][1] == "GET /" + MARKUP
    assert browser.script("return document.querySelectorAll('#requests img').length") == 0
    assert browser.driver.title == "comeapi dashboard"


def check_access_log(gateway: Node, made: dict[str, Any]) -> None:
    lines = [json.loads(line) for line in gateway.proc.log().splitlines() if line.startswith("{")]
    generation = [line for line in lines if line["path"] != "/status"]
    hits = [line for line in generation if line["cache"] == "HIT" and line["path"] == "/generate"]
    assert [line["variant"] for line in hits] == made["hits"]
    polls = [line["status"] for line in lines if line["path"] == "/dashboard/data"]
    assert polls.count(401) >= 2  # the page's first poll (no key), then the wrong key
    assert not any(KEY in json.dumps(line) for line in lines)
