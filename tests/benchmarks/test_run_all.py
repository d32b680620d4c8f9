"""The bookkeeping of `make bench` (benchmarks/run_all.py, benchmarks/machine.py): what a
benchmark's summary line holds, and how the README's table is replaced. No benchmark runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import machine
import run_all


def summary(load: machine.Load, path: Path) -> dict[str, object]:
    load.summarize(path, name="x", what="a figure", headline="1.23x", notes="(d) not run")
    return json.loads(path.read_text().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_quiet_run_keeps_its_headline_and_a_busy_one_withholds_it(tmp_path: Path) -> None:
    limit = machine.QUIET_OTHER_CPU * 2
    # A load average of 5 is the benchmark's own (or the previous one's): not held against it.
    quiet = machine.Load(own=2.0, cpus=2, start=5.0, before=limit - 0.1)
    quiet.rounds = [0.1, limit]
    quiet.end = 6.0
    line = summary(quiet, tmp_path / "s.jsonl")
    assert (line["headline"], line["withheld"]) == ("1.23x", False)
    assert line["other_busiest"] == limit

    busy_before = machine.Load(own=1.0, cpus=2, start=0.0, before=limit + 0.1)
    busy_in_a_round = machine.Load(own=1.0, cpus=2, start=0.0, before=0.0)
    busy_in_a_round.rounds = [0.0, limit + 0.2, 0.0]
    for busy in (busy_before, busy_in_a_round):
        busy.end = 0.5
        line = summary(busy, tmp_path / "s.jsonl")
        assert (line["headline"], line["withheld"]) == ("WITHHELD", True)
        assert line["notes"] == "(d) not run"  # what is missing is said either way
        assert "WITHHELD: other processes used" in busy.verdict("1.23x")
    assert line["other_busiest"] == round(limit + 0.2, 2)
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 3  # appended


BURN = "import time; t = time.thread_time(); exec('while time.thread_time() - t < 0.4: pass')"


def test_the_benchmarks_own_work_is_counted_as_its_own_not_as_other_processes() -> None:
    """CPU used by a child and a grandchild (reaped meanwhile) is the benchmark's own; over
    the same stretch every process together used at least as much."""
    load = machine.Load(sample=0.2)
    own, busy = machine.own_cpu_seconds(), machine.busy_cpu_seconds()
    grandchild = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN!r}])"
    subprocess.run([sys.executable, "-c", grandchild], check=True, timeout=120)
    subprocess.run([sys.executable, "-c", BURN], check=True, timeout=120)
    spent = machine.own_cpu_seconds() - own
    assert spent >= 0.75  # 0.4 s each; clock ticks are 10 ms
    assert machine.busy_cpu_seconds() - busy >= spent - 0.05
    load.between_rounds()
    assert len(load.rounds) == 1 and load.rounds[0] >= 0.0


def test_the_command_leaves_out_the_summary_file() -> None:
    argv = ["benchmarks/b.py", "--summary", "/tmp/x", "--rounds", "7", "--summary=/y", "--", "-t"]
    command = machine.command_line(argv)
    assert command.endswith("benchmarks/b.py --rounds 7 -- -t")
    assert "summary" not in command


def rows() -> list[dict[str, object]]:
    return [
        {"what": "hits | misses", "headline": "**1.5x**", "command": "b.py --n 2", "doc": "d.md"},
        {"what": "busy", "headline": "WITHHELD", "withheld": True, "command": "c.py",
         "load_start": 2.5, "load_end": 3.0, "cpus": 2, "own": 1.0, "notes": "(d) not run"},
    ]  # fmt: skip


def test_the_table_has_one_row_per_benchmark_with_its_command() -> None:
    lines = run_all.table(rows()).splitlines()
    assert lines[0] == "| what | figure | command |"
    assert lines[2] == "| hits \\| misses | **1.5x** | `b.py --n 2` ([d.md](d.md)) |"
    assert lines[3].startswith("| busy | WITHHELD: load average 2.50 at start, 3.00 at the end")
    assert "(d) not run" in lines[3]
    assert len(lines) == 4


def test_a_withheld_row_says_how_busy_the_other_processes_were() -> None:
    row = {"what": "x", "headline": "WITHHELD", "withheld": True, "command": "c.py",
           "load_start": 2.5, "load_end": 3.0, "cpus": 2, "own": 2.0,
           "other_busiest": 0.93}  # fmt: skip
    assert run_all.figure(row).startswith("WITHHELD: other processes used 0.93 CPUs (quiet: <= 0.5")


def test_the_readme_block_is_replaced_and_nothing_else(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    before, after = "# Title\n\ntext before\n\n", "\n\ntext after\n"
    readme.write_text(f"{before}{run_all.START}\n| old | table |\n{run_all.END}{after}")
    block = run_all.readme_block(rows(), "Measured by `make bench`.")
    run_all.write_readme(readme, block)
    text = readme.read_text()
    assert text == before + block + after
    assert "| old | table |" not in text
    run_all.write_readme(readme, block)  # again: same result
    assert readme.read_text() == text


def test_a_readme_without_exactly_one_block_is_left_alone(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    for text in ("no markers\n", f"{run_all.START}\na\n{run_all.END}\n" * 2):
        readme.write_text(text)
        with pytest.raises(SystemExit):
            run_all.write_readme(readme, "new")
        assert readme.read_text() == text


def test_the_repository_readme_has_one_block() -> None:
    text = run_all.README.read_text()
    assert text.count(run_all.START) == text.count(run_all.END) == 1
