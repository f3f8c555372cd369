"""Wall time per phase of the SSL training step (``train.profile_phases``).

Off by default; when on, each phase is bracketed by a device synchronisation (CUDA) so
that its time is its own, and ``profile.json`` in the run folder gets, per phase, the
median milliseconds per step (the first step, a warm-up, excluded) and its share of the
step. ``benchmarks/bench_pretrain.py --phases`` prints the table.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

#: the phases in step order
PHASES = ("data", "teacher", "student_backbone", "heads", "losses", "backward", "grad_clip", "optimizer", "ema",
          "bookkeeping")


class PhaseTimer:
    """Accumulates wall seconds per named phase; a no-op when disabled.

    Args:
        enabled: time the phases (else every call is free).
        device: the training device (CUDA work is synchronised at phase edges).
    """

    def __init__(self, enabled: bool, device: torch.device | None = None) -> None:
        self.enabled = bool(enabled)
        self.cuda = device is not None and device.type == "cuda"
        self.times: dict[str, list[float]] = defaultdict(list)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def phase(self, name: str):
        """Time the body as phase ``name`` (one entry per call)."""
        if not self.enabled:
            yield
            return
        self._sync()
        t = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name].append(time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        """Record a phase measured elsewhere (e.g. the wait for the next batch)."""
        if self.enabled:
            self.times[name].append(float(seconds))

    def summary(self, skip_first: int = 1) -> dict:
        """``{"phases": {name: {"median_ms", "share"}}, "step_ms": float, "steps": int}``.

        Medians over the steps after the first ``skip_first``; shares are of the sum of the
        phase medians. Empty when disabled or nothing was timed.
        """
        med = {}
        for name in list(PHASES) + sorted(set(self.times) - set(PHASES)):
            v = self.times.get(name, [])[skip_first:]
            if v:
                med[name] = statistics.median(v) * 1e3
        total = sum(med.values())
        steps = max((len(v) for v in self.times.values()), default=0) - skip_first
        return {"phases": {k: {"median_ms": round(v, 3), "share": round(v / total, 4) if total else 0.0}
                           for k, v in med.items()},
                "step_ms": round(total, 3), "steps": max(steps, 0)}


__all__ = ["PHASES", "PhaseTimer"]
