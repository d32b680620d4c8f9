"""Progress of long operations: a live rich bar on a terminal, plain lines otherwise.

A bar redrawn in place is what a person at a terminal wants; in a log file or CI output it
becomes noise (or, with rich, nothing until the end), so there each tenth of the work is
one line.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

STEPS = 10  # plain lines per operation


class ProgressReport:
    """``with ProgressReport(console, "generating", total=50) as report: report.advance()``.

    ``in_bytes`` shows sizes and speed instead of counts.
    """

    def __init__(self, console: Console, description: str, total: int, *, in_bytes: bool = False):
        self.console = console
        self.description = description
        self.total = total
        self.in_bytes = in_bytes
        self.done = 0
        self._steps_shown = 0
        self._bar: Progress | None = None
        if console.is_terminal:
            columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn()]
            if in_bytes:
                columns += [DownloadColumn(), TransferSpeedColumn()]
            else:
                columns += [MofNCompleteColumn(), TimeElapsedColumn()]
            self._bar = Progress(*columns, TimeRemainingColumn(), console=console)
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> ProgressReport:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif exc_type is None and self._steps_shown < STEPS:
            self._line()  # the last line always says "done"

    def advance(self, amount: int = 1, *, description: str | None = None) -> None:
        self.done += amount
        if description is not None:
            self.description = description
        if self._bar is not None:
            self._bar.update(self._task, advance=amount, description=self.description)
            return
        step = STEPS if self.total <= 0 else self.done * STEPS // self.total
        if step > self._steps_shown:
            self._steps_shown = step
            self._line()

    def _line(self) -> None:
        if self.in_bytes:
            amount = f"{self.done / 1e6:.0f}/{self.total / 1e6:.0f} MB"
        else:
            amount = f"{self.done}/{self.total}"
        percent = 100 if self.total <= 0 else self.done * 100 // self.total
        self.console.print(f"{self.description}: {amount} ({percent}%)", highlight=False)
