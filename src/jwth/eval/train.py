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
from jwth.heads.attention_pool import JWTHAttentionHead, grid_forward_normalized


@dataclass
class HeadTrainConfig:
    """Head training settings (saved in each run's config.yaml)."""

    epochs: int = 10
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
        patches: raw patch tokens (T, N, D), float32 or float16 (converted per batch),
            or None when no head reads them.
        patches_normalized: ``normalize_tokens(patches)`` computed once (same dtypes),
            or None when no head reads them.
    """

    cls: torch.Tensor
    patches: torch.Tensor | None = None
    patches_normalized: torch.Tensor | None = None

    def tokens(self, idx: np.ndarray, kind: str) -> torch.Tensor:
        """Patch tokens of tiles ``idx`` as float32, (b, N, D); kind: ``raw`` or ``normalized``.

        Raises:
            ValueError: these features hold no tokens of that kind.
        """
        src = {"raw": self.patches, "normalized": self.patches_normalized}[kind]
        if src is None:
            raise ValueError(f"These features hold no {kind} patch tokens.")
        return src[torch.as_tensor(idx)].float()


def _logits(head: nn.Module, cls: torch.Tensor, tokens: dict) -> torch.Tensor:
    kind = getattr(head, "token_input", "raw")
    if kind == "normalized":
        return head.forward_normalized(cls, tokens[kind])
    return head(cls, tokens.get(kind))


def _gather(heads: list[nn.Module], feats: Features, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
    """One gather per token kind the heads read: (cls (b, D), {kind: tokens (b, N, D)})."""
    kinds = {getattr(h, "token_input", "raw") for h in heads} - {None}
    return feats.cls[torch.as_tensor(idx)], {k: feats.tokens(idx, k) for k in kinds}


def head_logits(head: nn.Module, feats: Features, idx: np.ndarray) -> torch.Tensor:
    """Logits (b, C) of ``head`` on tiles ``idx``, feeding the token kind the head reads."""
    cls, tokens = _gather([head], feats, idx)
    return _logits(head, cls, tokens)


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Balanced class weights w_c = n / (C n_c) (as scikit-learn's ``class_weight='balanced'``)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def fit_heads(
    heads: list[nn.Module],
    feats: Features,
    y: np.ndarray,
    idx: np.ndarray,
    cfg: HeadTrainConfig,
    settings: list[tuple[float, float]],
    num_classes: int,
) -> list[nn.Module]:
    """Train several heads side by side on the same batches (one per (lr, weight decay)).

    Each head has its own AdamW optimiser and cosine schedule; the batch (and its
    fp16 -> fp32 conversion) is shared, as in CAPI's grid of probes trained on one
    pass over frozen features. Returns the heads in eval mode.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    w = class_weights(y[idx], num_classes) if cfg.class_balanced else None
    loss_fn = nn.CrossEntropyLoss(weight=w)
    steps_per_epoch = max(1, math.ceil(len(idx) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    opts, scheds = [], []
    for h, (lr, wd) in zip(heads, settings):
        opt = torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=wd)
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))
        h.train()
    yt = torch.as_tensor(np.array(y, dtype=np.int64))
    stacked = len(heads) > 1 and all(isinstance(h, JWTHAttentionHead) for h in heads)
    for _ in range(cfg.epochs):
        perm = idx[torch.randperm(len(idx), generator=g).numpy()]
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            if len(b) < 2:  # BatchNorm statistics need two samples
                continue
            cls, tokens = _gather(heads, feats, b)
            if stacked:
                # the heads' parameters are disjoint, so the gradient of the summed loss
                # w.r.t. each head equals that of its own loss
                logits = grid_forward_normalized(heads, cls, tokens["normalized"])
            else:
                logits = [_logits(h, cls, tokens) for h in heads]
            loss = sum(loss_fn(lg, yt[b]) for lg in logits)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt, sched in zip(opts, scheds):
                opt.step()
                sched.step()
    return [h.eval() for h in heads]


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
    """Train one ``head`` on tiles ``idx`` (see :func:`fit_heads`); returns it in eval mode."""
    return fit_heads([head], feats, y, idx, cfg, [(lr, weight_decay)], num_classes)[0]


@torch.no_grad()
def predict(
    head: nn.Module, feats: Features, idx: np.ndarray, batch_size: int = 256, keep_attention: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (n, C) for tiles ``idx``, and (n, N) head-averaged attention if asked."""
    head.eval()
    probs, attn = [], []
    for s in range(0, len(idx), batch_size):
        probs.append(head_logits(head, feats, idx[s : s + batch_size]).softmax(-1).numpy())
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
        torch.manual_seed(cfg.seed)
        for h in fit_heads([make_head() for _ in grid], feats, y, fit_idx, cfg, grid, num_classes):
            p, _ = predict(h, feats, val_idx)
            scores.append(metric("bacc", y[val_idx], p))
        best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
    else:
        best = 0
    lr, wd = grid[best]
    head = fit_head(make_head(), feats, y, train_idx, cfg, lr, wd, num_classes)
    return head, {"lr": lr, "weight_decay": wd, "val_bacc": [float(s) for s in scores], "grid": grid}
