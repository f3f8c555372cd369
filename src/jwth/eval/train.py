"""Training heads on cached frozen tokens.

Loss: class-balanced cross-entropy (weights n / (C n_c) from the training tiles).
Optimiser: AdamW with a cosine learning-rate schedule. Learning rate and weight
decay -- and, with early stopping, the number of epochs -- are chosen on an inner
validation split of patients (:func:`select_and_fit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from jwth.device import adamw
from jwth.eval.metrics import metric
from jwth.heads.attention_pool import JWTHAttentionHead, grid_forward_normalized

#: the names of HeadTrainConfig.token_precision
TOKEN_PRECISIONS = ("auto", "fp32", "bf16")


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
    #: early stopping on the inner validation split: stop the grid once no head's validation
    #: balanced accuracy has improved for this many epochs and refit for the best epoch count;
    #: 0 = train all ``epochs`` and select at the last one
    patience: int = 3
    #: dtype of the attention heads' products with the normalised patch tokens: ``auto``
    #: (bf16 where this CPU measures bf16 matrix products >= 1.2x faster than fp32, see
    #: :func:`jwth.device.cpu_bf16_speedup`; else fp32), ``fp32`` or ``bf16``
    token_precision: str = "auto"

    def check(self) -> None:
        """Fail fast on settings no run can use (called before any token is computed).

        Raises:
            ValueError: naming the option and the accepted values.
        """
        if self.epochs < 1:
            raise ValueError(f"--epochs {self.epochs}: train the heads for at least 1 epoch.")
        if self.patience < 0:
            raise ValueError(f"--patience {self.patience}: give 0 (no early stopping) or a positive number of epochs.")
        if self.batch_size < 2:
            raise ValueError(f"batch_size {self.batch_size}: batches need at least 2 tiles (BatchNorm statistics).")
        if not self.lrs or not self.weight_decays:
            raise ValueError("The head-training grid needs at least one learning rate and one weight decay.")
        if self.token_precision not in TOKEN_PRECISIONS:
            raise ValueError(f"Unknown head token precision {self.token_precision!r}; choose auto, fp32 or bf16.")


def resolve_token_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype of :attr:`HeadTrainConfig.token_precision` on this machine (heads train on CPU).

    Raises:
        ValueError: an unknown precision name.
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision not in TOKEN_PRECISIONS:
        raise ValueError(f"Unknown head token precision {precision!r}; choose auto, fp32 or bf16.")
    from jwth.device import cpu_bf16_speedup

    return torch.bfloat16 if cpu_bf16_speedup() >= 1.2 else torch.float32


@dataclass
class Features:
    """Tokens of all tiles held in memory for head training.

    Attributes:
        cls: (T, D) float32.
        patches: raw patch tokens (T, N, D), float32 or float16 (converted per batch),
            or None when no head reads them.
        patches_normalized: ``normalize_tokens(patches)`` computed once (float32,
            float16 or bfloat16), or None when no head reads them.
        normalized_dtype: the dtype the normalised tokens are handed to the heads in
            (float32, or bfloat16 for bf16 products in the attention heads; see
            :func:`jwth.heads.attention_pool.attend`). Raw tokens are always float32.
    """

    cls: torch.Tensor
    patches: torch.Tensor | None = None
    patches_normalized: torch.Tensor | None = None
    normalized_dtype: torch.dtype = torch.float32

    def source(self, kind: str) -> torch.Tensor | None:
        """The held patch tokens of ``kind`` (``raw`` or ``normalized``), or None."""
        return {"raw": self.patches, "normalized": self.patches_normalized}[kind]

    def dtype_of(self, kind: str) -> torch.dtype:
        """The dtype tokens of ``kind`` are handed to the heads in."""
        return self.normalized_dtype if kind == "normalized" else torch.float32

    def tokens(self, idx: np.ndarray, kind: str) -> torch.Tensor:
        """Patch tokens of tiles ``idx``, (b, N, D), in :meth:`dtype_of` ``kind``; kind: ``raw`` or ``normalized``.

        Raises:
            ValueError: these features hold no tokens of that kind.
        """
        src = self.source(kind)
        if src is None:
            raise ValueError(f"These features hold no {kind} patch tokens.")
        return src[torch.as_tensor(idx)].to(self.dtype_of(kind))


def _logits(head: nn.Module, cls: torch.Tensor, tokens: dict) -> torch.Tensor:
    kind = getattr(head, "token_input", "raw")
    if kind == "normalized":
        return head.forward_normalized(cls, tokens[kind])
    return head(cls, tokens.get(kind))


def _token_kinds(heads: list[nn.Module]) -> set[str]:
    return {getattr(h, "token_input", "raw") for h in heads} - {None}


def _gather(heads: list[nn.Module], feats: Features, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
    """One gather per token kind the heads read: (cls (b, D), {kind: tokens (b, N, D)})."""
    return feats.cls[torch.as_tensor(idx)], {k: feats.tokens(idx, k) for k in _token_kinds(heads)}


class BatchGather:
    """Gathers the tokens of a batch of tiles into buffers allocated once and reused.

    A fresh (b, N, D) tensor per step costs more than the gather itself (the allocator
    hands back new pages that must be zero-filled: about 10 ms against 2 ms for a
    128 x 196 x 384 float32 batch on a 2-core CPU), so the training loop reuses one
    buffer per token kind. The tensors returned by a call are views of those buffers:
    they are valid until the next call.

    Args:
        feats: the features to read.
        kinds: token kinds to gather (``raw``, ``normalized``).
        max_batch: the largest batch that will be asked for.
    """

    def __init__(self, feats: Features, kinds: set[str], max_batch: int) -> None:
        self.feats, self.buffers, self.staging = feats, {}, {}
        for k in kinds:
            src = feats.source(k)
            if src is None:
                raise ValueError(f"These features hold no {k} patch tokens.")
            shape = (max_batch, *src.shape[1:])
            self.buffers[k] = torch.empty(shape, dtype=feats.dtype_of(k))
            if src.dtype != feats.dtype_of(k):
                self.staging[k] = torch.empty(shape, dtype=src.dtype)

    def __call__(self, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        """(cls (b, D), {kind: tokens (b, N, D) in ``feats.dtype_of(kind)``}) of tiles ``idx``."""
        i = torch.as_tensor(idx)
        n = len(i)
        out = {}
        for k, buf in self.buffers.items():
            src = self.feats.source(k)
            if k in self.staging:
                out[k] = buf[:n].copy_(torch.index_select(src, 0, i, out=self.staging[k][:n]))
            else:
                out[k] = torch.index_select(src, 0, i, out=buf[:n])
        return self.feats.cls[i], out


def head_logits(head: nn.Module, feats: Features, idx: np.ndarray) -> torch.Tensor:
    """Logits (b, C) of ``head`` on tiles ``idx``, feeding the token kind the head reads."""
    cls, tokens = _gather([head], feats, idx)
    return _logits(head, cls, tokens)


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Balanced class weights w_c = n / (C n_c) (as scikit-learn's ``class_weight='balanced'``)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def cosine_factor(step: int, total: int) -> float:
    """Learning-rate factor of step ``step`` of ``total``: 0.5 (1 + cos(pi min(step, total) / total))."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _adamw(head: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return adamw(head.parameters(), lr=lr, weight_decay=weight_decay)


