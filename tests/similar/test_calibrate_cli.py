"""``comeapi cache calibrate`` and ``comeapi cache label`` with the real engine (USE): the
table per prompt, the calibration written into the store, and a label recalibrating it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from comeapi.cache.default import shipped_entries
from comeapi.cache.prompts import shipped_prompts_path
from comeapi.cache.sqlite import SqliteStore
from comeapi.cli import main
from comeapi.similar import Calibration

pytestmark = pytest.mark.slow

UNLABELLED = "What breakfast do you recommend? Answer in one or two sentences."


def test_calibrate_prints_each_prompt_and_label_recalibrates(tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'c.db'}"
    with SqliteStore(tmp_path / "c.db") as s:
        s.put_many(shipped_entries())
    # The shipped set with one prompt's lists removed: that prompt stays exact-only.
    text = shipped_prompts_path().read_text(encoding="utf-8")
    start = text.index(f'"{UNLABELLED}"')
    same = text.index("    same:", start)
    end = text.index("  - messages:", same)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(text[:same] + text[end:], encoding="utf-8")

    result = CliRunner().invoke(
        main, ["cache", "calibrate", "--prompts", str(prompts), "--store", store]
    )
    assert result.exit_code == 0, result.output
    assert "9 of 10 prompts answer paraphrases" in result.output
    assert "exact-only: no labelled" in result.output
    with SqliteStore(tmp_path / "c.db") as s:
        doc = s.calibration()
    assert doc is not None
    fitted = {p.text: p for p in Calibration.from_dict(doc).prompts}
    assert not fitted[UNLABELLED].enabled and fitted["What is the capital of Japan?"].enabled

    labelled = CliRunner().invoke(
        main,
        ["cache", "label", "Name the capital city of Japan, please.",
         "--same", "What is the capital of Japan?", "--prompts", str(prompts), "--store", store],
    )  # fmt: skip
    assert labelled.exit_code == 0, labelled.output
    assert "recalibrated" in labelled.output
    with SqliteStore(tmp_path / "c.db") as s:
        after = s.calibration()
    assert after is not None and after != doc
    japan = {p.text: p for p in Calibration.from_dict(after).prompts}[
        "What is the capital of Japan?"
    ]
    assert "Name the capital city of Japan, please." in japan.same


def test_a_store_of_the_first_shipped_archive_is_calibrated_with_the_requirements_lists(
    tmp_path: Path,
) -> None:
    """The first shipped cache (the requirements' 10 prompts answered by Gemma 3 270M, a
    version 1 .jsonl: tests/similar/data, from git history) imports as before, and
    examples/requirements-prompts.yaml calibrates every one of its prompts."""
    store = f"sqlite:{tmp_path / 'c.db'}"
    first = Path(__file__).with_name("data") / "first-shipped-cache.jsonl"
    imported = CliRunner().invoke(main, ["cache", "import", str(first), "--store", store])
    assert imported.exit_code == 0, imported.output
    lists = Path(__file__).resolve().parents[2] / "examples" / "requirements-prompts.yaml"
    result = CliRunner().invoke(
        main, ["cache", "calibrate", "--prompts", str(lists), "--store", store]
    )
    assert result.exit_code == 0, result.output
    assert "10 of 10 prompts answer paraphrases" in result.output
    assert "no answers in this store" not in result.output
    with SqliteStore(tmp_path / "c.db") as s:
        doc = s.calibration()
        stored = {p.key for p in s.prompts()}
    assert doc is not None
    assert {p.key for p in Calibration.from_dict(doc).prompts} == stored
