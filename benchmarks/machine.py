"""What every benchmark says about the machine it ran on, and when its ratios are withheld.

The machine is shared: a figure measured while other work ran says little. Each benchmark
reports its ratios as results only when the CPU time that *other* processes used stayed below
``QUIET_OTHER_CPU`` per CPU, sampled for a second before the run and over each round (or the
whole run): the CPU every process used (``/proc/stat``) less the benchmark's own process
tree's (itself, its children and the children it reaped). The load average is printed
too, but it cannot judge: it counts the benchmark's own servers and load generator, and its
1-minute memory carries one benchmark's load into the next.

With ``--summary FILE`` a benchmark also appends its headline to FILE as one JSON line
(``Load.summarize``), which benchmarks/run_all.py (``make bench``) gathers into one table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# The 1-minute load average per CPU under which benchmarks/run_all.py starts the next
# benchmark (it waits for the previous one's load to fade).
QUIET_LOAD_PER_CPU = 0.5
# CPUs' worth of other processes' work, per CPU, that a quiet machine stays under: half a
# core of a 2-core machine.
QUIET_OTHER_CPU = 0.25
_TICK = os.sysconf("SC_CLK_TCK")
# CPU time is counted in clock ticks (10 ms): a stretch shorter than this is not judged alone.
_SHORTEST_STRETCH = 0.5


def busy_cpu_seconds() -> float:
    """CPU seconds every process (and the kernel) used since boot, all CPUs: /proc/stat's
    user, nice, system, irq, softirq and steal (a hypervisor's other guests) columns."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def own_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds of ``pid`` (this process by default) and every descendant, including
    the children they have reaped (their time moves into the parent's cutime/cstime)."""
    return _tree_cpu(os.getpid() if pid is None else pid, reaped=True)


def _tree_cpu(pid: int, *, reaped: bool) -> float:
    todo = [pid]
    total = 0.0
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            todo.extend(_children(p))
        except OSError:
            continue  # gone meanwhile: its time is in its parent's cutime once reaped
        # utime, stime, then cutime, cstime (fields 14-17 of proc(5); [0] is field 3)
        total += sum(int(x) for x in fields[11 : 15 if reaped else 13]) / _TICK
    return total


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a thread's children are listed under it)."""
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


@dataclass
class _Mark:
    wall: float = field(default_factory=time.monotonic)
    busy: float = field(default_factory=busy_cpu_seconds)
    own: float = field(default_factory=own_cpu_seconds)

    def other_since(self, earlier: _Mark) -> float:
        """CPUs' worth of other processes' work between ``earlier`` and this mark."""
        wall = self.wall - earlier.wall
        if wall <= 0:
            return 0.0
        return max(0.0, (self.busy - earlier.busy - (self.own - earlier.own)) / wall)


@dataclass
class Load:
    """The machine around a benchmark. ``own`` is how many CPUs the benchmark keeps busy
    (shown, not counted: its own work is measured and left out). ``before`` is the other
    processes' CPU in a ``sample``-second look before the run; ``rounds`` their CPU over
    each stretch the benchmark closed with ``between_rounds`` or ``finish``."""

    own: float = 0.0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    start: float = field(default_factory=lambda: os.getloadavg()[0])
    end: float | None = None
    before: float | None = None
    rounds: list[float] = field(default_factory=list)
    sample: float = 1.0
    _mark: _Mark | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.before is None:
            mark = _Mark()
            time.sleep(self.sample)
            self._mark = _Mark()
            self.before = self._mark.other_since(mark)
        print(
            f"machine: {self.cpus} CPUs, load average {self.start:.2f} at start, "
            f"other processes {self.before:.2f} CPUs before the run"
        )

    def between_rounds(self) -> None:
        """Close a stretch of the run (a round): what other processes used during it."""
        mark = _Mark()
        if self._mark is not None and mark.wall - self._mark.wall < _SHORTEST_STRETCH:
            return  # too short to judge (clock ticks): it joins the next stretch
        if self._mark is not None:
            self.rounds.append(mark.other_since(self._mark))
        self._mark = mark

    def finish(self) -> None:
        self.between_rounds()
        self.end = os.getloadavg()[0]
        print(
            f"load average {self.end:.2f} at the end; other processes "
            f"{self.busiest:.2f} CPUs in the busiest of {len(self.rounds)} stretches"
        )

    @property
    def busiest(self) -> float:
        """Other processes' CPUs before the run or in its busiest stretch."""
        return max([self.before or 0.0, *self.rounds])

    @property
    def limit(self) -> float:
        return QUIET_OTHER_CPU * self.cpus

    @property
    def quiet(self) -> bool:
        """Was the machine quiet enough for the ratios to count?"""
        return self.busiest <= self.limit

    def verdict(self, text: str) -> str:
        """``text`` when the machine was quiet, else a withholding note in its place."""
        if self.quiet:
            return text
        return (
            f"WITHHELD: other processes used {self.busiest:.2f} CPUs (before the run "
            f"{self.before or 0.0:.2f}; quiet: <= {self.limit:g}); "
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
            "other_before": round(self.before or 0.0, 2),
            "other_busiest": round(self.busiest, 2),
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
    """User + system CPU of ``pid`` and all its live descendants (Linux /proc)."""
    return _tree_cpu(pid, reaped=False)
