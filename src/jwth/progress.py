"""Progress bars (rich) with throughput and ETA."""

from __future__ import annotations

import contextlib
import sys
import time
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


class _LineBar:
    """Progress as plain lines (every 10 % or 60 s) when output is not a terminal (logs, CI)."""

    def __init__(self, description: str, total: int, unit: str) -> None:
        self.description, self.total, self.unit = description, max(total, 1), unit
        self.done, self.t0 = 0, time.time()
        self.last_t, self.last_frac = self.t0, 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now, frac = time.time(), self.done / self.total
        if frac - self.last_frac >= 0.1 or now - self.last_t >= 60 or self.done >= self.total:
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(
                f"{self.description}: {self.done}/{self.total} {self.unit} ({100 * frac:.0f} %, "
                f"{rate:.3g} {self.unit}/s, elapsed {now - self.t0:.0f} s, eta {eta:.0f} s)",
                flush=True,
            )
            self.last_t, self.last_frac = now, frac


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "it", disable: bool = False) -> Iterator[_Bar]:
    """A rich progress bar showing count, rate (``unit``/s), elapsed time and ETA."""
    if disable:
        yield _Bar(None, None)
        return
    if not sys.stdout.isatty():
        yield _LineBar(description, total, unit)
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
