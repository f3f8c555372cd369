"""Saving a trained JWTH attention head, and running it on fresh tokens.

A trained :class:`jwth.heads.JWTHAttentionHead` is tied to the encoder whose tokens
it was trained on; the file records that encoder (spec and weights hash), the classes
and the head's shape, so that slide extraction can run encoder and head together
(``jwth extract-slides --head``) and store only the pooled vector and the attention
weights, never the (N, P, D) patch tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from jwth.heads.attention_pool import JWTHAttentionHead

FORMAT = "jwth-attention-head/1"


def save_attention_head(path: str | Path, head: JWTHAttentionHead, classes: list[str], encoder) -> Path:
    """Write ``head`` with what it needs to be used again.

    Args:
        path: output ``.pt`` file.
        head: a trained attention head.
        classes: class names in logit order.
        encoder: the :class:`jwth.encoders.Encoder` whose tokens the head was trained on.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "dim": head.fc.in_features // 2,
        "num_classes": head.fc.out_features,
        "num_heads": head.pool.num_heads,
        "classes": list(classes),
        "encoder_spec": encoder.spec,
        "weights_hash": str(encoder.weights_hash),
    }
    torch.save({"meta": meta, "state_dict": head.state_dict()}, path)
    return path


def load_attention_head(path: str | Path, encoder=None) -> tuple[JWTHAttentionHead, dict]:
    """Read a head written by :func:`save_attention_head` (eval mode, CPU).

    Args:
        path: the ``.pt`` file.
        encoder: when given, the head must have been trained on this encoder's tokens.

    Returns:
        (head, meta) with meta keys ``dim``, ``num_classes``, ``num_heads``, ``classes``,
        ``encoder_spec``, ``weights_hash``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a JWTH attention-head file, or trained on another encoder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Attention head {path} not found; `jwth nuclei-alignment` writes one "
                                "(attention_head.pt in its --out folder).")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        assert meta.get("format") == FORMAT
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path} is not a JWTH attention-head file ({type(e).__name__}); pass the "
                         "attention_head.pt written by `jwth nuclei-alignment`.") from e
    if encoder is not None and str(encoder.weights_hash) != meta["weights_hash"]:
        raise ValueError(
            f"Attention head {path} was trained on tokens of {meta['encoder_spec']!r} (weights "
            f"{meta['weights_hash']}), not of {encoder.spec!r} (weights {encoder.weights_hash}); "
            "pass the same --encoder it was trained with."
        )
    head = JWTHAttentionHead(meta["dim"], meta["num_classes"], num_heads=meta["num_heads"])
    head.load_state_dict(blob["state_dict"])
    return head.eval(), meta


@torch.no_grad()
def pool_with_head(head: JWTHAttentionHead, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A trained head's pooled vector, attention weights and class probabilities.

    Args:
        head: a :class:`JWTHAttentionHead` in eval mode.
        cls: class tokens (B, D); patches: patch tokens (B, N, D) (no register tokens).

    Returns:
        (features (B, 2D) = [class token, pooled vector (the head's attention-pool
        output, the second half of what its classifier reads)], attention (B, H, N),
        probabilities (B, C)).
    """
    cls, patches = cls.float(), patches.float()
    tokens = head.norm_kv(patches)
    pooled, attn = head.pool(head.query(cls, tokens), tokens)
    probs = head.classify(cls, pooled).softmax(-1)
    return torch.cat([cls, pooled], dim=-1), attn, probs


__all__ = ["load_attention_head", "pool_with_head", "save_attention_head"]
