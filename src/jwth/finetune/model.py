"""An encoder and a head trained together: full fine-tuning, LoRA, or the last k blocks.

Methods (``method``):

- ``full``: every encoder parameter and the head are trained.
- ``lora``: the encoder weights stay frozen (bit-identical); trainable low-rank
  updates W + (alpha / r) B A are added to the named linear layers (default: the
  fused attention projection ``qkv`` of timm ViTs, i.e. W_q, W_k and W_v), through
  peft. LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
  arXiv:2106.09685 (2021), eq. 3; B starts at zero, so the model starts as the
  frozen encoder.
- ``last-blocks``: exactly the last k transformer blocks and the head are trained
  ("partial fine-tuning", He et al., MAE, CVPR 2022, Sec. 5). The final LayerNorm stays
  frozen: its affine scale and shift are absorbed by the head (the class token is
  standardised, the patch tokens pass a LayerNorm and linear projections).

The head is a :mod:`jwth.heads` head (``linear`` or the JWTH ``attention`` head) fed
with the class token (B, D) and the patch tokens (B, N, D) of the encoder; register
tokens are never pooled.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from jwth.encoders import Encoder
from jwth.heads import build_head

Method = Literal["full", "lora", "last-blocks"]
METHODS: tuple[str, ...] = ("full", "lora", "last-blocks")
FINETUNE_HEADS: tuple[str, ...] = ("linear", "attention")


class FinetuneModel(nn.Module):
    """Encoder + head, end to end: images (B, 3, H, W) -> logits (B, C).

    Args:
        encoder: a :class:`jwth.encoders.Encoder` (its weights are trained in place
            for ``full`` / ``last-blocks``).
        head: ``linear`` or ``attention`` (see :mod:`jwth.heads`).
        num_classes: C.
        num_heads, dropout: head settings (attention heads, dropout on the fused vector).

    Raises:
        ValueError: an unknown head or one not supported for fine-tuning.
    """

    def __init__(self, encoder: Encoder, head: str, num_classes: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if head not in FINETUNE_HEADS:
            raise ValueError(f"Head {head!r} cannot be fine-tuned; choose from {', '.join(FINETUNE_HEADS)}.")
        self.encoder = encoder
        self.head_name = head
        self.head = build_head(head, encoder.embed_dim, num_classes, num_heads, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of normalised images x (B, 3, H, W)."""
        t = self.encoder.encode(x)
        return self.head(t.cls.float(), t.patches.float())

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, C), head-averaged class-token attention (B, N) or None for the linear head)."""
        logits = self(x)
        a = getattr(self.head, "last_attention", None)
        return logits, (a.mean(1) if a is not None else None)


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a timm ViT (``blocks``) or a Hugging Face ViT (``encoder.layer``)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None and hasattr(model, "encoder"):
        blocks = getattr(model.encoder, "layer", None)
    if blocks is None:
        raise ValueError(
            f"{type(model).__name__} has no transformer blocks (.blocks or .encoder.layer); "
            "--method last-blocks needs a ViT; use --method full or lora."
        )
    return blocks


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the nn.Linear layers in ``model`` (LoRA target candidates)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def configure_trainable(
    model: FinetuneModel,
    method: str,
    last_blocks: int = 2,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
    lora_dropout: float = 0.0,
) -> dict:
    """Set which parameters of ``model`` train for ``method`` (in place); the head always trains.

    Args:
        model: a fresh :class:`FinetuneModel`.
        method: ``full``, ``lora`` or ``last-blocks``.
        last_blocks: k for ``last-blocks`` (1 <= k <= number of blocks).
        lora_rank: r of the LoRA update (>= 1).
        lora_alpha: LoRA scale numerator (update scaled by alpha / r); default 2 r.
        lora_targets: last name components of the linear layers to adapt (default
            ``["qkv"]``, the fused attention projection of timm ViTs; ``query,value`` for
            Hugging Face ViTs).
        lora_dropout: dropout on the LoRA input.

    Returns:
        ``{"method", "trainable_params", "total_params", ...}``; for LoRA also rank, alpha
        and targets, for last-blocks the k and the block count.

    Raises:
        ValueError: unknown method, k out of range, rank < 1, or LoRA targets that match
            no linear layer (the message lists the candidates).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown fine-tuning method {method!r}; choose from {', '.join(METHODS)}.")
    backbone = model.encoder.model
    backbone.requires_grad_(method == "full")
    info: dict = {"method": method}
    if method == "last-blocks":
        blocks = _blocks(backbone)
        if not 1 <= last_blocks <= len(blocks):
            raise ValueError(f"--last-blocks {last_blocks}: the encoder has {len(blocks)} blocks; choose 1..{len(blocks)}.")
        for b in blocks[len(blocks) - last_blocks :]:
            b.requires_grad_(True)
        info.update(last_blocks=last_blocks, num_blocks=len(blocks))
    elif method == "lora":
        if lora_rank < 1:
            raise ValueError(f"--lora-rank {lora_rank}: the rank must be >= 1.")
        targets = list(lora_targets or ["qkv"])
        candidates = linear_module_names(backbone)
        unknown = [t for t in targets if t not in candidates]
        if unknown:
            raise ValueError(
                f"LoRA targets {unknown} match no linear layer of encoder {model.encoder.spec!r}; "
                f"its linear layers are named {candidates} (pass e.g. --lora-targets qkv,proj)."
            )
        from peft import LoraConfig, inject_adapter_in_model

        alpha = float(lora_alpha if lora_alpha is not None else 2 * lora_rank)
        cfg = LoraConfig(r=lora_rank, lora_alpha=alpha, target_modules=targets, lora_dropout=lora_dropout, bias="none")
        model.encoder.model = inject_adapter_in_model(cfg, backbone)  # freezes the base weights, B = 0
        info.update(lora_rank=lora_rank, lora_alpha=alpha, lora_targets=targets, lora_dropout=lora_dropout)
    model.head.requires_grad_(True)
    info["trainable_params"] = count_params(model, trainable=True)
    info["total_params"] = count_params(model)
    return info


def count_params(model: nn.Module, trainable: bool = False) -> int:
    """Number of parameters of ``model`` (only those with requires_grad when ``trainable``)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters and all buffers (what changes while training)."""
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
    return state


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` back into ``model`` (e.g. to restore the best epoch)."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    with torch.no_grad():
        for n, t in state.items():
            own[n].copy_(t)


__all__ = [
    "FINETUNE_HEADS",
    "METHODS",
    "FinetuneModel",
    "configure_trainable",
    "count_params",
    "linear_module_names",
    "load_trainable_state",
    "trainable_state",
]
