"""``comeapi cache check``: the quality checks over a store or an archive, exit status 1 only
when a served answer fails one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from comeapi.cache.archive import write_archive, write_jsonl
from comeapi.cache.sqlite import SqliteStore
from comeapi.cache.store import Entry
from comeapi.cli import main
from tests.cache.factory import chat_entry, prompt_entry, reviewed

GOOD = "The sea is calm tonight, and the moon is bright."
POEM = "Write a short poem about the sea."


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/cli/conftest.py


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["cache", "check", *args], catch_exceptions=False)


def answers(bad_state: str = "pending", pinned_good: bool = False) -> list[Entry]:
    good = [reviewed(prompt_entry(POEM, v, GOOD), finish_reason="stop") for v in range(2)]
    if pinned_good:
        good[0] = reviewed(good[0], pinned=True, state="approved")
    bad = reviewed(prompt_entry(POEM, 2, "<start_of_image>The sea"), state=bad_state)
    chat = reviewed(
        chat_entry("Hello", 0, "Hello! How can I help you today?"), finish_reason="stop"
    )
    return [*good, bad, chat]


def store_of(tmp_path: Path, entries: list[Entry]) -> str:
    with SqliteStore(tmp_path / "s.db") as store:
        store.put_many(entries)
    return f"sqlite:{tmp_path / 's.db'}"


def test_a_served_bad_answer_fails_the_run(tmp_path: Path) -> None:
    result = run("--store", store_of(tmp_path, answers()))
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert "4 answers checked, 4 served" in flat
    assert "1 fail a check, 1 of them served" in flat
    assert "special_token" in flat and "Write a short poem" in flat
    assert "FAILED" in flat


@pytest.mark.parametrize(("bad_state", "pinned"), [("rejected", False), ("pending", True)])
def test_an_answer_that_is_not_served_does_not_fail_it(
    tmp_path: Path, bad_state: str, pinned: bool
) -> None:
    """Rejected, or not served because another variant of its prompt is pinned."""
    result = run("--store", store_of(tmp_path, answers(bad_state, pinned)))
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "1 fail a check, 0 of them served" in flat
    assert "ok: every served answer passes every check" in flat


def test_only_approved_answers_are_served_when_the_setting_says_so(tmp_path: Path) -> None:
    url = store_of(tmp_path, answers())
    assert run("--store", url, "--serve-states", "approved").exit_code == 0
    os.environ["COMEAPI_SERVE_STATES"] = "approved"
    try:
        assert run("--store", url).exit_code == 0
    finally:
        del os.environ["COMEAPI_SERVE_STATES"]


def test_json_lists_every_answer_with_todays_flags(tmp_path: Path) -> None:
    result = run("--store", store_of(tmp_path, answers()), "--json")
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert (doc["checked"], doc["served"], doc["failing_served"]) == (4, 4, 1)
    by_variant = {(a["prompt"], a["variant"]): a for a in doc["answers"]}
    bad = by_variant[(POEM, 2)]
    assert bad["flags"] == ["special_token", "truncated"]
    assert bad["stored_flags"] == [] and bad["served"] is True and bad["state"] == "pending"
    for field in ("key", "kind", "model", "text"):
        assert field in bad
    assert by_variant[(POEM, 0)]["flags"] == []


@pytest.mark.parametrize("suffix", [".jsonl", ".tar.gz"])
def test_an_archive_is_checked_like_a_store(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"export{suffix}"
    if suffix == ".jsonl":
        write_jsonl(answers(), path)
    else:
        write_archive(answers(), path)
    assert run(str(path)).exit_code == 1
    good = tmp_path / f"good{suffix}"
    only_good = [e for e in answers() if "<start" not in e.answer]
    write_jsonl(only_good, good) if suffix == ".jsonl" else write_archive(only_good, good)
    result = run(str(good))
    assert result.exit_code == 0, result.output


def test_a_check_set_to_off_is_not_counted(tmp_path: Path) -> None:
    text = "It was a dark and stormy"  # cut by max_tokens: truncated
    cut = [prompt_entry("Tell me a story.", 0, text)]  # factory: finish_reason length
    url = store_of(tmp_path, cut)
    assert run("--store", url).exit_code == 1
    assert run("--store", url, "--checks", "truncated=off").exit_code == 0


def test_store_and_file_together_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    write_jsonl(answers(), path)
    result = run("--store", store_of(tmp_path, answers()), str(path))
    assert result.exit_code == 2


def test_a_broken_archive_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text("not json\n")
    result = run(str(path))
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output
