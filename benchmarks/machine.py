"""What every benchmark says about the machine it ran on, and when its ratios are withheld.

The machine is shared: a figure measured while other work ran says little. Each benchmark
prints the load average when it starts and when it ends, and reports its ratios as results
only when the 1-minute load, less what the benchmark itself adds, stayed below
``QUIET_LOAD_PER_CPU`` per CPU; otherwise it says the ratios were withheld.

With ``--summary FILE`` a benchmark also appends its headline to FILE as one JSON line
(``Load.summarize``), which benchmarks/run_all.py (``make bench``) gathers into one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

QUIET_LOAD_PER_CPU = 0.5


@dataclass
class Load:
    """The load average around a benchmark; ``own`` is the load the benchmark itself puts
    on the machine (its servers and load generator), not counted against it."""

    own: float = 0.0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    start: float = field(default_factory=lambda: os.getloadavg()[0])
    end: float | None = None

    def __post_init__(self) -> None:
        print(f"machine: {self.cpus} CPUs, load average {self.start:.2f} at start")

    def finish(self) -> None:
        self.end = os.getloadavg()[0]
        print(f"load average {self.end:.2f} at the end")

    @property
    def quiet(self) -> bool:
        """Was the machine quiet enough for the ratios to count?"""
        limit = QUIET_LOAD_PER_CPU * self.cpus
        if self.start > limit:
            return False
        return self.end is None or self.end - self.own <= limit

    def verdict(self, text: str) -> str:
        """``text`` when the machine was quiet, else a withholding note in its place."""
        if self.quiet:
            return text
        limit = QUIET_LOAD_PER_CPU * self.cpus
        return (
            f"WITHHELD: load average {self.start:.2f} at start, "
            f"{self.end if self.end is not None else float('nan'):.2f} at the end "
            f"(beyond {limit:.1f} + this benchmark's own {self.own:.1f}); "
            f"the figures above are not results ({text})"
        )

    def summarize(
        self, path: Path | None, *, name: str, what: str, headline: str, notes: str = ""
    ) -> None:
        """Append this run's headline to ``path`` as one JSON line (nothing when ``path`` is
        None); withheld as ``verdict`` withholds it, so a table cannot quote a noisy figure.
        ``notes`` say what did not run and why; they are kept either way."""
        if path is None:
            return
        line = {
            "name": name,
            "what": what,
            "headline": headline if self.quiet else "WITHHELD",
            "withheld": not self.quiet,
            "notes": notes,
            "command": command_line(),
            "cpus": self.cpus,
            "load_start": round(self.start, 2),
            "load_end": None if self.end is None else round(self.end, 2),
            "own": self.own,
        }
        with path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


def add_summary_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--summary",
        type=Path,
        metavar="FILE",
        help="append the headline to FILE as one JSON line (benchmarks/run_all.py reads it)",
    )


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this benchmark, as typed from the repository's root: the
    interpreter and script relative to it where they lie inside, ``--summary FILE`` left
    out (it says where the figure went, not how it was measured)."""
    argv = list(sys.argv if argv is None else argv)
    shown: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--summary":
            skip = True
        elif not arg.startswith("--summary="):
            shown.append(arg)
    return shlex.join([_relative(sys.executable), _relative(argv[0]), *shown])


def _relative(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (symlinks kept: the
    virtualenv's python is a link to the base interpreter)."""
    repo = Path(__file__).resolve().parent.parent
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(repo)) if absolute.is_relative_to(repo) else path


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and all its descendants (Linux /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total
