"""Graceful stop of a training loop on SIGTERM / SIGINT.

A long run is ended from outside: a scheduler's time limit, a shell session closing,
Ctrl-C. Instead of dying mid-step, the loop finishes the step it is in, writes its
checkpoint and exports the encoder, then returns; running the same command again
resumes from that checkpoint. A second signal of the same kind while stopping restores
the default behaviour (a second Ctrl-C kills at once).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

__all__ = ["GracefulStop", "ignore_stop_signals"]


class GracefulStop:
    """Context manager that turns SIGTERM / SIGINT into a flag checked between steps.

    Attributes:
        requested: name of the signal received (``"SIGTERM"`` / ``"SIGINT"``), else None.

    Only installs handlers in the main thread of the main interpreter (Python allows no
    other); elsewhere it is inert and ``requested`` stays None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.requested == name:  # second signal: give the default behaviour back
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # type: ignore[arg-type]
            signal.raise_signal(signum)
            return
        self.requested = name

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._old.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:  # noqa: ARG001 - DataLoader worker_init_fn signature
    """DataLoader ``worker_init_fn``: data workers ignore SIGTERM / SIGINT.

    A shell or scheduler often signals the whole process group. The workers then stay alive
    until the main process has finished its step and written the checkpoint, and are shut
    down by the DataLoader as usual; otherwise a dead worker would abort the step.
    """
    for s in GracefulStop.SIGNALS:
        signal.signal(s, signal.SIG_IGN)
