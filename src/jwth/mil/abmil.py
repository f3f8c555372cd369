"""Gated-attention MIL (ABMIL) and the shared MIL model interface.

Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML
2018, eq. 9 (gated attention):

    a_k = exp{w^T (tanh(V h_k) * sigm(U h_k))} / sum_j exp{w^T (tanh(V h_j) * sigm(U h_j))}
    z   = sum_k a_k h_k

with ``h_k = ReLU(W x_k)`` a learned projection of instance embedding ``x_k``, and a
linear classifier on ``z``. Variable bag sizes are batched with a padding mask; in
evaluation a huge bag (e.g. 300,000 tiles) is scored in chunks with an online
softmax (running max and sums, as in flash attention), giving the same logits as the
unchunked path in memory bounded by the chunk size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class MILOutput:
    """``logits`` ``(B, C)`` and per-instance ``attention`` ``(B, N)`` (0 on padding)."""

    logits: torch.Tensor
    attention: torch.Tensor


def _iter_chunks(x, chunk_size: int, device, dtype=torch.float32):
    """Yield ``(start, tensor (n, E))`` chunks of a tensor, numpy array or h5py dataset."""
    n = len(x)
    for s in range(0, n, chunk_size):
        c = x[s:s + chunk_size]
        yield s, torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c).to(device, dtype)


class MILModel(nn.Module):
    """Base class: input standardisation + instance projection ``h = ReLU(W x)``.

    Subclasses define :meth:`pool_scores` (unnormalised attention logits, or None for
    uniform weights). Args:
        in_dim: instance embedding width E.
        n_classes: C.
        hidden: width of ``h`` (L in the paper).
        dropout: dropout after the projection (training only).
    """

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, dropout: float = 0.25):
        super().__init__()
        self.in_dim, self.n_classes, self.hidden = int(in_dim), int(n_classes), int(hidden)
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden, n_classes)

    def set_standardisation(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Store per-feature mean/std (fit on training instances) applied to every input."""
        self.in_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.in_std.copy_(torch.as_tensor(np.maximum(std, 1e-6), dtype=torch.float32))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., E)`` -> ``(..., hidden)`` instance representations ``h``."""
        return self.project((x - self.in_mean) / self.in_std)

    def pool_scores(self, h: torch.Tensor) -> torch.Tensor | None:
        """Unnormalised attention logits ``(..., N)`` for ``h`` ``(..., N, hidden)``; None = mean."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Score a padded batch of bags.

        Args:
            x: ``(B, N, E)`` instance embeddings (or ``(N, E)`` for one bag).
            mask: ``(B, N)`` bool, True for real instances (None = all real).

        Returns:
            :class:`MILOutput` with logits ``(B, C)`` and attention ``(B, N)`` summing to 1.

        Raises:
            ValueError: a bag with no real instance.
        """
        if x.ndim == 2:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.reshape(1, -1)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every bag needs at least one real (unmasked) instance")
        h = self.embed(x)
        s = self.pool_scores(h)
        if s is None:
            s = torch.zeros(h.shape[:2], device=h.device, dtype=h.dtype)
        a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=1)
        z = torch.einsum("bn,bnl->bl", a, h)
        return MILOutput(self.classifier(z), a)

    @torch.no_grad()
    def forward_chunked(self, x, chunk_size: int = 16384, device: str | torch.device | None = None) -> MILOutput:
        """Score ONE bag of any size in chunks (online softmax); eval only.

        Args:
            x: ``(N, E)`` torch tensor, numpy array, memmap or h5py dataset; only
                ``chunk_size`` rows are materialised at a time.
            chunk_size: instances per chunk.
            device: compute device (default: the model's).

        Returns:
            :class:`MILOutput` with logits ``(1, C)`` and attention ``(1, N)``, equal
            (to float rounding) to ``forward`` on the whole bag.
        """
        if len(x) == 0:
            raise ValueError("cannot score an empty bag")
        device = device or self.classifier.weight.device
        m = torch.tensor(float("-inf"), device=device)
        denom = torch.zeros((), device=device)
        acc = torch.zeros(self.hidden, device=device)
        scores = torch.empty(len(x), dtype=torch.float32)
        for s0, c in _iter_chunks(x, chunk_size, device):
            h = self.embed(c)
            s = self.pool_scores(h)
            if s is None:
                s = torch.zeros(len(h), device=device)
            m_new = torch.maximum(m, s.max())
            w = torch.exp(s - m_new)
            corr = torch.exp(m - m_new)
            denom = denom * corr + w.sum()
            acc = acc * corr + w @ h
            m = m_new
            scores[s0:s0 + len(s)] = s.float().cpu()
        z = acc / denom
        attn = torch.exp(scores - m.cpu()) / denom.cpu()
        return MILOutput(self.classifier(z).unsqueeze(0), attn.unsqueeze(0))

    @torch.no_grad()
    def instance_probs(self, x, chunk_size: int = 16384) -> np.ndarray:
        """Per-instance class probabilities ``(N, C)``: the classifier applied to each ``h_k``
        (tile predictions for heatmaps)."""
        device = self.classifier.weight.device
        out = [torch.softmax(self.classifier(self.embed(c)), -1).cpu().numpy()
               for _, c in _iter_chunks(x, chunk_size, device)]
        return np.concatenate(out, 0)


class GatedAttention(nn.Module):
    """Gated attention scores of Ilse et al. 2018, eq. 9 (before the softmax).

    ``score_k = w^T (tanh(V h_k) * sigm(U h_k))`` for ``h`` ``(..., N, L)`` -> ``(..., N)``.
    """

    def __init__(self, hidden: int, attn_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Linear(hidden, attn_dim)
        self.U = nn.Linear(hidden, attn_dim)
        self.w = nn.Linear(attn_dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.drop(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))).squeeze(-1)


class ABMIL(MILModel):
    """Gated-attention MIL (Ilse et al. 2018, eq. 9) with a linear bag classifier.

    Args:
        in_dim: instance embedding width E; n_classes: C; hidden: L; attn_dim: K
        (rows of V and U); dropout: after the projection.
    """

    def __init__(self, in_dim: int, n_classes: int = 2, hidden: int = 256, attn_dim: int = 128,
                 dropout: float = 0.25):
        super().__init__(in_dim, n_classes, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim)

    def pool_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention(h)


class MeanMIL(MILModel):
    """Mean pooling of projected instances, ``z = mean_k h_k``, then a linear classifier."""

    def pool_scores(self, h: torch.Tensor) -> None:
        return None


AGGREGATORS = {"abmil": ABMIL, "mean": MeanMIL}


def build_mil_model(aggregator: str, in_dim: int, n_classes: int = 2, **kwargs) -> MILModel:
    """``abmil`` or ``mean``. Raises ValueError for another name."""
    if aggregator not in AGGREGATORS:
        raise ValueError(f"Unknown aggregator {aggregator!r}; choose one of {sorted(AGGREGATORS)}")
    if aggregator == "mean":
        kwargs.pop("attn_dim", None)
    return AGGREGATORS[aggregator](in_dim, n_classes, **kwargs)
