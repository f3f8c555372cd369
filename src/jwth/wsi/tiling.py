"""Tiling a slide at a target resolution (mpp) and tile size.

Given the slide's level-0 resolution ``mpp`` (um/px) and the wanted ``target_mpp``,
one target tile of ``tile_size`` px covers ``tile_size_level0 = round(tile_size *
target_mpp / mpp)`` level-0 px. The pyramid level read is the coarsest one that is
still at least as fine as the target (downsample <= target_mpp / mpp, 1 % tolerance
for vendor rounding such as 2.0005); the tile is read there as ``read_size`` px and
resized to ``tile_size`` only when the two differ. Reading above level 0 keeps the
I/O proportional to the output, not to level 0.

Coordinates are level-0 top-left corners ``(x, y)`` in px. Only tiles that fit fully
inside the slide bounds are made, so a slide smaller than one tile yields 0 tiles
(with a warning) instead of a padded fragment. Tiles are streamed one at a time;
the slide is never loaded whole.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
from PIL import Image, ImageDraw

from jwth.wsi.reader import SlideReader, SlideReadError
from jwth.wsi.tissue import tissue_mask

#: Relative tolerance when matching a pyramid downsample to the wanted scale.
LEVEL_TOLERANCE = 0.01


@dataclass
class TilingPlan:
    """Where the tiles of one slide are and how to read them.

    Attributes:
        slide: path of the slide file; ``slide_id`` its file stem.
        mpp: level-0 resolution (um/px) used (metadata or override).
        target_mpp: resolution of the delivered tiles (um/px).
        tile_size: tile edge at ``target_mpp`` (px).
        tile_size_level0: tile edge in level-0 px.
        level: pyramid level read; ``level_downsample`` its downsample.
        read_size: tile edge read at ``level`` (px), resized to ``tile_size`` if different.
        stride_level0: grid step in level-0 px (``tile_size_level0`` without overlap).
        coords: ``(N, 2)`` int64 level-0 top-left ``(x, y)`` of the kept tiles.
        tissue_fraction: ``(N,)`` float32 fraction of each tile covered by tissue.
        n_grid: candidate tiles in the grid before the tissue filter.
        status: ``"ok"`` or ``"empty"``; ``reason`` says why a slide is empty.
        mask / thumb / thumb_scale: thumbnail tissue mask ``(h, w)``, thumbnail
            ``(h, w, 3)`` and level-0 px per thumbnail px ``(sx, sy)``.
    """

    slide: str
    slide_id: str
    mpp: float
    mpp_source: str | None
    target_mpp: float
    tile_size: int
    tile_size_level0: int
    level: int
    level_downsample: float
    read_size: int
    stride_level0: int
    coords: np.ndarray
    tissue_fraction: np.ndarray
    n_grid: int
    min_tissue: float
    status: str = "ok"
    reason: str = ""
    mask: np.ndarray | None = field(default=None, repr=False)
    thumb: np.ndarray | None = field(default=None, repr=False)
    thumb_scale: tuple[float, float] = (1.0, 1.0)

    @property
    def n_tiles(self) -> int:
        return int(len(self.coords))

    def attrs(self) -> dict:
        """Attributes for the HDF5 ``coords`` dataset (CLAM + TRIDENT names)."""
        return {
            "patch_size": int(self.tile_size),
            "patch_size_level0": int(self.tile_size_level0),
            "patch_level": int(self.level),
            "level": int(self.level),
            "downsample": float(self.level_downsample),
            "read_size": int(self.read_size),
            "target_mpp": float(self.target_mpp),
            "mpp": float(self.mpp),
            "mpp_source": str(self.mpp_source or ""),
            # TRIDENT-style magnifications, from the 10 / mpp convention (0.5 um/px = 20x)
            "level0_magnification": float(round(10.0 / self.mpp, 2)),
            "target_magnification": float(round(10.0 / self.target_mpp, 2)),
            "overlap": int(self.tile_size_level0 - self.stride_level0),
            "min_tissue": float(self.min_tissue),
            "name": self.slide_id,
            "read_recipe": self.read_recipe,
        }

    @property
    def read_recipe(self) -> str:
        """How to re-read tile ``i`` from these attributes, in words (stored in every file).

        ``patch_size`` follows TRIDENT (tile px at ``target_mpp``); CLAM-style readers take it as
        the px read at ``patch_level``, which holds only when ``read_size == patch_size``.
        """
        text = (f"read_region(coords[i], level={self.level}, size=({self.read_size}, {self.read_size})) "
                f"-> a {self.tile_size_level0}x{self.tile_size_level0} level-0 px square")
        if self.read_size == self.tile_size:
            return text + f"; no resize (CLAM's read_region(coord, patch_level, (patch_size, patch_size)) is the same)"
        return (text + f", then resize to patch_size={self.tile_size} px. NOT (patch_size, patch_size) at "
                f"patch_level: that reads {self.tile_size}/{self.read_size} of the tile's side")


def choose_level(downsamples: list[float], scale: float) -> int:
    """Coarsest level whose downsample is <= ``scale`` (level-0 px per target px).

    With ``scale < 1`` (target finer than level 0) level 0 is returned.
    """
    best = 0
    for k, ds in enumerate(downsamples):
        if ds <= scale * (1 + LEVEL_TOLERANCE) and ds >= downsamples[best]:
            best = k
    return best


def plan_tiles(
    reader: SlideReader,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    overlap: int = 0,
    tissue: Literal["otsu", "none"] | np.ndarray = "otsu",
    min_tissue: float = 0.25,
    thumb_size: int = 1024,
) -> TilingPlan:
    """Plan the tile grid of a slide.

    Args:
        reader: an open slide.
        target_mpp: wanted resolution of the tiles (um/px), e.g. 0.5 for "20x".
        tile_size: tile edge at ``target_mpp`` (px).
        overlap: overlap between neighbouring tiles at ``target_mpp`` (px).
        tissue: ``"otsu"`` (saturation Otsu, see :mod:`jwth.wsi.tissue`), ``"none"``
            (keep every tile), or a boolean mask ``(h, w)`` over the thumbnail.
        min_tissue: minimum tissue fraction of a tile to keep it (0..1).
        thumb_size: long side of the thumbnail used for the mask (px).

    Returns:
        The :class:`TilingPlan`; ``status == "empty"`` with a ``reason`` when no tile is kept.

    Raises:
        MissingMppError: the slide has no mpp and no override (names ``--mpp``).
        ValueError: non-positive ``target_mpp``/``tile_size`` or overlap >= tile size.
    """
    if target_mpp <= 0 or tile_size <= 0:
        raise ValueError(f"target_mpp and tile_size must be positive, got {target_mpp}, {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap}")
    mpp = reader.require_mpp()
    scale = target_mpp / mpp
    if scale < 1 / (1 + LEVEL_TOLERANCE):
        warnings.warn(
            f"{reader.path.name}: target {target_mpp} um/px is finer than the slide's level 0 "
            f"({mpp:g} um/px); tiles are upsampled", stacklevel=2)
    ts0 = max(int(round(tile_size * scale)), 1)
    stride0 = max(int(round((tile_size - overlap) * scale)), 1)
    level = choose_level(reader.level_downsamples, scale)
    ds = reader.level_downsamples[level]
    read_size = max(int(round(ts0 / ds)), 1)

    thumb, (sx, sy) = reader.get_thumbnail(thumb_size)
    if isinstance(tissue, np.ndarray):
        mask = tissue.astype(bool)
        if mask.shape != thumb.shape[:2]:
            raise ValueError(f"tissue mask shape {mask.shape} != thumbnail shape {thumb.shape[:2]}")
    elif tissue == "otsu":
        mask = tissue_mask(thumb)
    elif tissue == "none":
        mask = np.ones(thumb.shape[:2], bool)
    else:
        raise ValueError(f"tissue must be 'otsu', 'none' or a mask array, got {tissue!r}")

    bx, by, bw, bh = reader.bounds
    xs = np.arange(bx, bx + bw - ts0 + 1, stride0, dtype=np.int64)
    ys = np.arange(by, by + bh - ts0 + 1, stride0, dtype=np.int64)
    status, reason = "ok", ""
    if len(xs) == 0 or len(ys) == 0:
        coords = np.zeros((0, 2), np.int64)
        frac = np.zeros((0,), np.float32)
        status = "empty"
        reason = (f"slide region {bw}x{bh} px is smaller than one tile ({ts0} level-0 px = "
                  f"{tile_size} px at {target_mpp} um/px)")
        warnings.warn(f"{reader.path.name}: 0 tiles: {reason}", stacklevel=2)
    else:
        gx, gy = np.meshgrid(xs, ys)
        grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
        frac_all = _coverage(mask, grid, ts0, sx, sy)
        keep = frac_all >= min_tissue if min_tissue > 0 else np.ones(len(grid), bool)
        coords, frac = grid[keep], frac_all[keep].astype(np.float32)
        if len(coords) == 0:
            status = "empty"
            reason = f"no tile has tissue fraction >= {min_tissue} ({mask.mean():.1%} of the thumbnail is tissue)"
            warnings.warn(f"{reader.path.name}: 0 tiles: {reason}", stacklevel=2)
    n_grid = int(len(xs) * len(ys))
    return TilingPlan(
        slide=str(reader.path), slide_id=reader.path.stem, mpp=mpp, mpp_source=reader.mpp_source,
        target_mpp=float(target_mpp), tile_size=int(tile_size), tile_size_level0=ts0, level=level,
        level_downsample=float(ds), read_size=read_size, stride_level0=stride0, coords=coords,
        tissue_fraction=frac, n_grid=n_grid, min_tissue=float(min_tissue), status=status, reason=reason,
        mask=mask, thumb=thumb, thumb_scale=(sx, sy))


def _coverage(mask: np.ndarray, grid: np.ndarray, ts0: int, sx: float, sy: float) -> np.ndarray:
    """Fraction of each level-0 square ``(x, y, ts0)`` covered by the thumbnail mask."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(grid[:, 0] / sx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(grid[:, 1] / sy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((grid[:, 0] + ts0) / sx).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.ceil((grid[:, 1] + ts0) / sy).astype(np.int64), y0 + 1, h)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return s / ((x1 - x0) * (y1 - y0))


