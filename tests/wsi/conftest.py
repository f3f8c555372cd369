"""Synthetic slides written with tifffile, and the real slides of ``data_root()/wsi``.

All synthetic slides are tiny (<= 1.3 Mpx) so the whole folder runs in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from wsi_synth import GLASS, corrupt_tile, position_level, tissue_image, write_pyramid


@pytest.fixture(scope="session")
def slides_dir(tmp_path_factory) -> Path:
    """A folder of synthetic slides covering the pitfalls (see each file's comment)."""
    d = tmp_path_factory.mktemp("slides")
    # 1. position-encoding pyramid: level 1 = 320 x 256 px, level 0 = 4x (1280 x 1024), 0.25 um/px, lossless
    l1 = position_level(320, 256)
    l0 = l1.repeat(4, 0).repeat(4, 1)
    write_pyramid(d / "position.tif", [l0, l1], mpp=0.25, compression="zlib")
    # 2. tissue pyramid with resolution tags, JPEG tiles, 0.5 um/px, 1024 x 768
    t0 = tissue_image(1024, 768, seed=1)
    write_pyramid(d / "tissue.tif", [t0, t0[::4, ::4].copy()], mpp=0.5)
    # 3. the same without any resolution tags
    write_pyramid(d / "nores.tif", [t0, t0[::4, ::4].copy()], mpp=None)
    # 4. smaller than one tile: 180 x 150 px
    write_pyramid(d / "tiny.tif", [tissue_image(180, 150, seed=2)], mpp=0.5, tile=64)
    # 5. blank glass, no tissue
    blank = np.full((768, 768, 3), GLASS, np.uint8)
    blank += np.random.default_rng(3).integers(0, 4, blank.shape, dtype=np.uint8)
    write_pyramid(d / "blank.tif", [blank, blank[::4, ::4].copy()], mpp=0.5)
    # 6. tissue everywhere, one corrupt JPEG tile (level-0 tile index 5 = column 5, row 0 of 128-px tiles)
    full = tissue_image(1024, 512, seed=4, box=(0, 0, 1024, 512))
    write_pyramid(d / "corrupt.tif", [full, full[::4, ::4].copy()], mpp=0.5)
    corrupt_tile(d / "corrupt.tif", 5)
    return d


@pytest.fixture(scope="session")
def odd_dir(tmp_path_factory) -> Path:
    """Files with odd or missing resolution: default 1 px/inch tags, a strip TIFF, a PNG."""
    d = tmp_path_factory.mktemp("odd")
    t0 = tissue_image(512, 512, seed=5)
    write_pyramid(d / "inch1.tif", [t0], mpp=None, xres=1.0, resolutionunit="INCH")
    tifffile.imwrite(d / "strip.tif", t0, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER", metadata=None)
    Image.fromarray(t0).save(d / "plain.png")
    (d / "notaslide.svs").write_text("this is not an image\n")
    return d


@pytest.fixture(scope="session")
def real_wsi_dir() -> Path:
    """``data_root()/wsi`` with the two real SVS files, or skip."""
    from jwth.settings import data_root

    try:
        root = data_root()
    except FileNotFoundError as e:
        pytest.skip(f"real slides need the data root: {e}")
    d = root / "wsi"
    if not (d / "CMU-1-Small-Region.svs").is_file() or not (d / "TCGA-CR-7395-01A-01-TS1.svs").is_file():
        pytest.skip(f"real slides not found in {d}")
    return d


@pytest.fixture
def fresh_slides(slides_dir, tmp_path) -> Path:
    """A writable copy of the synthetic slides (for commands that write beside inputs)."""
    d = tmp_path / "slides"
    shutil.copytree(slides_dir, d)
    return d


@pytest.fixture(scope="session")
def tiny_encoder():
    """A random-init ViT-Tiny at 32 px (4 x 4 patch tokens, D = 192): fast on CPU."""
    from jwth.encoders import load_encoder

    return load_encoder("timm:vit_tiny_patch16_224?img_size=32")
