"""The dashboard's review page in a real headless Chromium, against `comeapi serve` with an
API key, serving approved answers only, over the shipped answers with their check flags: a
person approves, rejects, edits and pins; the store holds each change and the gateway serves
accordingly at once."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from comeapi.cache.checks import check_answer
from comeapi.cache.default import shipped_entries
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from tests.chromium import Browser, headless_chromium
from tests.helpers import Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow
T = TypeVar("T")

KEY = "review-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MARKUP = '<img src=x onerror="document.title=1">'
#: Set to a path (docs/review.png) to keep the screenshot the test takes.
SCREENSHOT_ENV = "COMEAPI_REVIEW_SCREENSHOT"


def checked(entries: list[Entry]) -> list[Entry]:
    """The shipped answers with the flags warmup gives them; one carries markup (the
    shipped answers pass every check: that one is flagged)."""
    entries = [replace(entries[0], answer=MARKUP + " " + entries[0].answer), *entries[1:]]
    out = []
    for e in entries:
        flags = check_answer(
            e.answer, kind=e.kind, prompt=e.prompt, messages=e.messages,
            finish_reason=e.finish_reason,
        )  # fmt: skip
        out.append(replace(e, flags=flags, checksum="").sealed())
    return out


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    db = tmp_path / "store.db"
    with SqliteStore(db) as store:
        store.put_many(checked(shipped_entries()))
    port = free_port()
    argv = comeapi_argv(
        "serve", "--port", str(port), "--store", f"sqlite:{db}", "--api-key", KEY,
        "--on-miss", "reject", "--serve-states", "approved",
    )  # fmt: skip
    proc = Proc(argv, tmp_path / "gateway.log")
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield f"http://127.0.0.1:{port}", db
    finally:
        proc.stop()


def stored(db: Path, prompt: str) -> dict[int, Entry]:
    with SqliteStore(db) as store:
        return {e.variant: e for e in store.entries() if e.prompt == prompt}


def served(url: str, entry: Entry, n: int = 40) -> dict[int | str, str]:
    """What the gateway answers ``entry``'s prompt with: variant -> text (or status)."""
    seen: dict[int | str, str] = {}
    route = "/v1/chat/completions" if entry.messages is not None else "/v1/completions"
    body: dict[str, Any] = (
        {"messages": [{"role": r, "content": c} for r, c in entry.messages]}
        if entry.messages is not None
        else {"prompt": entry.prompt}
    )
    with httpx.Client(base_url=url, headers=AUTH, timeout=10) as client:
        for _ in range(n):
            r = client.post(route, json=body)
            if r.status_code != 200:
                seen[r.status_code] = r.json()["error"]["code"]
                continue
            choice = r.json()["choices"][0]
            seen[int(r.headers["x-cache-variant"])] = (
                choice["message"]["content"] if entry.messages is not None else choice["text"]
            )
    return seen


def again(action: Callable[[], T]) -> T:
    """``action``, done again if the page redrew its rows meanwhile (a reload after a
    change replaces them)."""
    for _ in range(20):
        try:
            return action()
        except StaleElementReferenceException:
            time.sleep(0.1)
    return action()


def row(browser: Browser, key: str, variant: int) -> WebElement:
    return browser.driver.find_element(
        By.CSS_SELECTOR, f'tr.answer-row[data-key="{key}"][data-variant="{variant}"]'
    )


def click(browser: Browser, key: str, variant: int | None, action: str) -> None:
    if variant is None:
        selector = f'.review-prompt[data-key="{key}"] .review-head button[data-action="{action}"]'
        again(lambda: browser.driver.find_element(By.CSS_SELECTOR, selector).click())
    else:
        button = f'button[data-action="{action}"]'
        again(lambda: row(browser, key, variant).find_element(By.CSS_SELECTOR, button).click())


def row_text(browser: Browser, key: str, variant: int) -> str:
    return again(lambda: row(browser, key, variant).text)


def wait_state(browser: Browser, key: str, variant: int, state: str) -> None:
    browser.wait_for(
        lambda: again(lambda: row(browser, key, variant).get_attribute("data-state")) == state,
        what=f"variant {variant} of {key[:12]} {state}",
    )


