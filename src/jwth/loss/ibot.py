"""iBOT masked patch-token self-distillation loss.

Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer", eq. 2
(L_MIM); per-image weighting as in DINOv2 (Oquab et al. 2023).

Symbols:
    m_i in {0,1}^N      block mask of image i (1 = masked patch)
    h_s, h_t            student / teacher patch prototype scores at masked positions
    P_t = softmax((h_t - c_p) / tau_t)  or SinkhornKnopp(h_t / tau_t)
    L = 1/B * sum_i 1/|m_i| * sum_{j: m_ij=1} H(P_t[i,j], softmax(h_s[i,j]/tau_s))
Images with no masked patch contribute 0 but still count in B, so the loss is a
per-image mean and does not depend on how a global batch is split across processes.
"""

from __future__ import annotations

import torch

from jwth.loss._dist import all_reduce_sum
from jwth.loss._soft_ce import soft_cross_entropy
from jwth.loss.dino import PrototypeDistillation


class IBOTPatchLoss(PrototypeDistillation):
    """Masked patch-token loss (iBOT L_MIM).

    Args:
        out_dim: number of patch prototypes K.
        student_temp: tau_s (0.1).
        center_momentum: momentum of the patch centre c_p (0.9).
        centering: ``"centering"``, ``"sinkhorn_knopp"`` or ``"none"``.
        sk_iterations: Sinkhorn-Knopp rounds.
    """

    @torch.no_grad()
    def update_center(self, teacher_scores: torch.Tensor) -> None:
        """c_p <- m c_p + (1-m) mean of the masked teacher scores (M, K), global batch."""
        g = teacher_scores.float()
        s = all_reduce_sum(torch.cat([g.sum(dim=0), g.new_tensor([g.shape[0]])]))
        n = s[-1].clamp_min(1.0)
        self.center.mul_(self.center_momentum).add_((s[:-1] / n)[None], alpha=1 - self.center_momentum)

    def forward(
        self,
        student_scores: torch.Tensor,
        teacher_probs: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        """Per-image-weighted cross-entropy over masked patches.

        Args:
            student_scores: h_s at the masked positions, shape (M, K), rows in the
                order of ``masks.flatten().nonzero()``.
            teacher_probs: P_t at the same positions, shape (M, K).
            masks: boolean block masks, shape (B, N); M = masks.sum().

        Returns:
            Scalar float32 loss (0 when nothing is masked, still attached to the graph).

        Raises:
            ValueError: M does not match the number of masked positions.
        """
        m = int(masks.sum())
        if student_scores.shape[0] != m or teacher_probs.shape[0] != m:
            raise ValueError(
                f"expected {m} masked rows, got student {student_scores.shape[0]}, teacher {teacher_probs.shape[0]}"
            )
        b = masks.shape[0]
        if m == 0:
            return student_scores.float().sum() * 0.0
        per_image = masks.sum(dim=1).clamp_min(1).float()  # (B,)
        weight = (1.0 / per_image)[:, None].expand_as(masks)[masks]  # (M,)
        ce = soft_cross_entropy(student_scores, teacher_probs, self.student_temp)  # (M,)
        return (ce * weight).sum() / b
