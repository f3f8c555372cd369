"""DINO self-distillation loss on class-token prototype scores.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"
(eq. 1-2 and the centering of sec. 3.1); Oquab et al. 2023 (DINOv2, sec. 4) for the
Sinkhorn-Knopp alternative to centering (Caron et al. 2020, SwAV, eq. 3).

Symbols (paper names):
    g_s, g_t        student / teacher prototype scores, shape (B, K)
    tau_s, tau_t    student / teacher temperatures
    c               running centre of teacher scores, shape (1, K)
    m_c             centre momentum (0.9)
    P_t = softmax((g_t - c) / tau_t)          (centering), or
    P_t = SinkhornKnopp(g_t / tau_t)          (Sinkhorn-Knopp)
    P_s = softmax(g_s / tau_s)
    H(P_t, P_s) = - sum_k P_t[k] log P_s[k]
    L = 1/|pairs| * sum over (teacher view t, student view s != t) of mean_b H
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from jwth.loss._dist import all_reduce_max, all_reduce_sum, world_size
from jwth.loss._soft_ce import soft_cross_entropy, softmax_rows_


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp normalisation of teacher scores into a balanced assignment.

    Starting from Q = exp(scores / temperature)^T (K x B), alternately normalises rows
    (each prototype gets total mass 1/K) and columns (each sample gets mass 1/B),
    then returns the column-normalised assignment scaled so that every sample's row
    sums to 1 (SwAV, Caron et al. 2020, eq. 3 and Alg. 1). Under torch.distributed the
    row sums run over the global batch, so the result does not depend on the number of
    processes.

    Args:
        scores: teacher prototype scores g_t, shape (B, K), any float dtype.
        temperature: tau_t (> 0).
        n_iterations: number of row/column normalisation rounds (DINOv2: 3).

    Returns:
        float32 tensor of shape (B, K): each row sums to 1; after the final round every
        column sums to about B_global / K (exactly so before the last column step).

    Raises:
        ValueError: temperature <= 0 or n_iterations < 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    s = scores.float() / temperature
    # subtract the max over the global batch (same constant on every process; cancels)
    s = s - all_reduce_max(s.max().detach().clone())
    q = torch.exp(s).t()  # (K, B)
    b_global = torch.tensor(float(q.shape[1] * world_size()), device=q.device)
    k = q.shape[0]
    total = all_reduce_sum(q.sum())
    q = q / total
    for _ in range(n_iterations):
        row = all_reduce_sum(q.sum(dim=1, keepdim=True))  # (K, 1) over global batch
        q = q / row.clamp_min(1e-30) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-30) / b_global
    q = q * b_global
    return q.t()


class PrototypeDistillation(nn.Module):
    """Shared state of the DINO and iBOT losses: temperatures, centre and teacher targets.

    Args:
        out_dim: number of prototypes K.
        student_temp: tau_s (0.1).
        center_momentum: momentum m_c of the running-mean centre (0.9).
        centering: ``"centering"`` (running mean), ``"sinkhorn_knopp"``, or ``"none"``.
        sk_iterations: Sinkhorn-Knopp rounds.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: Literal["centering", "sinkhorn_knopp", "none"] = "centering",
        sk_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in ("centering", "sinkhorn_knopp", "none"):
            raise ValueError(f"centering must be centering|sinkhorn_knopp|none, got {centering!r}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.sk_iterations = sk_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_scores: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """P_t from teacher scores g_t (B, K) -> (B, K) float32, rows summing to 1 (B may be 0)."""
        if teacher_scores.shape[0] == 0:
            return teacher_scores.float()
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_scores, teacher_temp, self.sk_iterations)
        g = teacher_scores.float()
        # one new (B, K) tensor, then softmax in place block by block (see jwth.loss._soft_ce)
        x = g - self.center if self.centering == "centering" else g.clone()
        return softmax_rows_(x.mul_(1.0 / teacher_temp))


class DINOLoss(PrototypeDistillation):
    """DINO loss: cross-entropy between teacher and student prototype distributions.

    Args:
        out_dim: number of prototypes K.
        student_temp: tau_s (DINOv2: 0.1).
        center_momentum: m_c of the running centre (DINOv2: 0.9).
        centering: ``"centering"`` (running mean, default), ``"sinkhorn_knopp"``, or
            ``"none"`` (no centering; collapses, kept for the collapse test).
        sk_iterations: Sinkhorn-Knopp rounds.

    Buffers:
        center: c, shape (1, K), updated by :meth:`update_center` (global-batch mean
        under torch.distributed).
    """

    @torch.no_grad()
    def update_center(self, teacher_scores: torch.Tensor) -> None:
        """c <- m_c c + (1 - m_c) mean_b g_t over the global batch (DINO eq. 4).

        Args:
            teacher_scores: all teacher scores of this step, shape (B, K).
        """
        g = teacher_scores.float()
        s = all_reduce_sum(g.sum(dim=0, keepdim=True))
        n = g.shape[0] * world_size()
        self.center.mul_(self.center_momentum).add_(s / n, alpha=1 - self.center_momentum)

    def forward(
        self,
        student_scores: Sequence[torch.Tensor],
        teacher_probs: Sequence[torch.Tensor],
        n_global: int | None = None,
    ) -> torch.Tensor:
        """Mean over view pairs of mean_b H(P_t, P_s).

        Args:
            student_scores: one tensor (B, K) per student view; the first ``n_global``
                views are the global crops, in the same order as ``teacher_probs``.
            teacher_probs: one tensor (B, K) per teacher (global) view, from
                :meth:`teacher_probs`.
            n_global: how many leading student views are global crops (they are not
                paired with the teacher view of the same crop). Defaults to
                ``len(teacher_probs)``.

        Returns:
            Scalar loss (float32).

        Raises:
            ValueError: no valid pair.
        """
        n_global = len(teacher_probs) if n_global is None else n_global
        n_t = len(teacher_probs)
        # sum_t H(P_t, P_s) = -(sum_t P_t) . log P_s: one (B, K) product per student view
        # instead of one per pair (the sum over teachers is formed once).
        p_sum = torch.stack([p.float() for p in teacher_probs]).sum(0) if n_t else None
        total = student_scores[0].new_zeros((), dtype=torch.float32)
        n_pairs = 0
        for s_idx, g_s in enumerate(student_scores):
            own = s_idx < n_global and s_idx < n_t  # a global view is not paired with its own teacher view
            n = n_t - int(own)
            if n == 0:
                continue
            target = p_sum - teacher_probs[s_idx].float() if own else p_sum
            total = total + soft_cross_entropy(g_s, target, self.student_temp).mean()
            n_pairs += n
        if n_pairs == 0:
            raise ValueError("DINOLoss needs at least one (teacher, student) pair of different views")
        return total / n_pairs
