"""Heads trained on frozen tokens.

- ``linear``: linear probe on the class token;
- ``attention``: JWTH attention pooling (class token as query over patch tokens);
- ``mean``: [class token, mean patch token] -> linear (ablation);
- ``learned-query``: attentive probe with a learned query (ablation).
"""

from __future__ import annotations

from torch import nn

from jwth.heads.attention_pool import (
    AttentionPool,
    JWTHAttentionHead,
    LearnedQueryHead,
    class_attention_pool,
    normalize_tokens,
)
from jwth.heads.linear import LinearProbe, MeanConcatHead

HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearProbe,
    "attention": JWTHAttentionHead,
    "mean": MeanConcatHead,
    "learned-query": LearnedQueryHead,
}


def parse_heads(names: str | list[str]) -> list[str]:
    """Split and check a head list (``"linear,attention"``).

    Raises:
        ValueError: an unknown head name (the message lists the valid ones).
    """
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in items if n not in HEADS]
    if unknown or not items:
        raise ValueError(f"Unknown head(s) {unknown or names!r}; choose from {', '.join(HEADS)}.")
    return list(dict.fromkeys(items))


def build_head(name: str, dim: int, num_classes: int, num_heads: int = 8, dropout: float = 0.0) -> nn.Module:
    """Build head ``name`` for tokens of dimension ``dim`` and ``num_classes`` classes."""
    parse_heads([name])
    return HEADS[name](dim, num_classes, num_heads=num_heads, dropout=dropout)


def token_input(name: str) -> str | None:
    """What head ``name`` reads besides the class token: None, ``raw`` or ``normalized`` patch tokens."""
    parse_heads([name])
    return HEADS[name].token_input


__all__ = [
    "AttentionPool",
    "HEADS",
    "JWTHAttentionHead",
    "LearnedQueryHead",
    "LinearProbe",
    "MeanConcatHead",
    "build_head",
    "class_attention_pool",
    "normalize_tokens",
    "parse_heads",
    "token_input",
]
