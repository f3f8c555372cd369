"""Training an encoder + head on tile images with early stopping on a patient-level split.

Loss: class-balanced cross-entropy (weights n / (C n_c) of the fit tiles, as the
probe). Optimiser: AdamW, two parameter groups (head at ``lr``, encoder at
``encoder_lr``), cosine schedule over the maximum number of steps, gradient-norm
clipping. After each epoch the validation tiles (training patients held out by
:func:`jwth.eval.splits.inner_split`) are scored; the epoch with the best validation
balanced accuracy (ties: lower validation loss) is restored at the end, and training
stops after ``patience`` epochs without improvement (Prechelt, "Early Stopping -- But
When?", 1998).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from jwth.augment import StainAugmentConfig, stain_augment
from jwth.data.tiles import load_tile
from jwth.device import adamw, autocast, resolve_precision
from jwth.eval.metrics import metric
from jwth.eval.train import class_weights
from jwth.finetune.model import FinetuneModel, load_trainable_state, trainable_state

#: encoder learning rate per method when ``encoder_lr`` is not given
DEFAULT_ENCODER_LR = {"full": 1e-5, "last-blocks": 5e-5, "lora": 5e-4}
AUGMENTATIONS = ("flip", "stain")


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (saved in config.yaml).

    Attributes:
        method: ``full``, ``lora`` or ``last-blocks``.
        head: ``attention`` (JWTH attention pooling) or ``linear``.
        last_blocks: k for ``last-blocks``.
        lora_rank, lora_alpha, lora_targets, lora_dropout: LoRA settings (alpha None = 2 r).
        epochs: maximum epochs per fold.
        patience: epochs without a better validation score before stopping (0 = never stop early).
        batch_size: tiles per optimiser step.
        lr: head learning rate; encoder_lr: encoder (or LoRA) learning rate, None = per method
            (:data:`DEFAULT_ENCODER_LR`).
        weight_decay: AdamW weight decay (all trainable parameters).
        max_grad_norm: gradient-norm clip (0 = off).
        augment: subset of ``flip`` (random flips / 90° rotations) and ``stain``
            (:func:`jwth.augment.stain_augment`), training tiles only.
        stain_strength: strength of the stain augmentation.
        num_heads, dropout: head settings.
        class_balanced: class-balanced cross-entropy.
        eval_batch_size: tiles per inference batch.
        preload_bytes: decode all tiles once into memory (uint8) when they fit in this budget.
        threads: torch CPU threads (0 = torch default).
    """

    method: str = "lora"
    head: str = "attention"
    last_blocks: int = 2
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])
    lora_dropout: float = 0.0
    epochs: int = 10
    patience: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    encoder_lr: float | None = None
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    augment: list[str] = field(default_factory=list)
    stain_strength: float = 1.0
    num_heads: int = 8
    dropout: float = 0.0
    class_balanced: bool = True
    eval_batch_size: int = 64
    preload_bytes: float = 2e9
    threads: int = 0

    def resolved_encoder_lr(self) -> float:
        return float(self.encoder_lr if self.encoder_lr is not None else DEFAULT_ENCODER_LR.get(self.method, 1e-4))

    def check(self) -> None:
        """Raise ValueError on settings that cannot run (named, with the valid range)."""
        bad = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad:
            raise ValueError(f"Unknown augmentation(s) {bad}; choose from {', '.join(AUGMENTATIONS)}.")
        if self.epochs < 1 or self.batch_size < 2 or self.patience < 0:
            raise ValueError(
                f"epochs={self.epochs}, batch_size={self.batch_size}, patience={self.patience}: need epochs >= 1, "
                "batch size >= 2 (the heads standardise with batch statistics) and patience >= 0."
            )

    def to_dict(self) -> dict:
        return asdict(self)


