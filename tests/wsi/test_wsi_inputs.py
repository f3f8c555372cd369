"""Slide inputs that peer tools got wrong: zero-filled tile streams, unfinished features
files, CLAM-written features files, and the read recipe for CLAM-style readers."""

from __future__ import annotations

import csv
import subprocess
import sys

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner
from wsi_synth import decode_position, tissue_image, write_pyramid, zero_fill_tile

from jwth.wsi.extract import COMPLETE_ATTR, extract_slides
from jwth.wsi.heatmap import patch_size_level0
from jwth.wsi.reader import SlideReadError, open_slide
from jwth.wsi.tiling import plan_tiles

KW = dict(target_mpp=1.0, tile_size=32, batch_size=16)


@pytest.fixture(scope="module")
def zero_filled(tmp_path_factory):
    """Tissue everywhere; level-0 JPEG tile 5 (column 5, row 0 of 128-px tiles) cut short and zero-filled."""
    d = tmp_path_factory.mktemp("zf")
    full = tissue_image(1024, 512, seed=4, box=(0, 0, 1024, 512))
    write_pyramid(d / "zerofill.tif", [full, full[::4, ::4].copy()], mpp=0.5)
    zero_fill_tile(d / "zerofill.tif", 5)
    return d / "zerofill.tif"


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_zero_filled_tile_stream_is_detected(zero_filled, backend):
    with open_slide(zero_filled, backend=backend) as r:
        with pytest.raises(SlideReadError, match=r"TIFF tile \(column 5, row 0\).*no end marker.*zero-filled"):
            r.read_region((640, 0), 0, (64, 64))
        assert r.read_region((512, 0), 0, (64, 64)).shape == (64, 64, 3)  # its neighbour is fine
        assert r.read_region((640, 0), 1, (16, 16)).shape == (16, 16, 3)  # level 1 is intact


def test_extract_flags_zero_filled_tiles_with_coords(zero_filled, tmp_path, tiny_encoder):
    out = tmp_path / "out"
    rec = extract_slides([zero_filled], out, tiny_encoder, **KW)[0]
    with open_slide(zero_filled) as r:  # the tiles planned over the damaged 128-px tile at (640, 0)
        planned = {tuple(c) for c in plan_tiles(r, target_mpp=1.0, tile_size=32).coords.tolist()}
    under = planned & {(640, 0), (704, 0), (640, 64), (704, 64)}
    assert under and rec["status"] == "done" and rec["n_bad_tiles"] == len(under)
    rows = list(csv.DictReader(open(out / "tile_errors.csv")))
    assert {(int(r["x"]), int(r["y"])) for r in rows} == under and "zero-filled" in rows[0]["error"]
    with h5py.File(out / "features" / "zerofill.h5") as f:
        assert f.attrs["n_bad_tiles"] == len(under) and not under & {tuple(c) for c in f["coords"][()].tolist()}


def test_unfinished_features_files_are_recomputed(slides_dir, tmp_path, tiny_encoder):
    out = tmp_path / "out"
    slides = [slides_dir / "tissue.tif", slides_dir / "blank.tif"]
    with pytest.warns(UserWarning):
        extract_slides(slides, out, tiny_encoder, **KW)
    tissue, blank = out / "features" / "tissue.h5", out / "features" / "blank.h5"
    n = h5py.File(tissue, "r").attrs["n_tiles"]
    with h5py.File(tissue, "a") as f:  # fewer features rows than coords rows, no completion mark
        f["features"].resize(n // 2, axis=0)
        del f.attrs[COMPLETE_ATTR]
    raw = blank.read_bytes()
    blank.write_bytes(raw[: len(raw) // 2])  # truncated to half its bytes
    with pytest.warns(UserWarning):
        recs = {r["slide"]: r for r in extract_slides(slides, out, tiny_encoder, **KW)}
    assert recs["tissue"]["status"] == "done" and "recomputed" in recs["tissue"]["reason"]
    assert "features rows but" in recs["tissue"]["reason"]
    assert recs["blank"]["status"] == "empty" and "cannot be opened" in recs["blank"]["reason"]
    with h5py.File(tissue, "r") as f:
        assert f["features"].shape[0] == f["coords"].shape[0] == n and f.attrs[COMPLETE_ATTR]
    # a complete file held open by a reader in another process is skipped, not write-opened
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r'); "
                               "print('open', flush=True); sys.stdin.read()", str(tissue)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        rec = extract_slides(slides[:1], out, tiny_encoder, **KW)[0]
        assert rec["status"] == "skipped" and rec["reason"] == "complete features file exists"
    finally:
        holder.communicate("", timeout=10)


def test_clam_features_file_heatmap(slides_dir, tmp_path):
    """A CLAM-written file: coords attrs patch_size + patch_level only."""
    from jwth.cli import app

    h5 = tmp_path / "clam.h5"
    with h5py.File(h5, "w") as f:
        c = f.create_dataset("coords", data=np.array([[0, 0], [256, 256]], np.int64))
        c.attrs["patch_size"], c.attrs["patch_level"] = 64, 1  # 64 px at level 1 (downsample 4) = 256 level-0 px
        f["features"] = np.zeros((2, 4), np.float32)
    attrs = dict(h5py.File(h5, "r")["coords"].attrs)
    assert patch_size_level0(attrs, slides_dir / "tissue.tif") == 256
    with pytest.raises(ValueError, match=r"only \['patch_size'\].*--patch-size-level0"):
        patch_size_level0({"patch_size": 64}, slides_dir / "tissue.tif")
    (tmp_path / "s.csv").write_text("x,y,score\n0,0,1\n256,256,2\n")
    runner = CliRunner()
    res = runner.invoke(app, ["heatmap", str(slides_dir / "tissue.tif"), "--features", str(h5), "--scores",
                              str(tmp_path / "s.csv"), "--out", str(tmp_path / "h.png")])
    assert res.exit_code == 0, res.output
    raw = h5.read_bytes()
    h5.write_bytes(raw[: len(raw) // 2])
    res = runner.invoke(app, ["heatmap", str(slides_dir / "tissue.tif"), "--features", str(h5), "--scores",
                              str(tmp_path / "s.csv"), "--out", str(tmp_path / "h.png")])
    assert res.exit_code == 2 and "cannot be opened as HDF5" in res.output


def test_read_recipe_when_read_size_differs_from_tile_size(slides_dir):
    """256-px tiles at 0.5 um/px from a 0.25 um/px slide with no 0.5 level: read 512 px at level 0."""
    with open_slide(slides_dir / "position.tif") as r:
        plan = plan_tiles(r, target_mpp=0.5, tile_size=256, tissue="none")
        a = plan.attrs()
        assert (a["patch_level"], a["read_size"], a["patch_size"]) == (0, 512, 256)
        assert "size=(512, 512)" in a["read_recipe"] and "NOT (patch_size, patch_size)" in a["read_recipe"]
        x, y = (int(v) for v in plan.coords[1])
        # level 0 repeats each level-1 pixel 4x: positions are in level-1 px
        xs, ys = decode_position(r.read_region((x, y), a["patch_level"], (a["read_size"],) * 2))
        assert 4 * (xs.max() - xs.min() + 1) == a["patch_size_level0"] and 4 * ys.min() == y
        clam = r.read_region((x, y), a["patch_level"], (a["patch_size"],) * 2)  # what a CLAM reader reads
        cx, _ = decode_position(clam)
        assert 4 * (cx.max() - cx.min() + 1) == a["patch_size_level0"] // 2  # half the side, a quarter of the tile
