"""``comeapi cache review|approve|reject|pin|unpin|edit``: against a real SQLite store, each
change one write (one revision), errors one line with exit status 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from llama_cpp import Llama

from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.cli import main
from tests.cache.factory import chat_entry, prompt_entry, sample_entries
from tests.helpers import BUNDLED_MODEL, MODEL_DIR

POEM = "Once upon a time"


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/cli/conftest.py


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    with SqliteStore(tmp_path / "s.db") as store:
        store.put_many(sample_entries(prompts=3, variants=3))
    return f"sqlite:{tmp_path / 's.db'}"


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


def entries(url: str) -> dict[tuple[str, int], Entry]:
    with SqliteStore(url.removeprefix("sqlite:")) as store:
        return {(e.prompt, e.variant): e for e in store.entries()}


def revision(url: str) -> int | None:
    with SqliteStore(url.removeprefix("sqlite:")) as store:
        return store.revision()


def test_review_json_lists_every_answer(store_url: str) -> None:
    result = run("cache", "review", "--store", store_url, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["store"] == store_url and doc["serve_states"] == ["approved", "pending"]
    assert len(doc["answers"]) == 9
    first = doc["answers"][0]
    for field in ("prompt", "kind", "model", "variant", "state", "flags", "text", "served"):
        assert field in first
    assert {a["state"] for a in doc["answers"]} == {"pending"}
    assert all(a["served"] for a in doc["answers"])
    only_approved = run(
        "cache", "review", "--store", store_url, "--json", "--serve-states", "approved"
    )
    assert not any(a["served"] for a in json.loads(only_approved.output)["answers"])


def test_approve_all_variants_then_reject_one(store_url: str) -> None:
    before = revision(store_url)
    result = run("cache", "approve", "--store", store_url, "--prompt", POEM)
    assert result.exit_code == 0, result.output
    assert "approved variants 0, 1, 2 of 'Once upon a time'" in result.output
    assert revision(store_url) == (before or 0) + 1  # one write for the three
    result = run("cache", "reject", "--store", store_url, "--prompt", POEM, "--variant", "1")
    assert result.exit_code == 0, result.output
    assert "make cache-purge KEYS=" + prompt_entry(POEM, 0).key in result.output
    states = {v: entries(store_url)[(POEM, v)].state for v in range(3)}
    assert states == {0: "approved", 1: "rejected", 2: "approved"}
    table = run("cache", "review", "--store", store_url)
    assert table.exit_code == 0 and "rejected" in table.output and "approved" in table.output


def test_pin_unpin_and_a_conflict(store_url: str) -> None:
    key = prompt_entry(POEM, 0).key
    assert (
        run("cache", "pin", "--store", store_url, "--key", key[:10], "--variant", "2").exit_code
        == 0
    )
    assert entries(store_url)[(POEM, 2)].pinned
    run("cache", "reject", "--store", store_url, "--key", key, "--variant", "2")
    assert not entries(store_url)[(POEM, 2)].pinned
    result = run("cache", "pin", "--store", store_url, "--key", key, "--variant", "2")
    assert result.exit_code == 1
    assert "is rejected: approve it" in result.output
    missing = run("cache", "pin", "--store", store_url, "--key", key)
    assert missing.exit_code == 2 and "--variant" in missing.output  # required for a pin


def test_edit_from_an_option_and_from_stdin(store_url: str) -> None:
    result = run(
        "cache", "edit", "--store", store_url, "--prompt", POEM, "--variant", "0",
        "--text", "there was a lighthouse keeper.",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "checks on the new text: none" in result.output
    entry = entries(store_url)[(POEM, 0)]
    assert entry.answer == "there was a lighthouse keeper." and entry.edited
    assert entry.history[0]["answer"] == prompt_entry(POEM, 0).answer
    # No model file in the (empty) data directory to count the new text's tokens with.
    assert entry.completion_tokens == 0 and "0 completion tokens, not counted" in result.output
    result = run(
        "cache", "edit", "--store", store_url, "--prompt", POEM, "--variant", "1", "--text", "-",
        stdin="<|im_end|> oops",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "checks on the new text: special_token" in result.output
    assert entries(store_url)[(POEM, 1)].flags == ("special_token",)


def test_a_name_that_fits_several_prompts_is_an_error_listing_them(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "two.db") as store:
        store.put_many([prompt_entry("Hi", 0), chat_entry("Hi", 0)])
    url = f"sqlite:{tmp_path / 'two.db'}"
    result = run("cache", "approve", "--store", url, "--prompt", "Hi")
    assert result.exit_code == 1
    assert "names 2 cached prompts" in result.output
    assert prompt_entry("Hi", 0).key[:12] in result.output
    assert chat_entry("Hi", 0).key[:12] in result.output
    assert {e.state for e in entries(url).values()} == {"pending"}  # nothing changed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--prompt", "not cached"), "no cached prompt has the prompt 'not cached'"),
        (("--prompt", POEM, "--variant", "9"), "has no variant 9"),
        ((), "name the prompt by its text or by its key"),
    ],
)
def test_bad_names_change_nothing(store_url: str, args: tuple[str, ...], message: str) -> None:
    before = revision(store_url)
    result = run("cache", "approve", "--store", store_url, *args)
    assert result.exit_code == 1 and message in result.output, result.output
    assert revision(store_url) == before


def test_an_edit_counts_its_tokens_with_the_models_vocabulary(store_url: str) -> None:
    text = "There was a lighthouse keeper who counted the waves."
    reference = Llama(str(MODEL_DIR / BUNDLED_MODEL), vocab_only=True, verbose=False)
    expected = len(reference.tokenize(text.encode(), add_bos=False, special=False))
    assert prompt_entry(POEM, 2).model == BUNDLED_MODEL
    result = run(
        "cache", "edit", "--store", store_url, "--prompt", POEM, "--variant", "2",
        "--text", text, "--model-dir", str(MODEL_DIR),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"its usage: {expected} completion tokens" in result.output
    entry = entries(store_url)[(POEM, 2)]
    assert entry.completion_tokens == expected and entry.history[-1]["completion_tokens"] == 8
