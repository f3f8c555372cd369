"""JWTH attention pooling: the class token attends over the patch tokens.

The JWTH system (arXiv:2511.05150, "From Linear Probing to Joint-Weighted Token
Hierarchy", Sec. "attention pooling") replaces the linear probe on the class token
by multi-head attention whose single query is the class token and whose keys and
values are the patch tokens; the pooled vector, fused with the class token, feeds
a linear classifier. The closest public design is CaiT's class-attention layer
(Touvron et al., ICCV 2021, Sec. 3 "class-attention").

:class:`AttentionPool` computes exactly standard multi-head attention (Vaswani et
al. 2017, eq. 1 and Sec. 3.2.2) with one query,

    head_h = softmax((q W_q,h + b_q,h)(X W_k,h + b_k,h)^T / sqrt(d)) (X W_v,h + b_v,h)
    out    = concat_h(head_h) W_o + b_o,

but in an order whose cost is O(N D) per head instead of O(N D^2): with one query,
(q_h)(X W_k,h)^T = X (W_k,h q_h^T) -- the query is projected into token space once --
the key bias adds the same constant to every score (softmax ignores it), and since
the attention weights sum to 1, a_h (X W_v,h + b_v,h) = (a_h X) W_v,h + b_v,h.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def class_attention_pool(
    cls: torch.Tensor,
    patches: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter-free JWTH pooling: softmax(cls . P^T / sqrt(D)) P.

    Args:
        cls: class tokens (B, D) -- the query.
        patches: patch tokens (B, N, D) -- keys and values. Never pass register tokens.
        mask: optional (B, N) bool, True = token used.
        temperature: score scale; default sqrt(D).

    Returns:
        (pooled (B, D), weights (B, N)); weights sum to 1 over the kept tokens.

    Raises:
        ValueError: shape mismatch, or a row whose mask keeps no token.
    """
    if cls.ndim != 2 or patches.ndim != 3 or cls.shape[0] != patches.shape[0] or cls.shape[1] != patches.shape[2]:
        raise ValueError(f"Expected cls (B, D) and patches (B, N, D); got {tuple(cls.shape)}, {tuple(patches.shape)}.")
    t = temperature or math.sqrt(cls.shape[-1])
    scores = torch.einsum("bd,bnd->bn", cls, patches) / t
    if mask is not None:
        if (~mask).all(dim=1).any():
            raise ValueError("A mask row keeps no patch token; attention over nothing is undefined.")
        scores = scores.masked_fill(~mask, float("-inf"))
    w = scores.softmax(dim=-1)
    return torch.einsum("bn,bnd->bd", w, patches), w


class AttentionPool(nn.Module):
    """Multi-head attention with one query per sample, computed in O(N D) per head.

    Args:
        dim: token dimension D (query and tokens).
        num_heads: H; D must be divisible by H.
        bias: use biases in the projections (as nn.MultiheadAttention).

    Shapes:
        query (B, D), tokens (B, N, D), mask (B, N) bool (True = attend) ->
        out (B, D), attention weights (B, H, N).

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads``; a mask row keeps nothing.
    """

    def __init__(self, dim: int, num_heads: int = 8, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=False)  # a key bias adds a constant per head: softmax ignores it
        self.v = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self, query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, D = tokens.shape
        H, d = self.num_heads, self.head_dim
        q = self.q(query).view(B, H, d)
        qk = torch.einsum("bhd,hdD->bhD", q, self.k.weight.view(H, d, D))  # query in token space
        scores = torch.einsum("bhD,bnD->bhn", qk, tokens) / math.sqrt(d)
        if mask is not None:
            if (~mask).all(dim=1).any():
                raise ValueError("A mask row keeps no token; attention over nothing is undefined.")
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        pooled = torch.einsum("bhn,bnD->bhD", attn, tokens)  # (B, H, D)
        v = torch.einsum("bhD,hdD->bhd", pooled, self.v.weight.view(H, d, D))
        if self.v.bias is not None:
            v = v + self.v.bias.view(H, d)
        return self.proj(v.reshape(B, D)), attn


class _Standardize(nn.Module):
    """Per-feature standardisation learned from the training data (BatchNorm without affine)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class JWTHAttentionHead(nn.Module):
    """The JWTH head: class-token attention pooling fused with the class token.

    logits = W [standardise(cls); AttnPool(q = LN(cls), K = V = LN(patches))] + b

    Args:
        dim: token dimension D.
        num_classes: C.
        num_heads: attention heads H.
        dropout: dropout on the fused vector.

    Shapes:
        cls (B, D), patches (B, N, D), mask (B, N) -> logits (B, C); the last
        attention weights (B, H, N) are kept in ``self.last_attention``.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.cls_std = _Standardize(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.pool = AttentionPool(dim, num_heads)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, num_classes)
        self.last_attention: torch.Tensor | None = None

    def query(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.norm_q(cls)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled, attn = self.pool(self.query(cls, patches), self.norm_kv(patches), mask)
        self.last_attention = attn.detach()
        return self.fc(self.drop(torch.cat([self.cls_std(cls), pooled], dim=-1)))


class LearnedQueryHead(JWTHAttentionHead):
    """Ablation: attentive probe with a learned query (V-JEPA/CAPI style) instead of the class token.

    Same fusion and classifier as :class:`JWTHAttentionHead`; only the query differs.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__(dim, num_classes, num_heads, dropout)
        self.norm_q = nn.Identity()  # the query is a parameter, not a token to normalise
        self.learned_query = nn.Parameter(torch.randn(dim) * 0.02)

    def query(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.learned_query.expand(cls.shape[0], -1)


__all__ = ["AttentionPool", "JWTHAttentionHead", "LearnedQueryHead", "class_attention_pool"]
