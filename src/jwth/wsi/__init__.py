"""Whole-slide images: reading, tissue detection, tiling at a target mpp,
per-slide feature extraction (CLAM/TRIDENT HDF5 layout) and heatmaps.

Conventions used everywhere in this package:

- Coordinates (``coords``) are the **level-0 top-left corner** of a tile, in level-0
  pixels, as ``(x, y)`` integers.
- ``mpp`` is microns per pixel (um/px) of level 0; ``target_mpp`` is the resolution
  the tiles are delivered at.
- ``tile_size`` is the tile edge in px at ``target_mpp``; ``tile_size_level0`` its
  edge in level-0 px; ``read_size`` its edge in px at the pyramid ``level`` read.
- Pixels outside the slide are filled with white (255, 255, 255) by every backend.
"""

from jwth.wsi.reader import MissingMppError, SlideReadError, SlideReader, open_slide
from jwth.wsi.tiling import TilingPlan, iter_tiles, plan_tiles, read_tile, save_preview

__all__ = [
    "MissingMppError",
    "SlideReadError",
    "SlideReader",
    "open_slide",
    "TilingPlan",
    "plan_tiles",
    "iter_tiles",
    "read_tile",
    "save_preview",
]
