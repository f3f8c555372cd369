"""Patch-token health diagnostics: is an encoder's local representation collapsing?

For a set of tiles, from the patch tokens X (N, D) of each tile (class and register
tokens excluded):

- **effective rank** (Roy & Vetterli 2007): erank(X) = exp(-sum_i p_i log p_i) with
  p_i = sigma_i / sum_j sigma_j the normalised singular values; from 1 (all tokens on
  one direction) to min(N, D). Reported per tile (mean) and over the pooled,
  centred tokens of all tiles.
- **mean pairwise cosine similarity** of the patch tokens within a tile (off-diagonal
  mean of the normalised Gram matrix); near 1 = every patch looks the same.
- **Gram spectrum**: eigenvalues of G = X_n X_n^T / N (X_n rows L2-normalised; they
  sum to 1), averaged over tiles; a fast decay = few distinct local patterns
  (the Gram matrix DINOv3's Gram anchoring constrains, Siméoni et al. 2025).
- **PCA maps**: the first three principal components of all shown tiles' patch tokens,
  each scaled to [0, 1] (1st-99th percentile), shown as RGB over the token grid.
- **stain sensitivity** (label-free; docs/stain-shift.md): how far a test-time stain
  shift of strength 1 and 2 moves each tile's class token, relative to the distance
  between two tiles' class tokens (0 = the encoder ignores the stain change).

:func:`diagnose` compares one or more encoders on the same tiles (e.g. before and
after Gram post-training) and writes ``metrics.json``, ``gram_spectrum.png``,
``pca_maps.png`` (tiles x encoders, side by side).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def effective_rank(x: torch.Tensor, eps: float = 1e-12) -> float:
    """Effective rank of a (N, D) matrix (Roy & Vetterli 2007, eq. 2).

    Raises:
        ValueError: x is not 2-D.
    """
    if x.ndim != 2:
        raise ValueError(f"expected (N, D), got {tuple(x.shape)}")
    s = torch.linalg.svdvals(x.double())
    if float(s.sum()) <= eps:
        return 0.0
    p = s / s.sum()
    p = p[p > eps]
    return float(torch.exp(-(p * p.log()).sum()))


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over pairs i != j of the rows of x (N, D); N >= 2."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("need at least two tokens")
    xn = F.normalize(x.double(), dim=-1)
    g = xn @ xn.t()
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def gram_spectrum(x: torch.Tensor) -> np.ndarray:
    """Eigenvalues (descending, summing to 1) of X_n X_n^T / N for x (N, D)."""
    xn = F.normalize(x.double(), dim=-1)
    g = xn @ xn.t() / x.shape[0]
    ev = torch.linalg.eigvalsh(g).flip(0).clamp_min(0)
    return ev.numpy()


def token_metrics(patches: torch.Tensor) -> dict:
    """Metrics of patch tokens (T, N, D) from T tiles (see module docstring)."""
    t, n, d = patches.shape
    er = [effective_rank(p) for p in patches]
    cos = [mean_pairwise_cosine(p) for p in patches]
    spec = np.mean([gram_spectrum(p) for p in patches], axis=0)
    pooled = patches.reshape(t * n, d).double()
    pooled = pooled - pooled.mean(0, keepdim=True)
    k90 = int(np.searchsorted(np.cumsum(spec), 0.9) + 1)
    return {
        "n_tiles": t,
        "n_patches": n,
        "dim": d,
        "effective_rank_per_tile": float(np.mean(er)),
        "effective_rank_pooled": effective_rank(pooled),
        "mean_pairwise_cosine": float(np.mean(cos)),
        "gram_top1_share": float(spec[0]),
        "gram_components_for_90pct": k90,
        "gram_spectrum": [float(v) for v in spec],
    }


def pca_rgb(patches: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """First three principal components of patch tokens as RGB maps.

    Args:
        patches: (T, N, D) patch tokens, N = h * w.
        grid: (h, w).

    Returns:
        float array (T, h, w, 3) in [0, 1]; PCA fitted jointly on all T tiles.
    """
    t, n, d = patches.shape
    x = patches.reshape(t * n, d).double()
    x = x - x.mean(0, keepdim=True)
    k = min(3, d, t * n)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    proj = (x @ v[:k].t()).numpy()
    if k < 3:
        proj = np.concatenate([proj, np.zeros((proj.shape[0], 3 - k))], axis=1)
    lo = np.percentile(proj, 1, axis=0)
    hi = np.percentile(proj, 99, axis=0)
    proj = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return proj.reshape(t, grid[0], grid[1], 3)


def _label(spec: str) -> str:
    p = Path(spec)
    if p.exists():
        parts = [x for x in p.resolve().parts[-2:] if x not in ("encoder",)]
        return "/".join(parts) or spec
    return spec


@torch.no_grad()
def encode(encoder, images: list, size: int | None = None, batch_size: int = 16, device: str = "cpu",
           with_cls: bool = False):
    """Patch tokens (T, N, D) float32 and grid of PIL tiles through ``encoder``; with
    ``with_cls`` also the class tokens (T, D): ``(patches, grid, cls)``."""
    from torchvision import transforms as T

    size = int(size or encoder.input_size)
    tf = T.Compose(
        [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(encoder.mean, encoder.std)]
    )
    outs, cls, grid = [], [], None
    for i in range(0, len(images), batch_size):
        x = torch.stack([tf(im) for im in images[i : i + batch_size]]).to(device)
        tok = encoder(x)
        outs.append(tok.patches.float().cpu())
        cls.append(tok.cls.float().cpu())
        grid = tok.grid
    if with_cls:
        return torch.cat(outs), grid, torch.cat(cls)
    return torch.cat(outs), grid


#: stain-shift strengths at which :func:`diagnose` measures the class-token displacement
SHIFT_STRENGTHS = (1.0, 2.0)


def stain_displacement(encoder, images: list, paths: list, size: int | None = None, device: str = "cpu",
                       strengths=SHIFT_STRENGTHS, base_cls: torch.Tensor | None = None) -> dict:
    """Label-free stain sensitivity: class-token displacement under a test-time stain shift.

    Each tile is shifted by :class:`jwth.eval.stain_shift.StainShift` (seeded by its path,
    the same for every encoder) and :func:`jwth.eval.stain_shift.token_displacement` of the
    class tokens is taken: mean ||z' - z|| / mean inter-tile distance (0 = invariant).

    Returns:
        ``{"<strength>": {"relative", "cosine", "n"}}``.
    """
    from jwth.eval.stain_shift import StainShift, strength_key, token_displacement

    if base_cls is None:
        base_cls = encode(encoder, images, size=size, device=device, with_cls=True)[2]
    out = {}
    for st in strengths:
        shift = StainShift(float(st))
        shifted = [shift(im, str(p)) for im, p in zip(images, paths)]
        cls = encode(encoder, shifted, size=size, device=device, with_cls=True)[2]
        out[strength_key(st)] = token_displacement(base_cls.numpy(), cls.numpy())
    return out


def diagnose(
    encoders: list[str],
    data_dir: str | Path,
    out_dir: str | Path,
    n_tiles: int = 32,
    n_show: int = 6,
    size: int | None = None,
    labels: list[str] | None = None,
    device: str = "cpu",
) -> dict:
    """Compute token metrics and pictures for one or more encoders on the same tiles.

    Args:
        encoders: encoder specs (``jwth.encoders.load_encoder``), e.g. a pretraining
            run's ``encoder/`` folder and the post-trained one.
        data_dir: tile folder (``labels.csv`` with ``path`` or images); tiles are taken
            evenly spaced over the sorted list.
        out_dir: output folder.
        n_tiles: tiles for the metrics.
        n_show: tiles shown in the PCA figure.
        size: input size in px (default: each encoder's input size).
        labels: display names (default: derived from the specs).
        device: torch device.

    Returns:
        ``{"tiles": [...], "encoders": {label: metrics}}`` (also in metrics.json).

    Raises:
        FileNotFoundError: no images in data_dir.
        ValueError: labels and encoders differ in length.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jwth.data.tiles import load_tile
    from jwth.encoders import load_encoder
    from jwth.ssl.data import list_images

    labels = list(labels) if labels else [_label(s) for s in encoders]
    if len(labels) != len(encoders):
        raise ValueError("give one label per encoder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = list_images(data_dir)
    idx = np.unique(np.linspace(0, len(paths) - 1, min(n_tiles, len(paths))).round().astype(int))
    chosen = [paths[i] for i in idx]
    images = [load_tile(p)[0] for p in chosen]
    n_show = min(n_show, len(images))
    result: dict = {"tiles": [str(p) for p in chosen], "encoders": {}}
    maps = {}
    for spec, lab in zip(encoders, labels):
        enc = load_encoder(spec, device=device)
        patches, grid, cls = encode(enc, images, size=size, device=device, with_cls=True)
        m = token_metrics(patches)
        m.update({"spec": spec, "grid": list(grid), "weights_hash": enc.weights_hash})
        m["class_token_stain_displacement"] = stain_displacement(enc, images, chosen, size, device, base_cls=cls)
        result["encoders"][lab] = m
        maps[lab] = pca_rgb(patches[:n_show], grid)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for lab, m in result["encoders"].items():
        ax.semilogy(np.arange(1, len(m["gram_spectrum"]) + 1), np.maximum(m["gram_spectrum"], 1e-8), label=f"{lab} (erank {m['effective_rank_per_tile']:.1f})")
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("Gram eigenvalue (share)")
    ax.set_title("Patch-token Gram spectrum (mean over tiles)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gram_spectrum.png", dpi=120)
    plt.close(fig)

    cols = 1 + len(labels)
    fig, axes = plt.subplots(n_show, cols, figsize=(2.2 * cols, 2.2 * n_show), squeeze=False)
    for r in range(n_show):
        axes[r, 0].imshow(images[r])
        for c, lab in enumerate(labels):
            axes[r, c + 1].imshow(maps[lab][r], interpolation="nearest")
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
    axes[0, 0].set_title("tile", fontsize=8)
    for c, lab in enumerate(labels):
        axes[0, c + 1].set_title(f"{lab}\nPCA 1-3 as RGB", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pca_maps.png", dpi=100)
    plt.close(fig)
    return result
