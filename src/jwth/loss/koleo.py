"""KoLeo regulariser (Kozachenko-Leonenko differential-entropy estimator).

Sablayrolles et al. 2019, "Spreading vectors for similarity search", eq. 9;
used on student class tokens by DINOv2 (Oquab et al. 2023, sec. 4):

    x_i <- x_i / ||x_i||,   rho_{n,i} = min_{j != i} ||x_i - x_j||
    L_KoLeo = - 1/n * sum_i log(rho_{n,i} + eps)

Safe for duplicates: distances are computed as sqrt(||x_i - x_j||^2 + eps^2), so a
duplicate pair gives a finite loss (-log(~2 eps)) and a zero, finite gradient instead of
the 0/0 of d||x||/dx at x = 0. A batch of one has no neighbour and returns 0. Inputs
are promoted to float32 so bf16 batches stay finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    """KoLeo loss on a batch of embeddings.

    Args:
        eps: distance floor (1e-8 as DINOv2).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: embeddings, shape (n, D), any float dtype.

        Returns:
            Scalar float32 loss; 0 (attached to the graph) when n < 2.

        Raises:
            ValueError: x is not 2-D.
        """
        if x.ndim != 2:
            raise ValueError(f"KoLeoLoss expects (n, D), got shape {tuple(x.shape)}")
        x = x.float()
        n = x.shape[0]
        if n < 2:
            return x.sum() * 0.0
        x = F.normalize(x, dim=-1, eps=self.eps)
        with torch.no_grad():
            sim = x @ x.t()
            sim.fill_diagonal_(-float("inf"))
            nn_idx = sim.argmax(dim=1)  # (n,) nearest neighbour = max cosine on the sphere
        diff = x - x[nn_idx]
        rho = torch.sqrt((diff * diff).sum(dim=-1) + self.eps**2)
        return -torch.log(rho + self.eps).mean()
