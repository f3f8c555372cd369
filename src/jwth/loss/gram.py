"""Gram anchoring loss on patch tokens (DINOv3).

Siméoni et al. 2025, "DINOv3", sec. 4.2 (eq. 3):

    X_S, X_G  : L2-normalised patch tokens of student and Gram teacher, (B, N, D)
    G = X X^T : per-image Gram matrix, (B, N, N)
    L_Gram = 1/B * sum_b ||X_S X_S^T - X_G X_G^T||_F^2 / N^2

Only patch tokens enter: class and register tokens are dropped first (pass
``num_prefix_tokens`` when giving full token sequences). Identical inputs give exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gram_matrix(patch_tokens: torch.Tensor, remove_negative: bool = False) -> torch.Tensor:
    """Gram matrix of L2-normalised patch tokens.

    Args:
        patch_tokens: (B, N, D).
        remove_negative: clamp negative cosine similarities to 0.

    Returns:
        (B, N, N) float32 cosine-similarity matrices.
    """
    x = F.normalize(patch_tokens.float(), dim=-1)
    g = x @ x.transpose(1, 2)
    return g.clamp_min(0.0) if remove_negative else g


class GramLoss(nn.Module):
    """Gram anchoring loss.

    Args:
        remove_negative: clamp negative similarities of both Gram matrices to 0
            before comparing (a DINOv3 option, off by default).
    """

    def __init__(self, remove_negative: bool = False) -> None:
        super().__init__()
        self.remove_negative = remove_negative

    def forward(
        self,
        student_tokens: torch.Tensor,
        teacher_tokens: torch.Tensor,
        num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        """Args:
            student_tokens: (B, P + N, D) student tokens; the first P =
                ``num_prefix_tokens`` (class + register tokens) are ignored.
            teacher_tokens: (B, P + N, D) Gram-teacher tokens, same layout (no gradient
                is taken through them).
            num_prefix_tokens: P.

        Returns:
            Scalar float32 loss.

        Raises:
            ValueError: shapes differ after dropping the prefix tokens.
        """
        xs = student_tokens[:, num_prefix_tokens:]
        xg = teacher_tokens[:, num_prefix_tokens:].detach()
        if xs.shape != xg.shape:
            raise ValueError(f"student patch tokens {tuple(xs.shape)} != teacher {tuple(xg.shape)}")
        gs = gram_matrix(xs, self.remove_negative)
        gg = gram_matrix(xg, self.remove_negative)
        n = xs.shape[1]
        return ((gs - gg) ** 2).sum(dim=(1, 2)).mean() / (n * n)