class TileImages(torch.utils.data.Dataset):
    """Tiles as uint8 tensors (3, S, S) at the encoder's input size.

    Resized (bicubic, shorter side) and centre-cropped exactly as
    :pyattr:`jwth.encoders.Encoder.transform`, before normalisation, so that
    augmentation can work on 8-bit colours. ``__getitem__(i)`` returns ``(image, i)``.

    Args:
        root: data set folder; paths: tile paths relative to it; size: S in px.
    """

    def __init__(self, root: Path, paths: list[str], size: int) -> None:
        from torchvision import transforms as T

        self.root, self.paths, self.size = Path(root), list(paths), int(size)
        self._tf = T.Compose(
            [T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(self.size), T.PILToTensor()]
        )
        self.data: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, i: int) -> torch.Tensor:
        img, _ = load_tile(self.root / self.paths[i])
        return self._tf(img)

    def __getitem__(self, i: int):
        return (self.data[i] if self.data is not None else self.decode(i)), i

    def preload(self, budget_bytes: float, progress: Callable[[int], None] | None = None) -> bool:
        """Decode every tile once into memory when (T, 3, S, S) uint8 fits ``budget_bytes``; True if done."""
        if len(self) * 3 * self.size**2 > budget_bytes:
            return False
        data = torch.empty((len(self), 3, self.size, self.size), dtype=torch.uint8)
        for i in range(len(self)):
            data[i] = self.decode(i)
            if progress:
                progress(1)
        self.data = data
        return True


def batches(images: TileImages, idx: np.ndarray, batch_size: int, num_workers: int = 0):
    """Yield (uint8 images (b, 3, S, S), tile indices (b,)) over ``idx`` in the given order."""
    sub = torch.utils.data.Subset(images, [int(i) for i in idx])
    workers = 0 if images.data is not None else num_workers
    loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=workers)
    for x, i in loader:
        yield x, i.numpy()


def random_dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random flips and transposition of square images (B, C, S, S): the 8 symmetries of the square."""
    n = x.shape[0]
    m = torch.rand(n, 3, generator=generator).to(x.device) < 0.5
    x = torch.where(m[:, 0, None, None, None], x.flip(-1), x)
    x = torch.where(m[:, 1, None, None, None], x.flip(-2), x)
    return torch.where(m[:, 2, None, None, None], x.transpose(-1, -2), x)


def prepare(
    x: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    augment: list[str] = (),
    stain: StainAugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 tiles (B, 3, S, S) -> augmented, normalised float32 (B, 3, S, S) on ``device``."""
    x = x.to(device, non_blocking=True)
    if "flip" in augment:
        x = random_dihedral(x, generator)
    if "stain" in augment:
        x = stain_augment(x, stain, generator)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


