"""Collapse indicators of self-distillation, checked every step after the lr warm-up:
teacher entropy / log K (uniform outputs), class-token spread (constant outputs), and
prototype usage (one mode). DINO, Caron et al. 2021, sec. 5.3 (centering vs sharpening)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["CollapseWarning", "collapse_stats", "collapse_reason"]


class CollapseWarning(RuntimeWarning):
    """The teacher looks collapsed (uniform or constant outputs)."""


@torch.no_grad()
def collapse_stats(teacher_probs: torch.Tensor, teacher_cls: torch.Tensor) -> dict[str, float]:
    """Collapse indicators from one step.

    Args:
        teacher_probs: teacher class-token distributions P_t, (B, K).
        teacher_cls: teacher class tokens (backbone output), (B, D).

    Returns:
        ``teacher_entropy``: mean per-sample entropy of P_t divided by log K (1 =
        uniform: the DINO loss sits at log K); ``embedding_spread``: 1 - ||mean_b
        x_b / ||x_b|| ||^2 (0 = all embeddings identical, ~1 = spread);
        ``unique_prototypes``: fraction of samples with distinct argmax prototype.
    """
    p = teacher_probs.float()
    k = p.shape[-1]
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean() / math.log(k)
    x = F.normalize(teacher_cls.float(), dim=-1)
    spread = 1.0 - (x.mean(0) ** 2).sum()
    uniq = torch.unique(p.argmax(-1)).numel() / max(p.shape[0], 1)
    return {"teacher_entropy": float(ent), "embedding_spread": float(spread), "unique_prototypes": float(uniq)}


def collapse_reason(stats: dict[str, float], batch: int) -> str | None:
    """A human-readable reason when ``stats`` (from :func:`collapse_stats`) look collapsed."""
    if stats["teacher_entropy"] > 0.98:
        return (
            f"teacher outputs are near-uniform (entropy {stats['teacher_entropy']:.3f} x log K): the DINO loss "
            "sits at log(prototypes); check centering / teacher temperature / data diversity"
        )
    if stats["embedding_spread"] < 1e-3:
        return (
            f"all teacher class tokens are the same (spread {stats['embedding_spread']:.2e}): "
            "representation collapse; check the data (near-uniform tiles?) and centering"
        )
    if batch >= 32 and stats["unique_prototypes"] * batch <= 1.0 + 1e-9:
        return "every sample is assigned to the same prototype: collapse to one mode"
    return None
