"""Training heads on cached frozen tokens.

Loss: class-balanced cross-entropy (weights n / (C n_c) from the training tiles).
Optimiser: AdamW with a cosine learning-rate schedule. Learning rate and weight
decay are chosen on an inner validation split of patients (:func:`select_and_fit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from jwth.eval.metrics import metric


@dataclass
class HeadTrainConfig:
    """Head training settings (saved in each run's config.yaml)."""

    epochs: int = 12
    batch_size: int = 128
    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-4])
    weight_decays: list[float] = field(default_factory=lambda: [1e-4, 1e-2])
    num_heads: int = 8
    dropout: float = 0.0
    class_balanced: bool = True
    seed: int = 0
    threads: int = 0  # 0 = torch default


@dataclass
class Features:
    """Tokens of all tiles held in memory for head training.

    Attributes:
        cls: (T, D) float32.
        patches: (T, N, D) float16, or None when no head needs them.
    """

    cls: torch.Tensor
    patches: torch.Tensor | None

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        i = torch.as_tensor(idx)
        return self.cls[i], (self.patches[i].float() if self.patches is not None else None)


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Balanced class weights w_c = n / (C n_c) (as scikit-learn's ``class_weight='balanced'``)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def fit_head(
    head: nn.Module,
    feats: Features,
    y: np.ndarray,
    idx: np.ndarray,
    cfg: HeadTrainConfig,
    lr: float,
    weight_decay: float,
    num_classes: int,
) -> nn.Module:
    """Train ``head`` on tiles ``idx``; returns it in eval mode."""
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    w = class_weights(y[idx], num_classes) if cfg.class_balanced else None
    loss_fn = nn.CrossEntropyLoss(weight=w)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(idx) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    yt = torch.as_tensor(np.array(y, dtype=np.int64))
    head.train()
    for _ in range(cfg.epochs):
        perm = idx[torch.randperm(len(idx), generator=g).numpy()]
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            if len(b) < 2:  # BatchNorm statistics need two samples
                continue
            cls, patches = feats.batch(b)
            loss = loss_fn(head(cls, patches), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def predict(
    head: nn.Module, feats: Features, idx: np.ndarray, batch_size: int = 256, keep_attention: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (n, C) for tiles ``idx``, and (n, N) head-averaged attention if asked."""
    head.eval()
    probs, attn = [], []
    for s in range(0, len(idx), batch_size):
        cls, patches = feats.batch(idx[s : s + batch_size])
        probs.append(head(cls, patches).softmax(-1).numpy())
        if keep_attention and getattr(head, "last_attention", None) is not None:
            attn.append(head.last_attention.mean(1).numpy())
    return np.concatenate(probs), (np.concatenate(attn) if attn else None)


def select_and_fit(
    make_head,
    feats: Features,
    y: np.ndarray,
    fit_idx: np.ndarray,
    val_idx: np.ndarray,
    train_idx: np.ndarray,
    cfg: HeadTrainConfig,
    num_classes: int,
) -> tuple[nn.Module, dict]:
    """Choose (lr, weight decay) by validation balanced accuracy, then refit on all training tiles.

    Args:
        make_head: zero-argument factory of a fresh head.
        fit_idx, val_idx: inner split of ``train_idx`` by patient.
        train_idx: the outer training tiles (fit + val).

    Returns:
        (head trained on ``train_idx`` with the chosen settings, info dict with the grid scores).
    """
    grid = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    scores = []
    if len(grid) > 1:
        for lr, wd in grid:
            h = fit_head(make_head(), feats, y, fit_idx, cfg, lr, wd, num_classes)
            p, _ = predict(h, feats, val_idx)
            scores.append(metric("bacc", y[val_idx], p))
        best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
    else:
        best = 0
    lr, wd = grid[best]
    head = fit_head(make_head(), feats, y, train_idx, cfg, lr, wd, num_classes)
    return head, {"lr": lr, "weight_decay": wd, "val_bacc": [float(s) for s in scores], "grid": grid}
