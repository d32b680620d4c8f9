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
