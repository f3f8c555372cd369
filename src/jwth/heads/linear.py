"""Baselines on frozen tokens: the linear probe and the [class, mean patch] concatenation."""

from __future__ import annotations

import torch
from torch import nn


class LinearProbe(nn.Module):
    """Linear probe on the class token (the usual frozen-encoder baseline).

    logits = W standardise(cls) + b. Shapes: cls (B, D) -> logits (B, C); patch
    tokens are accepted and ignored.
    """

    token_input = None

    def __init__(self, dim: int, num_classes: int, **_: object) -> None:
        super().__init__()
        self.std = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.std(cls))


class MeanConcatHead(nn.Module):
    """Ablation: [class token, mean patch token] -> linear (the Virchow2 embedding).

    Shapes: cls (B, D), patches (B, N, D), mask (B, N) -> logits (B, C).
    """

    token_input = "raw"

    def __init__(self, dim: int, num_classes: int, **_: object) -> None:
        super().__init__()
        self.std = nn.BatchNorm1d(2 * dim, affine=False)
        self.fc = nn.Linear(2 * dim, num_classes)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mean = patches.mean(dim=1)
        else:
            m = mask.to(patches.dtype).unsqueeze(-1)
            mean = (patches * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.fc(self.std(torch.cat([cls, mean], dim=-1)))
