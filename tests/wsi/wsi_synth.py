"""Writers of synthetic slides (tifffile) used by the wsi tests and the slide benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

TISSUE = (170, 80, 150)  # an H&E-like pink/purple
GLASS = (242, 242, 242)


def write_pyramid(path: Path, levels: list[np.ndarray], mpp: float | None, compression="jpeg", tile=128,
                  resolutionunit="CENTIMETER", xres=None) -> Path:
    """Tiled pyramid TIFF, one IFD per level (OpenSlide 'generic-tiff' and tiffslide read it)."""
    with tifffile.TiffWriter(path) as tw:
        for k, lev in enumerate(levels):
            kw = {}
            if xres is not None:
                kw = dict(resolution=(xres, xres), resolutionunit=resolutionunit)
            elif mpp is not None:
                ds = levels[0].shape[1] / lev.shape[1]
                kw = dict(resolution=(1e4 / (mpp * ds),) * 2, resolutionunit="CENTIMETER")
            else:
                kw = dict(resolutionunit="NONE")
            tw.write(lev, tile=(tile, tile), compression=compression, photometric="rgb", metadata=None,
                     subfiletype=1 if k else 0, **kw)
    return path


def position_level(w: int, h: int) -> np.ndarray:
    """Pixels encode their own position: R = x % 256, G = y % 256, B = 16 (x // 256) + y // 256."""
    x = np.arange(w)[None, :].repeat(h, 0)
    y = np.arange(h)[:, None].repeat(w, 1)
    return np.stack([x % 256, y % 256, 16 * (x // 256) + y // 256], -1).astype(np.uint8)


def decode_position(tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`position_level`: (x, y) arrays of a tile."""
    t = tile.astype(np.int64)
    return t[..., 0] + 256 * (t[..., 2] // 16), t[..., 1] + 256 * (t[..., 2] % 16)


def tissue_image(w: int, h: int, seed: int = 0, box=None) -> np.ndarray:
    """Glass with a textured tissue rectangle ``box = (x0, y0, x1, y1)`` (default: central 70 %)."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GLASS
    x0, y0, x1, y1 = box or (int(0.15 * w), int(0.15 * h), int(0.85 * w), int(0.85 * h))
    noise = rng.integers(-25, 25, size=(y1 - y0, x1 - x0, 1))
    img[y0:y1, x0:x1] = np.clip(np.array(TISSUE)[None, None] + noise, 0, 255)
    return img


def corrupt_tile(path: Path, tile_index: int) -> None:
    """Truncate one level-0 JPEG tile to half its bytes (its TileByteCounts entry is halved),
    as a partly written file leaves it."""
    with tifffile.TiffFile(path, mode="r+b") as tf:
        page = tf.pages[0]
        counts = list(page.databytecounts)
        counts[tile_index] //= 2
        page.tags["TileByteCounts"].overwrite(counts)


def zero_fill_tile(path: Path, tile_index: int) -> None:
    """Cut one level-0 tile's compressed stream short by zero-filling its second half; its
    byte count is unchanged, so readers decode it without an error."""
    with tifffile.TiffFile(path) as tf:
        off, n = tf.pages[0].dataoffsets[tile_index], tf.pages[0].databytecounts[tile_index]
    with open(path, "r+b") as f:
        f.seek(off + n // 2)
        f.write(b"\x00" * (n - n // 2))