def read_tile(reader: SlideReader, plan: TilingPlan, coord) -> np.ndarray:
    """Read the tile whose level-0 top-left corner is ``coord = (x, y)``.

    Returns:
        RGB ``uint8`` ``(tile_size, tile_size, 3)``: ``read_size`` px read at
        ``plan.level`` and resized (Pillow bilinear, antialiased) when needed.

    Raises:
        SlideReadError: the region could not be decoded (names slide and coords).
    """
    region = reader.read_region((int(coord[0]), int(coord[1])), plan.level, (plan.read_size, plan.read_size))
    if plan.read_size != plan.tile_size:
        region = np.asarray(Image.fromarray(region).resize((plan.tile_size, plan.tile_size),
                                                           Image.Resampling.BILINEAR))
    return region


def iter_tiles(
    reader: SlideReader,
    plan: TilingPlan,
    on_error: Callable[[int, tuple[int, int], Exception], None] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Stream the tiles of ``plan`` one at a time.

    Yields:
        ``(index, coord, tile)``: row in ``plan.coords``, ``(2,)`` int64 level-0 ``(x, y)``,
        RGB ``uint8`` ``(tile_size, tile_size, 3)``.

    A tile that fails to decode (:class:`SlideReadError`) is skipped; ``on_error(index,
    (x, y), exc)`` is called for it (default: a warning naming slide and coords).
    """
    for i, c in enumerate(plan.coords):
        try:
            tile = read_tile(reader, plan, c)
        except SlideReadError as e:
            if on_error is None:
                warnings.warn(f"skipping tile {i} at level-0 ({c[0]}, {c[1]}): {e}", stacklevel=2)
            else:
                on_error(i, (int(c[0]), int(c[1])), e)
            continue
        yield i, c, tile


def save_preview(plan: TilingPlan, path: str | Path, max_size: int = 1024) -> Path:
    """Write a PNG: thumbnail, tissue mask tinted green, tile grid outlined in blue.

    Args:
        plan: a tiling plan (holds thumbnail, mask and coords).
        path: output ``.png``; parent folders are created.
        max_size: not used beyond the plan's thumbnail size (kept for API symmetry).

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    thumb = plan.thumb.astype(np.float32)
    if plan.mask is not None:
        green = np.array([40, 200, 60], np.float32)
        thumb[plan.mask] = 0.7 * thumb[plan.mask] + 0.3 * green
    im = Image.fromarray(np.clip(thumb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    sx, sy = plan.thumb_scale
    for x, y in plan.coords:
        draw.rectangle([x / sx, y / sy, (x + plan.tile_size_level0) / sx - 1,
                        (y + plan.tile_size_level0) / sy - 1], outline=(30, 60, 230))
    text = f"{plan.slide_id}: {plan.n_tiles} tiles {plan.tile_size}px @ {plan.target_mpp:g} um/px (level {plan.level})"
    draw.text((4, 4), text if plan.status == "ok" else f"{text} - {plan.reason}", fill=(0, 0, 0))
    im.save(path)
    return path


__all__ = ["TilingPlan", "plan_tiles", "read_tile", "iter_tiles", "save_preview", "choose_level"]
