"""Gram-anchored post-training (DINOv3, Siméoni et al. 2025, sec. 4.2).

Continues a pretraining run with the same DINO + iBOT + KoLeo objective plus

    L_Gram = || X_S X_S^T - X_G X_G^T ||_F^2 / N^2   (see :class:`jwth.loss.GramLoss`)

between the L2-normalised patch tokens X_S of the student's global crops and X_G of
a *Gram teacher*: a frozen snapshot of the EMA teacher's backbone taken when
post-training starts, optionally refreshed from the EMA teacher every ``refresh_every``
steps, at most ``max_refreshes`` times. With ``teacher_resolution_scale`` s > 1 the Gram
teacher sees the same crops at s times the resolution, and its patch-token grid is
resized (bicubic) to the student's grid before normalisation. Learning rate, weight
decay and teacher momentum are constant (``posttrain.*``).

The student patch tokens are those of the (iBOT-masked) student forward that the
other losses already compute, as in DINOv3; the Gram teacher never sees masks.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from jwth.loss import GramLoss
from jwth.ssl.config import default_config, load_config, merge
from jwth.ssl.model import SSLNetwork, backbone_forward
from jwth.ssl.train import CHECKPOINT_NAME, RunResult, train


class GramAnchor:
    """The Gram-teacher state and loss hook passed to :func:`jwth.ssl.train.train`.

    Args:
        weight: w_Gram.
        refresh_every: steps between refreshes from the EMA teacher (None: never).
        max_refreshes: M, the most refreshes.
        teacher_resolution_scale: s (>= 1).
        remove_negative: :class:`GramLoss` option.
    """

    def __init__(
        self,
        weight: float = 1.0,
        refresh_every: int | None = None,
        max_refreshes: int = 0,
        teacher_resolution_scale: float = 1.0,
        remove_negative: bool = False,
    ) -> None:
        if teacher_resolution_scale < 1.0:
            raise ValueError("posttrain.gram.teacher_resolution_scale must be >= 1")
        self.weight = float(weight)
        self.refresh_every = int(refresh_every) if refresh_every else None
        self.max_refreshes = int(max_refreshes or 0)
        self.scale = float(teacher_resolution_scale)
        self.loss = GramLoss(remove_negative)
        self.gram_teacher: nn.Module | None = None
        self.refreshes = 0
        self.last_value = 0.0

    def _ensure(self, teacher: SSLNetwork) -> nn.Module:
        if self.gram_teacher is None:
            self.gram_teacher = copy.deepcopy(teacher.backbone).eval()
            for p in self.gram_teacher.parameters():
                p.requires_grad_(False)
        return self.gram_teacher

    @torch.no_grad()
    def maybe_refresh(self, step: int, teacher: SSLNetwork) -> bool:
        """Copy the EMA teacher into the Gram teacher when the schedule says so."""
        if (
            self.refresh_every
            and step > 0
            and step % self.refresh_every == 0
            and self.refreshes < self.max_refreshes
        ):
            self._ensure(teacher).load_state_dict(teacher.backbone.state_dict())
            self.refreshes += 1
            return True
        return False

    def __call__(
        self, step: int, batch: dict[str, torch.Tensor], student_global_patches: torch.Tensor, teacher: SSLNetwork
    ) -> torch.Tensor:
        """w_Gram * L_Gram for this step.

        Args:
            step: global step.
            batch: the loader batch; ``global`` (B, G, 3, S, S) and, when s > 1,
                ``global_hr`` (B, G, 3, S', S').
            student_global_patches: student patch tokens of the global crops, (G*B, N, D)
                in view-major order.
            teacher: the EMA teacher network.
        """
        gt = self._ensure(teacher)
        self.maybe_refresh(step, teacher)
        x = batch["global_hr"] if (self.scale > 1 and "global_hr" in batch) else batch["global"]
        b, g = x.shape[:2]
        x = x.transpose(0, 1).reshape(b * g, *x.shape[2:])
        with torch.no_grad():
            out = backbone_forward(gt, x)
            feats = out.patches
            n_s = student_global_patches.shape[1]
            h = w = int(round(n_s**0.5))
            if out.grid != (h, w):
                d = feats.shape[-1]
                f = feats.float().transpose(1, 2).reshape(b * g, d, *out.grid)
                f = F.interpolate(f, size=(h, w), mode="bicubic", align_corners=False)
                feats = f.reshape(b * g, d, h * w).transpose(1, 2)
        val = self.loss(student_global_patches, feats)
        self.last_value = float(val.detach())
        return self.weight * val

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.gram_teacher is None:
            return {}
        return {f"gram_teacher/{k}": v for k, v in self.gram_teacher.state_dict().items()}

    def meta(self) -> dict:
        return {"gram_refreshes": self.refreshes}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        sd = {k[len("gram_teacher/") :]: v for k, v in tensors.items() if k.startswith("gram_teacher/")}
        self.refreshes = int(meta.get("gram_refreshes", 0))
        if sd:
            self._pending = sd

    def bind(self, teacher: SSLNetwork) -> None:
        """Create the Gram teacher now (from the EMA teacher or a resumed snapshot)."""
        gt = self._ensure(teacher)
        sd = getattr(self, "_pending", None)
        if sd:
            gt.load_state_dict(sd)
            self._pending = None


def posttrain(
    from_run: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    config: str | Path | None = None,
) -> RunResult:
    """Post-train a pretraining run with Gram anchoring.

    Args:
        from_run: pretraining run folder (with ``config.yaml`` and
            ``checkpoint.safetensors``).
        data_dir: tile folder.
        out_dir: post-training run folder (resumed if it holds a checkpoint).
        overrides: ``key=value`` config overrides (e.g. ``posttrain.gram.loss_weight=2``).
        config: optional YAML merged over the pretraining run's config.

    Returns:
        :class:`jwth.ssl.train.RunResult`; the post-trained encoder is in ``out_dir/encoder``.

    Raises:
        FileNotFoundError: ``from_run`` lacks config.yaml or the checkpoint.
    """
    import yaml

    run = Path(from_run)
    cfg_file, ckpt = run / "config.yaml", run / CHECKPOINT_NAME
    for f in (cfg_file, ckpt):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: --from must be a `jwth pretrain` run folder.")
    # a run written by an older version lacks newer keys (e.g. monitor): take their defaults
    base = merge(default_config(), yaml.safe_load(cfg_file.read_text()) or {})
    cfg = load_config(config, overrides, base=base)
    cfg["model"]["init"] = None  # weights come from the run's checkpoint
    gc = cfg["posttrain"]["gram"]
    anchor = GramAnchor(
        gc["loss_weight"], gc.get("refresh_every"), gc.get("max_refreshes", 0),
        gc.get("teacher_resolution_scale", 1.0), gc.get("remove_negative", False),
    )  # fmt: skip
    return train(
        cfg, data_dir, out_dir, phase="posttrain", init_from=ckpt, extra_loss=_Bound(anchor),
        gram_scale=float(gc.get("teacher_resolution_scale", 1.0)),
    )  # fmt: skip


class _Bound:
    """Adapter that binds the Gram teacher lazily to the (possibly resumed) teacher."""

    def __init__(self, anchor: GramAnchor) -> None:
        self.anchor = anchor
        self._bound = False

    def __call__(self, step, batch, student_global_patches, teacher):
        if not self._bound:
            self.anchor.bind(teacher)
            self._bound = True
        return self.anchor(step, batch, student_global_patches, teacher)

    def state_tensors(self):
        return self.anchor.state_tensors()

    def meta(self):
        return self.anchor.meta()

    def load(self, tensors, meta):
        self.anchor.load(tensors, meta)
