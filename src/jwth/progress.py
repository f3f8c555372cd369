"""Progress bars (rich) with throughput and ETA."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.text import Text

from rich.progress import (
    BarColumn,
    ProgressColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RateColumn(ProgressColumn):
    """Items per second."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} {self.unit}/s" if speed else f"     - {self.unit}/s")


class _Bar:
    def __init__(self, progress: Progress | None, task) -> None:
        self._p, self._t = progress, task

    def advance(self, n: int = 1) -> None:
        if self._p is not None:
            self._p.advance(self._t, n)


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "it", disable: bool = False) -> Iterator[_Bar]:
    """A rich progress bar showing count, rate (``unit``/s), elapsed time and ETA."""
    if disable:
        yield _Bar(None, None)
        return
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*cols, transient=False) as p:
        task = p.add_task(description, total=total)
        yield _Bar(p, task)