@torch.no_grad()
def evaluate(
    model: FinetuneModel, images: TileImages, idx: np.ndarray, cfg: FinetuneConfig, device: torch.device,
    precision: str = "auto", num_workers: int = 0, keep_attention: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (n, C) of tiles ``idx`` (and head-averaged attention (n, N) if asked)."""
    model.eval()
    enc = model.encoder
    probs, attn = [], []
    for x, _ in batches(images, idx, cfg.eval_batch_size, num_workers):
        with autocast(device, precision):  # type: ignore[arg-type]
            logits, a = model.forward_with_attention(prepare(x, enc.mean, enc.std, device))
        probs.append(logits.float().softmax(-1).cpu().numpy())
        if keep_attention and a is not None:
            attn.append(a.float().cpu().numpy())
    return np.concatenate(probs), (np.concatenate(attn) if attn else None)


def weighted_nll(prob: np.ndarray, y: np.ndarray, weights: np.ndarray | None) -> float:
    """Class-weighted mean negative log-likelihood, as ``nn.CrossEntropyLoss(weight=w)`` (mean reduction)."""
    w = np.ones(len(y)) if weights is None else np.asarray(weights)[y]
    nll = -np.log(np.clip(prob[np.arange(len(y)), y], 1e-12, None))
    return float((w * nll).sum() / w.sum())


class EarlyStopping:
    """Keep the best epoch's trainable state; stop after ``patience`` epochs without improvement.

    An epoch improves when its score is higher, or equal with a lower loss. ``patience=0``
    never stops early (the best epoch is still restored).
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_epoch = -1
        self.best_score = -math.inf
        self.best_loss = math.inf
        self.best_state: dict | None = None
        self.bad_epochs = 0

    def step(self, epoch: int, score: float, loss: float, model: nn.Module) -> bool:
        """Record one epoch; returns True when training should stop."""
        score = -math.inf if not np.isfinite(score) else score
        if score > self.best_score or (score == self.best_score and loss < self.best_loss):
            self.best_epoch, self.best_score, self.best_loss = epoch, score, loss
            self.best_state = trainable_state(model)
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            load_trainable_state(model, self.best_state)


def fit(
    model: FinetuneModel,
    images: TileImages,
    y: np.ndarray,
    fit_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: FinetuneConfig,
    device: torch.device,
    precision: str = "auto",
    seed: int = 0,
    num_workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Train ``model`` on tiles ``fit_idx``, early-stopping on ``val_idx``; restores the best epoch.

    Args:
        model: encoder + head with trainable parameters set (:func:`configure_trainable`).
        images: all tiles; y: class index per tile (T,).
        fit_idx, val_idx: inner patient-level split of the fold's training tiles.
        cfg: settings; device / precision: where and in which autocast dtype to train
            (fp16 on CUDA uses a gradient scaler).
        on_batch: called with the batch size after each optimiser step (progress bars).

    Returns:
        ``{"curve": [{"epoch", "train_loss", "val_loss", "val_bacc", "seconds"}], "best_epoch",
        "epochs_run", "train_seconds", "train_tiles", "train_tiles_per_s", "train_cpu_seconds"}``
        (seconds of wall time; ``train_cpu_seconds`` is this process's CPU time, which does not
        grow when other jobs share the CPU).
    """
    w = class_weights(y[fit_idx], model.head.fc.out_features) if cfg.class_balanced else None
    loss_fn = nn.CrossEntropyLoss(weight=None if w is None else w.to(device))
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": cfg.lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg.resolved_encoder_lr()})
    opt = adamw(groups, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, math.ceil(len(fit_idx) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    dtype = resolve_precision(device, precision)  # type: ignore[arg-type]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    stain = StainAugmentConfig(strength=cfg.stain_strength)
    g = torch.Generator().manual_seed(seed)
    stopper = EarlyStopping(cfg.patience)
    trainable = head_params + enc_params
    enc = model.encoder
    curve, train_s, cpu_s, seen = [], 0.0, 0.0, 0
    for epoch in range(cfg.epochs):
        t0, c0 = time.time(), time.process_time()
        model.train()
        order = fit_idx[torch.randperm(len(fit_idx), generator=g).numpy()]
        total, n = 0.0, 0
        for x, i in batches(images, order, cfg.batch_size, num_workers):
            if len(i) < 2:  # batch statistics of the head need two samples
                continue
            xb = prepare(x, enc.mean, enc.std, device, cfg.augment, stain, g)
            yb = torch.as_tensor(y[i], device=device)
            with autocast(device, precision):  # type: ignore[arg-type]
                loss = loss_fn(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.max_grad_norm > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item() * len(i)
            n += len(i)
            if on_batch:
                on_batch(len(i))
        train_s += time.time() - t0
        cpu_s += time.process_time() - c0
        seen += n
        p, _ = evaluate(model, images, val_idx, cfg, device, precision, num_workers)
        val_loss = weighted_nll(p, y[val_idx], None if w is None else w.numpy())
        val_bacc = metric("bacc", y[val_idx], p)
        curve.append({"epoch": epoch, "train_loss": total / max(n, 1), "val_loss": val_loss,
                      "val_bacc": float(val_bacc), "seconds": round(time.time() - t0, 2)})
        if stopper.step(epoch, val_bacc, val_loss, model):
            break
    stopper.restore(model)
    model.eval()
    return {
        "curve": curve,
        "best_epoch": stopper.best_epoch,
        "epochs_run": len(curve),
        "train_seconds": round(train_s, 2),
        "train_tiles": seen,
        "train_tiles_per_s": round(seen / max(train_s, 1e-9), 2),
        "train_cpu_seconds": round(cpu_s, 2),  # CPU time of this process: throughput on a shared machine
    }


__all__ = [
    "AUGMENTATIONS",
    "DEFAULT_ENCODER_LR",
    "EarlyStopping",
    "FinetuneConfig",
    "TileImages",
    "evaluate",
    "fit",
    "prepare",
    "random_dihedral",
    "weighted_nll",
]