def test_a_person_reviews_in_the_browser(gateway: tuple[str, Path], tmp_path: Path) -> None:
    url, db = gateway
    entries = shipped_entries()
    # English ones: the test machine's Chromium has no CJK fonts for the screenshot.
    prompt = next(e for e in entries if e.kind == "prompt" and e.variant == 0)
    chat = next(e for e in entries if e.kind == "chat" and e.variant == 0 and e.prompt.isascii())
    assert served(url, prompt, 3) == {404: "prompt_not_cached"}  # nothing approved yet

    with headless_chromium(tmp_path / "profile", height=1400) as browser:
        driver = browser.driver
        driver.get(url + "/dashboard")
        browser.wait_for(driver.find_element(By.ID, "key-form").is_displayed, what="key form")
        assert driver.find_elements(By.CSS_SELECTOR, "tr.answer-row") == []  # no data yet
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
        browser.wait_for(
            lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr.answer-row")) == 50,
            what="the 50 answers",
        )
        note = driver.find_element(By.ID, "review-note").text
        assert "50 answers of 10 prompts" in note and "0 served" in note
        # Answers are text, never markup.
        assert browser.script("return document.querySelectorAll('#review img').length") == 0
        assert MARKUP in driver.find_element(By.ID, "review-prompts").text

        # Approve one variant: it alone is served, at once.
        click(browser, prompt.key, 1, "approve")
        wait_state(browser, prompt.key, 1, "approved")
        assert stored(db, prompt.prompt)[1].state == "approved"
        assert set(served(url, prompt)) == {1}

        # Approve every variant of the chat, then reject one: never served again.
        click(browser, chat.key, None, "approve")
        for v in range(5):
            wait_state(browser, chat.key, v, "approved")
        click(browser, chat.key, 3, "reject")
        wait_state(browser, chat.key, 3, "rejected")
        assert {v: e.state for v, e in stored(db, chat.prompt).items()} == {
            0: "approved", 1: "approved", 2: "approved", 3: "rejected", 4: "approved",
        }  # fmt: skip
        assert set(served(url, chat, 60)) == {0, 1, 2, 4}

        # Edit variant 2 of the chat: the person's text is served, the old one kept.
        click(browser, chat.key, 2, "edit")
        editor = row(browser, chat.key, 2).find_element(By.CSS_SELECTOR, "textarea.editor")
        editor.clear()
        editor.send_keys(
            "I can answer questions, explain things step by step, and help you write short texts."
        )
        row(browser, chat.key, 2).find_element(
            By.CSS_SELECTOR, 'button[data-action="save"]'
        ).click()
        browser.wait_for(lambda: "edited" in row_text(browser, chat.key, 2), what="edited")
        edited = stored(db, chat.prompt)[2]
        assert edited.edited and edited.answer.startswith("I can answer questions")
        assert edited.history[0]["answer"] == chat_variant(entries, chat, 2).answer
        assert served(url, chat, 60)[2] == edited.answer

        # Pin it: only the pinned answer is served.
        click(browser, chat.key, 2, "pin")
        browser.wait_for(lambda: "pinned" in row_text(browser, chat.key, 2), what="pinned")
        assert stored(db, chat.prompt)[2].pinned
        assert set(served(url, chat)) == {2}

        # A conflict is shown, and changes nothing: a rejected answer cannot be pinned.
        click(browser, chat.key, 3, "pin")
        status = driver.find_element(By.ID, "review-status")
        browser.wait_for(lambda: "pin failed" in status.text, what="the refusal")
        assert "is rejected" in status.text
        assert not stored(db, chat.prompt)[3].pinned
        # Regenerate needs a backend; this gateway has none, and says so.
        click(browser, chat.key, 4, "regenerate")
        browser.wait_for(lambda: "regenerate failed" in status.text, what="no backend")
        assert "no healthy backend" in status.text
        assert stored(db, chat.prompt)[4].answer == chat_variant(entries, chat, 4).answer

        # The filter shows flagged answers only.
        with SqliteStore(db) as store:
            flagged = [e for e in store.entries() if e.flags]
        assert 0 < len(flagged) < 50
        select = driver.find_element(By.ID, "review-filter")
        select.find_element(By.CSS_SELECTOR, 'option[value="flagged"]').click()
        browser.wait_for(
            lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr.answer-row")) == len(flagged),
            what="only flagged answers",
        )
        select.find_element(By.CSS_SELECTOR, 'option[value="all"]').click()
        # The picture for docs/review.png: the chat just reviewed, under the page's controls.
        driver.execute_script(
            "const top = document.querySelector(arguments[0]).getBoundingClientRect().top;"
            "window.scrollBy(0, top - 140);",
            f'.review-prompt[data-key="{chat.key}"]',
        )
        screenshot = tmp_path / "review.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get(SCREENSHOT_ENV):
            driver.save_screenshot(os.environ[SCREENSHOT_ENV])
        assert screenshot.stat().st_size > 10_000

        # A narrow window: the page itself never scrolls sideways.
        driver.set_window_size(400, 900)
        browser.wait_for(lambda: browser.script("return window.innerWidth") <= 400, what="resize")
        overflow = browser.script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow == 0


def chat_variant(entries: list[Entry], chat: Entry, variant: int) -> Entry:
    return next(e for e in entries if e.key == chat.key and e.variant == variant)
