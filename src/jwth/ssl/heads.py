"""DINO projection head (Caron et al. 2021, sec. 3.1 and app.; DINOv2 defaults).

    z = MLP(x)                  # nlayers Linear layers with GELU, last -> bottleneck
    z = z / ||z||_2             # (B, bottleneck)
    g = W z,  W weight-normed   # (B, K) prototype scores, ||w_k|| fixed to 1

The weight-norm gain is frozen at 1 (DINO's ``norm_last_layer``), so the scores are
cosine similarities to the K prototypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP + L2 normalisation + weight-normalised prototype layer.

    Args:
        in_dim: backbone width D.
        out_dim: number of prototypes K (DINOv2: 65,536).
        hidden_dim: MLP width (2048).
        bottleneck_dim: width before the prototypes (256).
        nlayers: number of MLP Linear layers (3).

    Shapes: (B, D) -> (B, K).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError("nlayers must be >= 1")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(nlayers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        nn.init.trunc_normal_(last.weight, std=0.02)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mlp(x)
        z = F.normalize(z, dim=-1, eps=1e-6 if z.dtype != torch.float32 else 1e-12)
        return self.last_layer(z)
