"""Student and teacher networks: a timm ViT backbone plus DINO/iBOT heads.

The backbone forward mirrors timm's ``VisionTransformer.forward_features`` with one
addition needed by iBOT (Zhou et al. 2022, sec. 3.2): patch embeddings of masked
positions are replaced by a learnable mask token *before* position embeddings are
added. Backbones are built with ``dynamic_img_size=True`` so global (e.g. 224 px) and
local (96 px) crops go through the same weights (position embeddings resampled).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from jwth.ssl.heads import DINOHead


@dataclass
class BackboneOut:
    """cls (B, D), patches (B, N, D), prefix (B, 1 + R, D) and the grid (h, w)."""

    cls: torch.Tensor
    patches: torch.Tensor
    prefix: torch.Tensor
    grid: tuple[int, int]


def enable_dynamic_size(model: nn.Module) -> nn.Module:
    """Let a timm ViT built for a fixed size accept any multiple of its patch size."""
    from timm.layers import Format

    model.dynamic_img_size = True
    pe = model.patch_embed
    pe.strict_img_size = False
    pe.flatten = False
    pe.output_fmt = Format.NHWC
    return model


def backbone_forward(
    model: nn.Module,
    x: torch.Tensor,
    masks: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> BackboneOut:
    """Tokens of a timm VisionTransformer, with optional iBOT mask-token substitution.

    Args:
        model: timm ``VisionTransformer`` with a class token, built with
            ``dynamic_img_size=True`` (see :func:`enable_dynamic_size`).
        x: normalised images (B, 3, H, W), H and W multiples of the patch size.
        masks: boolean (B, N) with N = (H / p) * (W / p); True = replace by mask token.
        mask_token: (1, D) learnable embedding used where ``masks`` is True.

    Returns:
        :class:`BackboneOut` (after the final norm).

    Raises:
        ValueError: the model has no class token, or masks given without a mask token.
    """
    if getattr(model, "cls_token", None) is None:
        raise ValueError("SSL pretraining needs a ViT with a class token (class_token=True).")
    t = model.patch_embed(x)
    if t.ndim == 4:
        b, h, w, d = t.shape
    else:  # pragma: no cover - non-dynamic models
        b, n, d = t.shape
        h, w = model.patch_embed.grid_size
    if masks is not None:
        if mask_token is None:
            raise ValueError("masks given without a mask_token")
        flat = t.reshape(b, h * w, d)
        flat = torch.where(masks[..., None], mask_token.to(flat.dtype).view(1, 1, d), flat)
        t = flat.view(b, h, w, d) if t.ndim == 4 else flat
    t = model._pos_embed(t)
    t = model.patch_drop(t)
    t = model.norm_pre(t)
    t = model.blocks(t)
    t = model.norm(t)
    p = model.num_prefix_tokens
    return BackboneOut(cls=t[:, 0], patches=t[:, p:], prefix=t[:, :p], grid=(h, w))


class SSLNetwork(nn.Module):
    """Backbone + DINO head (+ optional separate iBOT head) + mask token.

    The teacher is a deep copy of the student (:meth:`make_teacher`), kept in eval mode
    and updated only by EMA.
    """

    def __init__(self, backbone: nn.Module, dino_head: DINOHead, ibot_head: DINOHead | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dino_head = dino_head
        self.ibot_head = ibot_head
        d = backbone.num_features
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def head_scores(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototype scores of class tokens (DINO head) and masked patch tokens (iBOT head).

        Two head calls, not one on the concatenation: slicing a (rows x K) output would make
        backward build and add two zero-filled gradients of its full size. With a shared head
        the weight-normalised prototype matrix (K x bottleneck) is computed once for both
        (``torch.nn.utils.parametrize.cached``), in forward and in backward.

        Args:
            cls: class tokens, shape (B_cls, D).
            patches: patch tokens, shape (M, D).

        Returns:
            Scores (B_cls, K_dino) and (M, K_ibot).
        """
        with nn.utils.parametrize.cached():
            return self.dino_head(cls), self.patch_head(patches)

    def make_teacher(self) -> "SSLNetwork":
        """A frozen copy without stochastic depth (drop path disabled by eval mode)."""
        t = copy.deepcopy(self)
        for p in t.parameters():
            p.requires_grad_(False)
        return t.eval()

    def ema_pairs(self, teacher: "SSLNetwork") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher params, student params) in matching order, mask token excluded."""
        s = dict(self.named_parameters())
        t = dict(teacher.named_parameters())
        names = [n for n in s if n != "mask_token"]
        return [t[n] for n in names], [s[n] for n in names]


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor], momentum: float) -> None:
    """theta_t <- m * theta_t + (1 - m) * theta_s (Caron et al. 2021, sec. 3.1)."""
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, [p.detach() for p in student_params], alpha=1.0 - momentum)


def build_backbone(cfg: dict) -> tuple[nn.Module, dict]:
    """Create the student backbone from ``cfg['model']``.

    Returns:
        (model, model_args) where model_args reproduce the architecture with
        ``timm.create_model(cfg['model']['arch'], **model_args)``.

    Raises:
        ValueError: unknown timm architecture or no class token.
    """
    import timm

    mc = cfg["model"]
    arch = mc["arch"]
    if not timm.is_model(arch):
        raise ValueError(f"Unknown timm model {arch!r} (model.arch).")
    model_args = {"img_size": int(cfg["crops"]["global_crops_size"]), "dynamic_img_size": True}
    model_args.update(dict(mc.get("kwargs") or {}))
    init = mc.get("init")
    if init:
        from jwth.encoders import load_encoder

        enc = load_encoder(str(init))
        model = enc.model
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        enable_dynamic_size(model)
        import json
        from pathlib import Path

        cfg_file = None
        if str(init).startswith("jwth:"):
            from jwth.encoders import CHECKPOINT_DIR

            cfg_file = CHECKPOINT_DIR / str(init)[5:] / "config.json"
        elif Path(str(init)).expanduser().is_dir():
            cfg_file = Path(str(init)).expanduser() / "config.json"
        if cfg_file is not None and cfg_file.is_file():
            saved = json.loads(cfg_file.read_text())
            arch = saved.get("architecture", arch)
            model_args = {**saved.get("model_args", {}), "dynamic_img_size": True}
        model_args["_arch"] = arch
        if mc.get("drop_path_rate"):
            _set_drop_path(model, float(mc["drop_path_rate"]))
        model = model.float()
    else:
        model = timm.create_model(
            arch, pretrained=False, num_classes=0, drop_path_rate=float(mc.get("drop_path_rate") or 0.0), **model_args
        )
        model_args["_arch"] = arch
    if getattr(model, "cls_token", None) is None:
        raise ValueError(f"{arch!r} has no class token; SSL pretraining needs one.")
    return model, model_args


def _set_drop_path(model: nn.Module, rate: float) -> None:
    from timm.layers import DropPath

    depth = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        r = rate * i / max(depth - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())


def build_network(cfg: dict) -> tuple[SSLNetwork, dict]:
    """Student :class:`SSLNetwork` and the backbone's model_args (see :func:`build_backbone`)."""
    backbone, model_args = build_backbone(cfg)
    d = backbone.num_features
    dc, ic = cfg["dino"], cfg["ibot"]
    dino_head = DINOHead(d, dc["head_n_prototypes"], dc["head_hidden_dim"], dc["head_bottleneck_dim"], dc["head_nlayers"])
    ibot_head = None
    if ic["separate_head"]:
        ibot_head = DINOHead(d, ic["head_n_prototypes"], ic["head_hidden_dim"], ic["head_bottleneck_dim"], ic["head_nlayers"])
    return SSLNetwork(backbone, dino_head, ibot_head), model_args
