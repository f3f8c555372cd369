"""Slide reading: backends, mpp metadata and overrides, edge padding."""

from __future__ import annotations

import numpy as np
import pytest
from wsi_synth import decode_position

from jwth.wsi.reader import MissingMppError, SlideReadError, mpp_from_aperio_description, mpp_from_tiff_tags, open_slide


def test_real_svs_mpp_and_jpeg2000(real_wsi_dir):
    with open_slide(real_wsi_dir / "CMU-1-Small-Region.svs") as r:
        assert r.backend == "openslide"
        assert r.mpp == pytest.approx(0.499)
        assert r.dimensions == (2220, 2967)
        assert r.read_region((1000, 1000), 0, (64, 48)).shape == (48, 64, 3)
    # the TCGA fixture is Aperio JPEG 2000 (compression 33005) without MPP/AppMag
    with open_slide(real_wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs") as r:
        assert r.level_count == 2 and r.dimensions == (4443, 3567)
        assert r.mpp is None
        tile = r.read_region((2000, 1500), 1, (64, 64))
        assert tile.dtype == np.uint8 and tile.shape == (64, 64, 3)
        assert tile.std() > 5  # decoded tissue, not a flat fill
        with pytest.raises(MissingMppError, match=r"TCGA-CR-7395-01A-01-TS1\.svs.*--mpp"):
            r.require_mpp()
    with open_slide(real_wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs", mpp=0.5) as r:
        assert r.require_mpp() == 0.5 and r.mpp_source == "override"
        assert r.level_mpp(1) == pytest.approx(0.5 * 2.0005, rel=1e-3)


def test_default_mpp_only_fills_missing_metadata(real_wsi_dir):
    with open_slide(real_wsi_dir / "CMU-1-Small-Region.svs", default_mpp=0.3) as r:
        assert r.mpp == pytest.approx(0.499) and r.mpp_source == "metadata"
    with open_slide(real_wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs", default_mpp=0.3) as r:
        assert r.mpp == 0.3 and r.mpp_source == "default"


def test_synthetic_resolution_tags(slides_dir):
    with open_slide(slides_dir / "tissue.tif") as r:
        assert r.mpp == pytest.approx(0.5)
    with open_slide(slides_dir / "nores.tif") as r:
        assert r.mpp is None
        with pytest.raises(MissingMppError, match=r"nores\.tif.*--mpp"):
            r.require_mpp()


def test_implausible_resolution_is_missing(odd_dir):
    with pytest.warns(UserWarning, match="implausible resolution"):
        r = open_slide(odd_dir / "inch1.tif")
    assert r.mpp is None  # 1 px/inch = 25,400 um/px is the TIFF default, not a scan resolution
    r.close()


def test_fallback_readers(odd_dir):
    with open_slide(odd_dir / "strip.tif") as r:  # OpenSlide refuses strip TIFFs
        assert r.backend in ("tiffslide", "image")
        assert r.mpp == pytest.approx(0.5)
        assert r.read_region((0, 0), 0, (32, 32)).shape == (32, 32, 3)
    with open_slide(odd_dir / "plain.png") as r:
        assert r.backend == "image" and r.mpp is None
        with pytest.raises(MissingMppError, match="--mpp"):
            r.require_mpp()
    with open_slide(odd_dir / "plain.png", mpp=0.5) as r:
        assert r.mpp == 0.5


def test_unreadable_file_names_it_and_each_backend(odd_dir):
    with pytest.raises(SlideReadError, match=r"(?s)notaslide\.svs.*openslide.*tiffslide.*image"):
        open_slide(odd_dir / "notaslide.svs")
    with pytest.raises(FileNotFoundError):
        open_slide(odd_dir / "missing.svs")
    with pytest.raises(ValueError, match="--mpp"):
        open_slide(odd_dir / "plain.png", mpp=-1)


def test_helpers():
    assert mpp_from_tiff_tags(20000, "centimeter") == pytest.approx(0.5)
    assert mpp_from_tiff_tags(50800, 2) == pytest.approx(0.5)
    assert mpp_from_tiff_tags(1, "none") is None
    assert mpp_from_aperio_description("Aperio Image Library |AppMag = 20|MPP = 0.4990|") == pytest.approx(0.499)
    assert mpp_from_aperio_description("no mpp here") is None


def test_edge_padding_same_on_every_backend(slides_dir):
    """Reads past the edge at level > 0 are tile-sized and padded white by every backend."""
    path = slides_dir / "position.tif"  # lossless, level 1 is 320 x 256
    loc, size = (1280 - 4 * 20, 1024 - 4 * 10), (64, 64)  # 20 px / 10 px of real data at level 1
    outs = {}
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as r:
            outs[backend] = r.read_region(loc, 1, size)
    a, b = outs["openslide"], outs["tiffslide"]
    assert a.shape == b.shape == (64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert (a[:, 20:] == 255).all() and (a[10:, :] == 255).all()
    x, y = decode_position(a[:10, :20])
    assert x[0, 0] == 300 and y[0, 0] == 246  # (1280 - 80) / 4, (1024 - 40) / 4


def test_corrupt_tile_raises_and_reader_recovers(slides_dir):
    with open_slide(slides_dir / "corrupt.tif") as r:
        with pytest.raises(SlideReadError, match=r"corrupt\.tif.*x=640, y=0"):
            r.read_region((640, 0), 0, (128, 128))
        ok = r.read_region((0, 0), 0, (128, 128))  # OpenSlide errors are sticky: the handle was reopened
        assert ok.std() > 3