def _stacked(heads: list[nn.Module]) -> bool:
    return len(heads) > 1 and all(isinstance(h, JWTHAttentionHead) for h in heads)


def _grid_logits(heads: list[nn.Module], cls: torch.Tensor, tokens: dict) -> list[torch.Tensor]:
    if _stacked(heads):
        # the heads' parameters are disjoint, so the gradient of the summed loss
        # w.r.t. each head equals that of its own loss
        return grid_forward_normalized(heads, cls, tokens["normalized"])
    return [_logits(h, cls, tokens) for h in heads]


def fit_heads(
    heads: list[nn.Module],
    feats: Features,
    y: np.ndarray,
    idx: np.ndarray,
    cfg: HeadTrainConfig,
    settings: list[tuple[float, float]],
    num_classes: int,
    epochs: int | None = None,
    on_epoch: Callable[[int], bool] | None = None,
) -> list[nn.Module]:
    """Train several heads side by side on the same batches (one per (lr, weight decay)).

    Each head has its own AdamW optimiser and a cosine learning-rate schedule over
    ``cfg.epochs`` epochs; the batch (and its fp16 -> fp32 conversion) is shared, as in
    CAPI's grid of probes trained on one pass over frozen features.

    Args:
        epochs: stop after this many epochs of the ``cfg.epochs`` schedule (early
            stopping: the schedule is not compressed). Default: all of them.
        on_epoch: called with the number of finished epochs; returning False stops
            training (the heads are left as they are after that epoch).

    Returns:
        The heads in eval mode.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    w = class_weights(y[idx], num_classes) if cfg.class_balanced else None
    loss_fn = nn.CrossEntropyLoss(weight=w)
    steps_per_epoch = max(1, math.ceil(len(idx) / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    n_epochs = cfg.epochs if epochs is None else min(epochs, cfg.epochs)
    opts = []
    for h, (lr, wd) in zip(heads, settings):
        opts.append((_adamw(h, lr, wd), lr))
        h.train()
    yt = torch.as_tensor(np.array(y, dtype=np.int64))
    gather = BatchGather(feats, _token_kinds(heads), cfg.batch_size)
    step = 0
    for epoch in range(n_epochs):
        perm = idx[torch.randperm(len(idx), generator=g).numpy()]
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            if len(b) < 2:  # BatchNorm statistics need two samples
                continue
            cls, tokens = gather(b)
            target = yt[torch.as_tensor(b)]
            loss = sum(loss_fn(lg, target) for lg in _grid_logits(heads, cls, tokens))
            factor = cosine_factor(step, total)
            for opt, lr in opts:
                opt.zero_grad(set_to_none=True)
                for group in opt.param_groups:
                    group["lr"] = lr * factor
            loss.backward()
            for opt, _ in opts:
                opt.step()
            step += 1
        if on_epoch is not None and not on_epoch(epoch + 1):
            break
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
    epochs: int | None = None,
) -> nn.Module:
    """Train one ``head`` on tiles ``idx`` (see :func:`fit_heads`); returns it in eval mode."""
    return fit_heads([head], feats, y, idx, cfg, [(lr, weight_decay)], num_classes, epochs=epochs)[0]


@torch.no_grad()
def grid_predict(heads: list[nn.Module], feats: Features, idx: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
    """Class probabilities (n, C) of each head for tiles ``idx``, one gather per batch for all heads.

    The heads are put in eval mode and left as they were found (train or eval).
    """
    modes = [h.training for h in heads]
    for h in heads:
        h.eval()
    gather = BatchGather(feats, _token_kinds(heads), min(batch_size, max(1, len(idx))))
    probs: list[list[np.ndarray]] = [[] for _ in heads]
    for s in range(0, len(idx), batch_size):
        cls, tokens = gather(idx[s : s + batch_size])
        for out, lg in zip(probs, _grid_logits(heads, cls, tokens)):
            out.append(lg.softmax(-1).numpy())
    for h, m in zip(heads, modes):
        h.train(m)
    return [np.concatenate(p) if p else np.zeros((0, 0)) for p in probs]


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
    """Choose (lr, weight decay) -- and with early stopping the epoch count -- on the inner split, then refit.

    The grid of (lr, weight decay) heads is trained side by side on ``fit_idx``. With
    ``cfg.patience`` > 0 each head's validation balanced accuracy is computed after
    every epoch, training stops once every head has stayed below its best for
    ``patience`` epochs, and the chosen head's best epoch E (the last epoch at its best
    value) is kept; the refit on all training tiles then
    follows the same cosine schedule (over ``cfg.epochs``) and stops after E epochs
    (early stopping on a validation split, as in eva's and DINOv2's linear
    evaluation, which keep the best validation checkpoint). With ``patience`` 0 the
    heads are scored once, after all epochs, and the refit runs all epochs.

    Args:
        make_head: zero-argument factory of a fresh head.
        fit_idx, val_idx: inner split of ``train_idx`` by patient.
        train_idx: the outer training tiles (fit + val).

    Returns:
        (head trained on ``train_idx`` with the chosen settings, info dict with the grid
        scores: ``lr``, ``weight_decay``, ``epochs`` (of the refit), ``val_bacc`` (best
        per setting), ``val_epoch`` (its epoch), ``epochs_run`` (by the grid), ``grid``).
    """
    grid = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    best_score = [-math.inf] * len(grid)
    best_epoch = [0] * len(grid)
    last_scores: list[float] = []
    epochs_run = 0
    if len(grid) > 1 or cfg.patience > 0:
        torch.manual_seed(cfg.seed)
        heads = [make_head() for _ in grid]

        def on_epoch(epoch: int) -> bool:
            nonlocal last_scores, epochs_run
            epochs_run = epoch
            if cfg.patience <= 0 and epoch < cfg.epochs:
                return True
            last_scores = [metric("bacc", y[val_idx], p) for p in grid_predict(heads, feats, val_idx)]
            for k, v in enumerate(last_scores):
                # a tie counts as an improvement: balanced accuracy moves in steps on a small
                # validation split, and a plateau at the best value is no reason to stop
                if np.isfinite(v) and v >= best_score[k]:
                    best_score[k], best_epoch[k] = float(v), epoch
            improved_at = max(best_epoch)
            return not (cfg.patience > 0 and improved_at > 0 and epoch - improved_at >= cfg.patience)

        fit_heads(heads, feats, y, fit_idx, cfg, grid, num_classes, on_epoch=on_epoch)
    scored = [s if np.isfinite(s) else -math.inf for s in best_score]
    best = int(np.argmax(scored)) if max(scored) > -math.inf else 0
    epochs = best_epoch[best] if cfg.patience > 0 and best_epoch[best] > 0 else cfg.epochs
    lr, wd = grid[best]
    head = fit_head(make_head(), feats, y, train_idx, cfg, lr, wd, num_classes, epochs=epochs)
    return head, {"lr": lr, "weight_decay": wd, "epochs": int(epochs), "epochs_run": int(epochs_run),
                  "val_bacc": [float(s) if np.isfinite(s) else float("nan") for s in best_score],
                  "val_epoch": [int(e) for e in best_epoch], "grid": grid}
