"""Tiny helpers for losses that need statistics over the *global* batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True when a torch.distributed process group is initialised with >1 process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (no-op on one process). Not differentiable."""
    if is_dist():
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``t`` over all processes (no-op on one process)."""
    if is_dist():
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t
