"""Token encoders: one wrapper that exposes class, register and patch tokens.

Every encoder returns :class:`Tokens` -- the class token (B, D), register tokens
(B, R, D) and patch tokens (B, N, D) with the token grid (h, w), N = h * w. Register
tokens (Darcet et al., "Vision Transformers Need Registers", ICLR 2024) are neither
class nor patch tokens and are never pooled as patches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Tokens:
    """Output tokens of a ViT forward pass.

    Attributes:
        cls: class token, (B, D).
        registers: register tokens, (B, R, D); R may be 0.
        patches: patch tokens, (B, N, D), row-major over ``grid``.
        grid: token grid (h, w) with h * w == N.
    """

    cls: torch.Tensor
    registers: torch.Tensor
    patches: torch.Tensor
    grid: tuple[int, int]


def state_dict_hash(module: nn.Module) -> str:
    """SHA-256 (hex, first 16 chars) over the names, shapes and bytes of a state dict."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_input_size(model: nn.Module, input_size: int, spec: str) -> None:
    """Refuse, when the spec is loaded, a model that could not run on the square tiles the
    transform makes (``input_size`` x ``input_size`` px): a non-square ``img_size`` (timm would
    build it, then the transform crops tiles square and the forward pass fails an assertion),
    or a fixed ``img_size`` other than ``input_size``.

    Raises:
        ValueError: naming the spec, the sizes and the fix.
    """
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        return
    h, w = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    if h != w:
        raise ValueError(
            f"Encoder {spec!r} is built for {h} x {w} px inputs, but tiles are square ({input_size} x "
            f"{input_size} px after the transform), so its forward pass would fail. Give one size, e.g. "
            f"img_size={max(h, w)}.")
    fixed = getattr(pe, "strict_img_size", True) and not getattr(model, "dynamic_img_size", False)
    if fixed and h != input_size:
        raise ValueError(
            f"Encoder {spec!r}: the model takes {h} x {h} px inputs but its input size (transform) is "
            f"{input_size} px; make them agree (img_size or the checkpoint's pretrained_cfg input_size).")


class Encoder(nn.Module):
    """A frozen ViT that returns class, register and patch tokens.

    Args:
        model: a timm ``VisionTransformer`` (or a module with the same
            ``forward_features`` / ``num_prefix_tokens`` contract).
        spec: the encoder spec string it was built from.
        mean, std: RGB normalisation for inputs in [0, 1].
        input_size: tile side in px the model expects.
        mpp: tile resolution the model was trained at (µm/px), None if unknown.
        random_init: True when the weights are a random initialisation.
        weights_hash: identifier of the weights (file hash or state-dict hash).
        forward_fn: optional override returning the full token sequence
            (B, 1 + R + N, D) for non-timm backbones.

    Raises:
        ValueError: the model has no class token.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int,
        mpp: float | None = None,
        random_init: bool = False,
        weights_hash: str | None = None,
        num_registers: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        forward_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.spec = spec
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_size = int(input_size)
        self.mpp = mpp
        self.random_init = random_init
        self._forward_fn = forward_fn
        if forward_fn is None and getattr(model, "cls_token", None) is None:
            raise ValueError(
                f"Encoder {spec!r} has no class token (global_pool without a cls token); "
                "JWTH attention pooling needs one."
            )
        if forward_fn is None:
            _check_input_size(model, self.input_size, spec)
        self.num_registers = int(
            num_registers if num_registers is not None else getattr(model, "num_reg_tokens", 0)
        )
        self.num_prefix_tokens = 1 + self.num_registers
        if patch_size is None:
            ps = model.patch_embed.patch_size
            patch_size = ps[0] if isinstance(ps, (tuple, list)) else int(ps)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim if embed_dim is not None else model.num_features)
        self.weights_hash = weights_hash or state_dict_hash(self.model)

    @property
    def transform(self) -> Callable:
        """PIL RGB image -> normalised float tensor (3, input_size, input_size).

        Tiles of another size are resized (bicubic, shorter side) and centre-cropped;
        callers that care about resolution count them (see ``jwth.data.tiles``).
        """
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.input_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.input_size),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def transform_description(self) -> dict:
        """A JSON-able description of :pyattr:`transform` (stored in cache manifests)."""
        return {
            "resize": self.input_size,
            "interpolation": "bicubic",
            "center_crop": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an input of ``height`` x ``width`` px."""
        return height // self.patch_size, width // self.patch_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Tokens:
        """Encode a batch without gradients (the frozen encoder); see :meth:`encode`."""
        return self.encode(x)

    def encode(self, x: torch.Tensor) -> Tokens:
        """Encode a batch, keeping the autograd graph (used by fine-tuning).

        Args:
            x: normalised images, (B, 3, H, W), H and W multiples of the patch size.

        Returns:
            :class:`Tokens` with cls (B, D), registers (B, R, D), patches (B, N, D).

        Raises:
            ValueError: x is not (B, 3, H, W) or the token count does not match the grid.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Expected images of shape (B, 3, H, W), got {tuple(x.shape)}.")
        feats = self._forward_fn(x) if self._forward_fn is not None else self.model.forward_features(x)
        grid = self.grid_for(x.shape[-2], x.shape[-1])
        n = grid[0] * grid[1]
        if feats.shape[1] != self.num_prefix_tokens + n:
            raise ValueError(
                f"Encoder {self.spec!r} returned {feats.shape[1]} tokens; expected "
                f"1 class + {self.num_registers} register + {n} patch tokens for a "
                f"{x.shape[-2]}x{x.shape[-1]} input."
            )
        return Tokens(
            cls=feats[:, 0],
            registers=feats[:, 1 : self.num_prefix_tokens],
            patches=feats[:, self.num_prefix_tokens :],
            grid=grid,
        )

    def describe(self) -> dict:
        """JSON-able summary (stored in configs and manifests)."""
        return {
            "spec": self.spec,
            "embed_dim": self.embed_dim,
            "num_registers": self.num_registers,
            "patch_size": self.patch_size,
            "input_size": self.input_size,
            "mpp": self.mpp,
            "random_init": self.random_init,
            "weights_hash": self.weights_hash,
        }
