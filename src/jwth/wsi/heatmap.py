"""Heatmaps of per-tile scores (MIL attention, tile predictions) over a slide thumbnail.

Each tile's score paints the thumbnail rectangle covered by its level-0 square
``[x, x + patch_size_level0) x [y, y + patch_size_level0)``; so the picture is
aligned with the tile coordinates by construction, whatever pyramid level the tiles
were read from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def patch_size_level0(attrs: dict, slide: str | Path | None = None, source: str = "the features file") -> int:
    """Tile edge in level-0 px from a features file's attributes (jwth, TRIDENT or CLAM).

    Order: ``patch_size_level0`` (jwth, TRIDENT); else CLAM's ``patch_size`` (px read at
    ``patch_level``) times the downsample of ``patch_level`` read from ``slide``.

    Args:
        attrs: attributes of the file and its ``coords`` dataset.
        slide: the slide file, needed for CLAM files (its level downsamples).
        source: the file's name, for messages.

    Raises:
        ValueError: neither is available; the message names the missing attributes and
            the ``--patch-size-level0`` option.
    """
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "patch_size" in attrs and "patch_level" in attrs and slide is not None:
        from jwth.wsi.reader import open_slide

        level = int(attrs["patch_level"])
        with open_slide(slide) as r:
            if not 0 <= level < r.level_count:
                raise ValueError(f"{source}: patch_level {level} does not exist in {Path(slide).name} "
                                 f"({r.level_count} levels); is it the features file of this slide?")
            return int(round(int(attrs["patch_size"]) * r.level_downsamples[level]))
    have = sorted(k for k in ("patch_size", "patch_level") if k in attrs)
    raise ValueError(
        f"{source} has no attribute 'patch_size_level0' (the tile edge in level-0 px)"
        + (f" and only {have} of CLAM's 'patch_size' + 'patch_level'" if have else
           " nor CLAM's 'patch_size' + 'patch_level'")
        + "; pass the tile edge with --patch-size-level0 <px> (e.g. 512 for 256-px tiles read at "
        "level 0 from a 0.25 um/px slide at 0.5 um/px).")


def score_canvas(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: int,
    thumb_shape: tuple[int, int],
    thumb_scale: tuple[float, float],
) -> np.ndarray:
    """Rasterise tile scores onto the thumbnail grid.

    Args:
        coords: ``(N, 2)`` level-0 top-left ``(x, y)`` px.
        scores: ``(N,)`` scores.
        patch_size_level0: tile edge in level-0 px.
        thumb_shape: thumbnail ``(h, w)``.
        thumb_scale: level-0 px per thumbnail px ``(sx, sy)``.

    Returns:
        ``(h, w)`` float32 array, NaN where no tile lies; overlapping tiles are averaged.

    Raises:
        ValueError: ``coords`` and ``scores`` lengths differ.
    """
    coords = np.asarray(coords)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} coords but {len(scores)} scores")
    h, w = thumb_shape
    sx, sy = thumb_scale
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.int32)
    for (x, y), s in zip(coords, scores):
        x0, y0 = int(round(x / sx)), int(round(y / sy))
        x1, y1 = int(round((x + patch_size_level0) / sx)), int(round((y + patch_size_level0) / sy))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
        acc[y0:y1, x0:x1] += s
        cnt[y0:y1, x0:x1] += 1
    out = np.full((h, w), np.nan, np.float32)
    m = cnt > 0
    out[m] = (acc[m] / cnt[m]).astype(np.float32)
    return out


def draw_heatmap(
    slide: str | Path,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: int,
    out_png: str | Path,
    mpp: float | None = None,
    title: str | None = None,
    label: str = "attention",
    cmap: str = "inferno",
    alpha: float = 0.5,
    thumb_size: int = 1024,
    normalize: str = "rank",
) -> np.ndarray:
    """Draw ``scores`` over the slide thumbnail and save a PNG.

    Args:
        slide: slide file (read through :func:`jwth.wsi.open_slide`).
        coords: ``(N, 2)`` level-0 ``(x, y)`` from the slide's features ``.h5``.
        scores: ``(N,)`` per-tile values (MIL attention weights, tile probabilities ...).
        patch_size_level0: tile edge in level-0 px (``.h5`` attribute ``patch_size_level0``).
        out_png: output path.
        mpp: accepted for symmetry with other commands (thumbnails need no mpp).
        title, label, cmap, alpha: figure title, colour-bar label, colormap, overlay opacity.
        thumb_size: long side of the thumbnail (px).
        normalize: ``rank`` (percentiles, the usual choice for attention, whose raw
            values shrink with bag size), ``minmax`` or ``none``.

    Returns:
        The ``(h, w)`` score canvas drawn (NaN off-tile), for checks.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jwth.wsi.reader import open_slide

    scores = np.asarray(scores, dtype=np.float64).ravel()
    if normalize == "rank" and len(scores) > 1:
        order = scores.argsort().argsort()
        vals = order / (len(scores) - 1)
    elif normalize == "minmax" and len(scores) > 1 and np.ptp(scores) > 0:
        vals = (scores - scores.min()) / np.ptp(scores)
    elif normalize in ("rank", "minmax", "none"):
        vals = scores
    else:
        raise ValueError(f"normalize must be rank, minmax or none, got {normalize!r}")
    with open_slide(slide, mpp=mpp) as reader:
        thumb, scale = reader.get_thumbnail(thumb_size)
    canvas = score_canvas(coords, vals, patch_size_level0, thumb.shape[:2], scale)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    h, w = thumb.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.4), dpi=max(100, int(w / 8)))
    ax.imshow(thumb)
    im = ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, alpha=alpha, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or Path(slide).stem, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01,
                 label=f"{label} ({'percentile' if normalize == 'rank' else normalize})")
    fig.savefig(out_png, bbox_inches="tight")
    plt.close(fig)
    return canvas
