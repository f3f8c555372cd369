"""The encoder's own class-token attention in its last transformer block.

For a timm Vision Transformer (Dosovitskiy et al., ICLR 2021), the last block's
self-attention computes, per head h,

    A_h = softmax(q_h k_h^T / sqrt(d)),  q_h, k_h = the block's qkv projection of its input

(Vaswani et al. 2017, eq. 1). Row 0 of A_h is what the class token reads: its weights
over the class token itself, the register tokens and the patch tokens. This module
captures the last block's input with a forward pre-hook during the ordinary forward
pass and recomputes that row, so the tokens and the attention come from one pass.
The weights are returned over the patch tokens only, renormalised to sum to 1, so
they are comparable with JWTH attention pooling (which never attends to the class
or register tokens) and with uniform attention 1/N.
"""

from __future__ import annotations

import torch

from jwth.encoders.base import Encoder, Tokens


def _last_attention(encoder: Encoder) -> torch.nn.Module:
    blocks = getattr(encoder.model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if attn is None or not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale")):
        raise ValueError(
            f"Encoder {encoder.spec!r} is not a timm ViT with a standard attention block "
            "(blocks[-1].attn.qkv); its class-token attention cannot be read. Use a timm ViT "
            "encoder, or analyse only the JWTH head's attention."
        )
    return attn


@torch.no_grad()
def tokens_and_cls_attention(encoder: Encoder, x: torch.Tensor) -> tuple[Tokens, torch.Tensor]:
    """Encode ``x`` and return the last block's class-token attention over the patch tokens.

    Args:
        encoder: a timm-ViT :class:`jwth.encoders.Encoder`.
        x: normalised images (B, 3, H, W).

    Returns:
        (tokens, attention (B, heads, N)): per head, the class token's softmax weights
        over the N patch tokens (register and class tokens dropped), renormalised to sum to 1.

    Raises:
        ValueError: the encoder has no timm-style last attention block.
    """
    attn = _last_attention(encoder)
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        tokens = encoder(x)
    finally:
        handle.remove()
    inp = captured[-1]
    B, T, _ = inp.shape
    qkv = attn.qkv(inp).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q_norm = getattr(attn, "q_norm", torch.nn.Identity())
    k_norm = getattr(attn, "k_norm", torch.nn.Identity())
    q, k = q_norm(q), k_norm(k)
    scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, T)
    a = scores.float().softmax(dim=-1)[:, :, 0, encoder.num_prefix_tokens :]
    return tokens, a / a.sum(dim=-1, keepdim=True)


__all__ = ["tokens_and_cls_attention"]
