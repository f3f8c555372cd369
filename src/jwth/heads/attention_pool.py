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


def attend(qk: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries already in token space.

    The two products with the tokens run in the tokens' dtype (bfloat16 tokens make
    them bf16 matrix products, about 3x faster on CPUs with AVX512-BF16 / AMX);
    scores, softmax and outputs stay in the queries' dtype.

    Args:
        qk: (B, Q, D) queries (scaled, projected through W_k).
        tokens: (B, N, D), float32 or bfloat16.
        mask: (B, N) bool, True = attend.

    Returns:
        (pooled (B, Q, D) = softmax(qk tokens^T) tokens, weights (B, Q, N)), in qk's dtype.

    Raises:
        ValueError: a mask row keeps no token.
    """
    dt = tokens.dtype
    scores = torch.bmm(qk.to(dt), tokens.transpose(1, 2)).to(qk.dtype)
    if mask is not None:
        if (~mask).all(dim=1).any():
            raise ValueError("A mask row keeps no token; attention over nothing is undefined.")
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    attn = scores.softmax(dim=-1)
    return torch.bmm(attn.to(dt), tokens).to(qk.dtype), attn


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

    def query_in_token_space(self, query: torch.Tensor) -> torch.Tensor:
        """(B, D) query -> (B, H, D): each head's scaled query projected through W_k,h."""
        B, D = query.shape
        H, d = self.num_heads, self.head_dim
        q = self.q(query).view(B, H, d)
        return torch.einsum("bhd,hdD->bhD", q, self.k.weight.view(H, d, D)) / math.sqrt(d)

    def finish(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, H, D) attention-weighted tokens -> (B, D) output (value and output projections)."""
        B, H, D = pooled.shape
        v = torch.einsum("bhD,hdD->bhd", pooled, self.v.weight.view(H, self.head_dim, D))
        if self.v.bias is not None:
            v = v + self.v.bias.view(H, self.head_dim)
        return self.proj(v.reshape(B, D))

    def forward(
        self, query: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qk = self.query_in_token_space(query)
        pooled, attn = attend(qk, tokens, mask)
        return self.finish(pooled), attn


def normalize_tokens(patches: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm without affine parameters over the last dim, (..., D) -> (..., D).

    Equals ``JWTHAttentionHead.norm_kv`` (same eps), so heads can be trained on tokens
    normalised once instead of at every step.
    """
    return torch.nn.functional.layer_norm(patches, patches.shape[-1:], eps=eps)


class _Standardize(nn.Module):
    """Per-feature standardisation learned from the training data (BatchNorm without affine)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


class JWTHAttentionHead(nn.Module):
    """The JWTH head: class-token attention pooling fused with the class token.

    logits = W [standardise(cls); AttnPool(q = LN(cls), K = V = LN'(patches))] + b

    (LN' is a LayerNorm without affine parameters.)

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
        # No affine on the token LayerNorm: gamma/beta would be absorbed by W_k and W_v anyway, and
        # without parameters the normalisation needs no backward pass over the (B, N, D) tokens.
        self.norm_kv = nn.LayerNorm(dim, elementwise_affine=False)
        self.pool = AttentionPool(dim, num_heads)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * dim, num_classes)
        self.last_attention: torch.Tensor | None = None

    def query(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.norm_q(cls)

    #: the training loop may pass patch tokens already normalised by :func:`normalize_tokens`
    token_input = "normalized"

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_normalized(cls, self.norm_kv(patches), mask)

    def forward_normalized(
        self, cls: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Like :meth:`forward` with ``tokens = normalize_tokens(patches)`` computed once beforehand.

        The token LayerNorm has no parameters, so normalising a cache once is exact and
        saves the largest per-step cost of training on frozen tokens.
        """
        pooled, attn = self.pool(self.query(cls, tokens), tokens, mask)
        self.last_attention = attn.detach()
        return self.classify(cls, pooled)

    def classify(self, cls: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.cat([self.cls_std(cls), pooled], dim=-1)))


def grid_forward_normalized(
    heads: list[JWTHAttentionHead], cls: torch.Tensor, tokens: torch.Tensor
) -> list[torch.Tensor]:
    """Logits of several attention heads on the same normalised tokens in one pass.

    The queries of all heads (G heads x H attention heads) are stacked so that the
    (B, N, D) tokens are read twice per step in total instead of twice per head; each
    head's logits are exactly its own :meth:`JWTHAttentionHead.forward_normalized`.
    Used to train a grid of (lr, weight decay) heads side by side.

    Args:
        heads: attention heads with equal dim and num_heads.
        cls: (B, D); tokens: normalised patch tokens (B, N, D).

    Returns:
        One (B, C) logits tensor per head.
    """
    qks = [h.pool.query_in_token_space(h.query(cls, tokens)) for h in heads]
    H = qks[0].shape[1]
    pooled, attn = attend(torch.cat(qks, dim=1), tokens)
    out = []
    # split, not slicing: the backward of G slices zero-fills G full-size gradients
    for h, p, a in zip(heads, pooled.split(H, dim=1), attn.detach().split(H, dim=1)):
        h.last_attention = a
        out.append(h.classify(cls, h.pool.finish(p)))
    return out


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


__all__ = ["AttentionPool", "JWTHAttentionHead", "LearnedQueryHead", "class_attention_pool", "grid_forward_normalized", "normalize_tokens"]
