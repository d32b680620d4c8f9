"""The held-out set of the shipped prompts (tests/similar/heldout-shipped.yaml, never used for
calibration) sent to a real ``comeapi serve --match similar`` over the shipped default store,
as a client sends them: no false hit, no paraphrase answered as another prompt, and at least
the share of paraphrases docs/cache.md reports. Also what a similar hit looks like (headers,
streaming, never stored under the query's key) and what /status says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from comeapi.cache.prompts import PromptItem, load_prompt_set
from tests.helpers import Proc, comeapi_argv, free_port

pytestmark = pytest.mark.slow

HELDOUT = Path(__file__).with_name("heldout-shipped.yaml")
# Paraphrases of the held-out set answered as their prompt: 0.7 is issue 20's goal; what was
# measured is in docs/cache.md ("Matching by meaning").
MIN_SERVED = 0.7


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``comeapi serve --match similar`` on the default store (seeded from the shipped file,
    its calibration included: in a fresh XDG_DATA_HOME), no backends: a miss is a 404."""
    port = free_port()
    log = tmp_path_factory.mktemp("similar-gateway") / "gateway.log"
    proc = Proc(comeapi_argv("serve", "--port", str(port), "--match", "similar"), log)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/status", timeout=120)
        yield url
    finally:
        proc.stop()


def _send(url: str, item: PromptItem, text: str, **extra: Any) -> httpx.Response:
    if item.messages is None:
        return httpx.post(url + "/v1/completions", json={"prompt": text, **extra}, timeout=30)
    messages = [{"role": r, "content": c} for r, c in item.messages[:-1]]
    messages.append({"role": "user", "content": text})
    return httpx.post(
        url + "/v1/chat/completions", json={"messages": messages, **extra}, timeout=30
    )


def test_the_heldout_set_gets_no_false_hit(gateway: str) -> None:
    shipped = {item.key: item for item in load_prompt_set().items}
    heldout = load_prompt_set(HELDOUT)
    served = paraphrases = 0
    wrong: list[str] = []
    for held in heldout.items:
        item = shipped[held.key]  # the held-out set names the shipped prompts exactly
        for text in held.same:
            paraphrases += 1
            response = _send(gateway, item, text)
            if response.status_code == 404:
                continue
            assert response.status_code == 200, response.text
            answered_as = unquote(response.headers["x-cache-prompt"])
            if answered_as != item.prompt:
                wrong.append(f"{text!r} answered as {answered_as!r}, not {item.prompt!r}")
            served += 1
        for text in held.not_:
            response = _send(gateway, item, text)
            if response.status_code != 404:
                wrong.append(
                    f"{text!r} answered as {unquote(response.headers.get('x-cache-prompt', ''))!r}"
                )
    assert not wrong, wrong
    assert paraphrases >= 100
    assert served / paraphrases >= MIN_SERVED, f"{served}/{paraphrases} paraphrases served"


def test_a_similar_hit_is_the_prompts_answer_and_says_so(gateway: str) -> None:
    item = next(i for i in load_prompt_set().items if i.prompt == "What is the capital of Japan?")
    exact = _send(gateway, item, item.prompt)
    assert exact.headers["x-cache"] == "HIT" and exact.headers["x-cache-match"] == "exact"
    assert "x-comeapi-no-store" not in exact.headers
    similar = _send(gateway, item, "What's the capital city of Japan?")
    assert similar.status_code == 200, similar.text
    assert similar.headers["x-cache"] == "HIT" and similar.headers["x-cache-match"] == "similar"
    assert unquote(similar.headers["x-cache-prompt"]) == item.prompt
    assert 0.0 < float(similar.headers["x-cache-similarity"]) <= 1.0
    assert similar.headers["x-comeapi-no-store"] == "1"  # a proxy keeps it under no key
    answers = {
        _send(gateway, item, item.prompt).json()["choices"][0]["message"]["content"]
        for _ in range(30)
    }
    assert similar.json()["choices"][0]["message"]["content"] in answers

    stream = _send(gateway, item, "What's the capital city of Japan?", stream=True)
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["x-cache-match"] == "similar"
    assert stream.text.rstrip().endswith("data: [DONE]")


def test_status_shows_each_prompt_matched_by_meaning_and_the_similar_hits(gateway: str) -> None:
    item = next(i for i in load_prompt_set().items if i.prompt == "What is the capital of Japan?")
    _send(gateway, item, "日本の首都はどこ？")
    cache = httpx.get(gateway + "/status", timeout=10).json()["cache"]
    assert cache["match"] == "similar" and cache["similar_hits"] >= 1
    assert cache["similar"]["enabled"] is True
    for prompt in cache["by_prompt"]:
        assert prompt["similar"]["similar"] is True, prompt
        assert prompt["similar"]["false_hit_bound"] <= 0.01
    # a similar answer filled no slot: the store still holds the shipped 50 answers
    assert cache["answers"] == 50


def test_misses_are_listed_with_their_nearest_prompt_and_the_log_says_how_hits_matched(
    gateway: str,
) -> None:
    from click.testing import CliRunner

    from comeapi.cli import main

    item = next(i for i in load_prompt_set().items if i.prompt == "What is the capital of Japan?")
    for _ in range(3):
        assert _send(gateway, item, "What is the capital of Peru?").status_code == 404
    result = CliRunner().invoke(main, ["cache", "misses", "--url", gateway, "--json"])
    assert result.exit_code == 0, result.output
    missed = {m["query"]: m for m in json.loads(result.output)}
    peru = missed["What is the capital of Peru?"]
    assert peru["count"] >= 3 and peru["kind"] == "chat"
    assert peru["nearest_prompt"] == item.prompt and peru["reason"]
    table = CliRunner().invoke(main, ["cache", "misses", "--url", gateway])
    assert "What is the capital of Peru?" in table.output

    _send(gateway, item, "What's the capital city of Japan?")
    _send(gateway, item, item.prompt)
    rows = httpx.get(gateway + "/dashboard/data", timeout=10).json()["requests"]["recent"]
    assert [r["match"] for r in rows[:3]] == ["exact", "similar", None]
