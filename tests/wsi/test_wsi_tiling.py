"""Tiling at a target mpp: level choice, coordinates, tissue, edge cases, streaming."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from PIL import Image
from wsi_synth import decode_position

from jwth.wsi.reader import MissingMppError, open_slide
from jwth.wsi.tiling import choose_level, iter_tiles, plan_tiles, read_tile, save_preview
from jwth.wsi.tissue import tissue_mask


def test_choose_level():
    assert choose_level([1.0, 4.0, 16.0], 4.0) == 1
    assert choose_level([1.0, 4.0, 16.0], 3.9) == 0
    assert choose_level([1.0, 2.0005], 2.0) == 1  # vendor rounding tolerated
    assert choose_level([1.0, 4.0], 0.5) == 0


def test_level1_tiles_cover_level_once_at_their_coords(slides_dir):
    """Tiles read at level 1 do not overlap, cover it once and sit where their level-0 coords say."""
    with open_slide(slides_dir / "position.tif") as r:  # 0.25 um/px, level 1 = 1.0 um/px, 320 x 256
        plan = plan_tiles(r, target_mpp=1.0, tile_size=64, tissue="none")
        assert (plan.level, plan.read_size, plan.tile_size_level0) == (1, 64, 256)
        assert plan.n_tiles == 5 * 4
        seen = np.zeros((256, 320), int)
        for _, (x, y), tile in iter_tiles(r, plan):
            px, py = decode_position(tile)
            assert px[0, 0] == x // 4 and py[0, 0] == y // 4  # location is level-0, size is level-k
            np.testing.assert_array_equal(px, x // 4 + np.arange(64)[None, :].repeat(64, 0))
            np.testing.assert_array_equal(py, y // 4 + np.arange(64)[:, None].repeat(64, 1))
            seen[py, px] += 1
        assert (seen == 1).all()


def test_coordinate_convention_and_reread(slides_dir):
    """256-px tiles at 0.5 um/px from a 0.25 um/px slide: spacing 512 level-0 px; re-reading works."""
    with open_slide(slides_dir / "position.tif") as r:
        plan = plan_tiles(r, target_mpp=0.5, tile_size=256, tissue="none")
        a = plan.attrs()
        assert a["patch_size"] == 256 and a["patch_size_level0"] == 512 and a["target_mpp"] == 0.5
        assert a["level"] == a["patch_level"] == 0 and a["mpp"] == 0.25 and a["read_size"] == 512
        xs, ys = np.unique(plan.coords[:, 0]), np.unique(plan.coords[:, 1])
        np.testing.assert_array_equal(xs, [0, 512])  # only full tiles fit in 1280 px
        np.testing.assert_array_equal(ys, [0, 512])
        tiles = {tuple(c): t for _, c, t in iter_tiles(r, plan)}
    # re-read one tile from coords + attributes only, through another backend
    x, y = 512, 512
    with open_slide(slides_dir / "position.tif", backend="tiffslide") as r2:
        region = r2.read_region((x, y), a["level"], (a["read_size"],) * 2)
    again = np.asarray(Image.fromarray(region).resize((a["patch_size"],) * 2, Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(again, tiles[(x, y)])


def test_missing_mpp_fails_clearly_then_tiles_with_override(slides_dir):
    with open_slide(slides_dir / "nores.tif") as r:
        with pytest.raises(MissingMppError, match=r"nores\.tif.*--mpp"):
            plan_tiles(r)
    with open_slide(slides_dir / "nores.tif", mpp=0.5) as r:
        plan = plan_tiles(r, target_mpp=0.5, tile_size=128)
        assert plan.n_tiles > 0 and plan.mpp_source == "override"


def test_slide_smaller_than_a_tile(slides_dir):
    t0 = time.perf_counter()
    with open_slide(slides_dir / "tiny.tif") as r:  # 180 x 150 px at 0.5 um/px
        with pytest.warns(UserWarning, match="smaller than one tile"):
            plan = plan_tiles(r, target_mpp=0.5, tile_size=224)
    assert plan.n_tiles == 0 and plan.status == "empty" and "smaller than one tile" in plan.reason
    assert list(iter_tiles(open_slide(slides_dir / "tiny.tif"), plan)) == []
    assert time.perf_counter() - t0 < 5


def test_blank_slide_has_no_tissue(slides_dir):
    with open_slide(slides_dir / "blank.tif") as r:
        with pytest.warns(UserWarning, match="0 tiles"):
            plan = plan_tiles(r, target_mpp=0.5, tile_size=128)
    assert plan.n_tiles == 0 and plan.status == "empty" and "tissue" in plan.reason
    assert plan.n_grid == 36 and not plan.mask.any()


def test_tissue_mask_finds_the_tissue_box(slides_dir):
    with open_slide(slides_dir / "tissue.tif") as r:  # tissue in the central 70 % box
        thumb, (sx, sy) = r.get_thumbnail(256)
        plan = plan_tiles(r, target_mpp=0.5, tile_size=128, min_tissue=0.5)
    mask = tissue_mask(thumb)
    h, w = mask.shape
    assert mask[h // 2, w // 2] and not mask[2, 2] and not mask[-3, -3]
    assert 0.35 < mask.mean() < 0.6  # 0.7 x 0.7 = 0.49
    # kept tiles lie in the box (0.15..0.85 of 1024 x 768), grid tiles outside are dropped
    assert 0 < plan.n_tiles < plan.n_grid
    assert (plan.coords[:, 0] + 64 >= 0.15 * 1024).all() and (plan.coords[:, 0] + 64 <= 0.85 * 1024).all()
    assert (plan.tissue_fraction >= 0.5).all()
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask(thumb[..., 0])


def test_real_slide_tiling_and_preview(real_wsi_dir, tmp_path):
    with open_slide(real_wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs", mpp=0.25) as r:
        plan = plan_tiles(r, target_mpp=0.5, tile_size=224)
        assert plan.level == 1 and plan.read_size == 224 and plan.tile_size_level0 == 448
        assert 0.3 < plan.mask.mean() < 0.95  # a frozen section with background around it
        assert 0 < plan.n_tiles < plan.n_grid
        tile = read_tile(r, plan, plan.coords[0])
        assert tile.shape == (224, 224, 3)
    png = save_preview(plan, tmp_path / "preview.png")
    im = Image.open(png)
    assert im.size == (plan.thumb.shape[1], plan.thumb.shape[0])
    # tiles are outlined in blue: the preview differs from the thumbnail on the grid lines
    arr = np.asarray(im.convert("RGB")).astype(int)
    x0, y0 = (plan.coords[0] / np.array(plan.thumb_scale)).astype(int)
    assert tuple(arr[y0 + 3, x0]) == (30, 60, 230)


def test_corrupt_tile_is_skipped_and_reported(slides_dir):
    errors = []
    with open_slide(slides_dir / "corrupt.tif") as r:
        plan = plan_tiles(r, target_mpp=0.5, tile_size=128, tissue="none")
        got = list(iter_tiles(r, plan, on_error=lambda i, xy, e: errors.append((i, xy, str(e)))))
    assert len(got) == plan.n_tiles - 1
    assert [e[1] for e in errors] == [(640, 0)] and "corrupt.tif" in errors[0][2]
    assert (640, 0) not in {tuple(c) for _, c, _ in got}


def test_tiles_stream_without_reading_the_whole_slide(slides_dir, monkeypatch):
    with open_slide(slides_dir / "tissue.tif") as r:
        plan = plan_tiles(r, target_mpp=0.5, tile_size=64, tissue="none")
        sizes = []
        orig = r.read_region

        def spy(loc, level, size):
            sizes.append(size)
            return orig(loc, level, size)

        monkeypatch.setattr(r, "read_region", spy)
        it = iter_tiles(r, plan)
        next(it)
        assert len(sizes) == 1  # lazy: one tile read per tile yielded
        n = 1 + sum(1 for _ in it)
    assert n == plan.n_tiles == len(sizes)
    assert max(max(s) for s in sizes) == 64


def test_upsampling_warns(slides_dir):
    with open_slide(slides_dir / "tissue.tif") as r, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        plan = plan_tiles(r, target_mpp=0.25, tile_size=64)
    assert any("upsampled" in str(x.message) for x in w)
    assert plan.read_size == 32 and plan.level == 0


def test_tiles_stay_inside_slide_bounds(slides_dir):
    """Slides whose scanned region starts at an offset (OpenSlide bounds-*): coords stay inside."""
    with open_slide(slides_dir / "tissue.tif") as r:
        r.bounds = (100, 60, 500, 300)
        plan = plan_tiles(r, target_mpp=0.5, tile_size=64, tissue="none")
    x, y = plan.coords[:, 0], plan.coords[:, 1]
    assert x.min() == 100 and y.min() == 60
    assert (x + 64 <= 600).all() and (y + 64 <= 360).all()
    assert plan.n_tiles == (500 // 64) * (300 // 64)
