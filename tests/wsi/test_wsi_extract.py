"""Per-slide extraction (CLAM/TRIDENT HDF5), resume, error logs, sharding, CLI, heatmaps."""

from __future__ import annotations

import csv
import json
import os

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jwth.wsi.extract import embed_tokens, extract_slides, find_slides, shard
from jwth.wsi.heatmap import draw_heatmap, score_canvas
from jwth.wsi.reader import open_slide
from jwth.wsi.tiling import plan_tiles, read_tile

KW = dict(target_mpp=1.0, tile_size=32, batch_size=16)


def _status(out):
    return [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]


def test_layout_resume_and_failures(fresh_slides, tmp_path, tiny_encoder):
    out = tmp_path / "out"
    slides = [fresh_slides / n for n in ("tissue.tif", "nores.tif", "blank.tif", "corrupt.tif")]
    with pytest.warns(UserWarning):  # fp32: the features are compared with an fp32 forward below (auto is bf16
        # on CPUs with native bf16 units)
        recs = {r["slide"]: r for r in extract_slides(slides, out, tiny_encoder, precision="fp32", **KW)}
    assert recs["tissue"]["status"] == "done" and recs["tissue"]["n_tiles"] > 0
    assert recs["nores"]["status"] == "failed" and "--mpp" in recs["nores"]["reason"]
    assert recs["blank"]["status"] == "empty" and "tissue" in recs["blank"]["reason"]
    # the truncated 128-px JPEG tile at (640, 0) lies under four 64-px (level-0) tiles
    assert recs["corrupt"]["status"] == "done" and recs["corrupt"]["n_bad_tiles"] == 4
    assert not (out / "features" / "nores.h5").exists()
    assert not list((out / "features").glob("*.partial"))

    # CLAM / TRIDENT layout
    with h5py.File(out / "features" / "tissue.h5") as f:
        feats, coords = f["features"][()], f["coords"][()]
        ca = dict(f["coords"].attrs)
        assert feats.shape == (recs["tissue"]["n_tiles"], 192) and feats.dtype == np.float32
        assert coords.shape == (len(feats), 2) and coords.dtype == np.int64
        assert ca["patch_size"] == 32 and ca["patch_size_level0"] == 64 and ca["patch_level"] == 0
        assert ca["target_mpp"] == 1.0 and ca["mpp"] == 0.5 and ca["name"] == "tissue"
        assert f.attrs["encoder"] == tiny_encoder.spec and f.attrs["embedding"] == "cls"
        assert np.isfinite(feats).all()
    # features of a tile equal the encoder on that tile re-read from coords + attrs
    with open_slide(fresh_slides / "tissue.tif") as r:
        plan = plan_tiles(r, target_mpp=1.0, tile_size=32)
        from PIL import Image

        x = tiny_encoder.transform(Image.fromarray(read_tile(r, plan, coords[3])))[None]
    np.testing.assert_allclose(tiny_encoder(x).cls[0].numpy(), feats[3], atol=1e-4)

    # corrupt tile logged with its coordinates, the slide finished without it
    rows = list(csv.DictReader(open(out / "tile_errors.csv")))
    bad = {(640, 0), (704, 0), (640, 64), (704, 64)}
    assert {(r["slide"], int(r["x"]), int(r["y"])) for r in rows} == {("corrupt", x, y) for x, y in bad}
    with h5py.File(out / "features" / "corrupt.h5") as f:
        assert not bad & {tuple(c) for c in f["coords"][()].tolist()} and f.attrs["n_bad_tiles"] == 4

    # re-run: finished slides are skipped (file untouched); the failed one works with --default-mpp
    mtime = os.path.getmtime(out / "features" / "tissue.h5")
    recs2 = {r["slide"]: r for r in extract_slides(slides, out, tiny_encoder, default_mpp=0.5, **KW)}
    assert recs2["tissue"]["status"] == "skipped" and recs2["blank"]["status"] == "skipped"
    assert recs2["nores"]["status"] == "done"
    assert os.path.getmtime(out / "features" / "tissue.h5") == mtime
    assert len(_status(out)) == 8


def test_embeddings_and_patch_tokens(slides_dir, tmp_path, tiny_encoder):
    s = [slides_dir / "tissue.tif"]
    extract_slides(s, tmp_path / "cls", tiny_encoder, **KW)
    extract_slides(s, tmp_path / "jwth", tiny_encoder, embedding="jwth", save_patch_tokens=True, **KW)
    extract_slides(s, tmp_path / "cm", tiny_encoder, embedding="cls+mean", **KW)
    with h5py.File(tmp_path / "cls/features/tissue.h5") as a, h5py.File(tmp_path / "jwth/features/tissue.h5") as b, \
            h5py.File(tmp_path / "cm/features/tissue.h5") as c:
        cls, jw, cm = a["features"][()], b["features"][()], c["features"][()]
        assert jw.shape == cm.shape == (len(cls), 384)
        np.testing.assert_allclose(jw[:, :192], cls, atol=1e-5)
        P = b["patch_tokens"][()].astype(np.float32)
        assert P.shape == (len(cls), 4, 192)
        np.testing.assert_allclose(cm[:, 192:], P.mean(1), atol=2e-2)
        from jwth.heads.attention_pool import class_attention_pool

        pooled, _ = class_attention_pool(torch.tensor(cls), torch.tensor(P))
        np.testing.assert_allclose(jw[:, 192:], pooled.numpy(), atol=2e-2)
    with pytest.raises(ValueError, match="Unknown embedding"):
        embed_tokens(torch.zeros(1, 4), torch.zeros(1, 2, 4), "max")


def test_torchrun_sharding_equals_single_process(slides_dir, tmp_path, tiny_encoder):
    slides = [slides_dir / n for n in ("tissue.tif", "corrupt.tif", "position.tif")]
    assert shard(slides, 0, 2) == [slides[0], slides[2]] and shard(slides, 1, 2) == [slides[1]]
    with pytest.raises(ValueError, match="RANK"):
        shard(slides, 2, 2)
    kw = dict(KW, tissue="none")
    extract_slides(slides, tmp_path / "single", tiny_encoder, **kw)
    for rank in (0, 1):
        extract_slides(slides, tmp_path / "multi", tiny_encoder, rank=rank, world_size=2, **kw)
    for s in slides:
        with h5py.File(tmp_path / "single/features" / f"{s.stem}.h5") as a, \
                h5py.File(tmp_path / "multi/features" / f"{s.stem}.h5") as b:
            np.testing.assert_array_equal(a["coords"][()], b["coords"][()])
            np.testing.assert_allclose(a["features"][()], b["features"][()], atol=1e-6)
    assert {r["rank"] for r in _status(tmp_path / "multi")} == {0, 1}


def test_find_slides(slides_dir, tmp_path):
    found = find_slides([slides_dir])
    assert [p.name for p in found] == sorted(p.name for p in slides_dir.glob("*.tif"))
    lst = tmp_path / "list.csv"
    lst.write_text(f"path\n{slides_dir / 'tissue.tif'}\n")
    assert find_slides([lst]) == [slides_dir / "tissue.tif"]
    with pytest.raises(FileNotFoundError):
        find_slides([tmp_path / "nope"])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tissue.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="share the name"):
        find_slides([slides_dir / "tissue.tif", tmp_path / "a" / "tissue.tif"])


def test_heatmap_aligned_with_coords(slides_dir, tmp_path):
    coords = np.array([[0, 0], [256, 0], [512, 256]])
    canvas = score_canvas(coords, np.array([1.0, 2.0, 3.0]), 256, (96, 128), (8.0, 8.0))
    assert canvas[0, 0] == 1.0 and canvas[31, 31] == 1.0 and canvas[0, 32] == 2.0
    assert canvas[32 + 5, 64 + 5] == 3.0 and np.isnan(canvas[40, 10])
    out = draw_heatmap(slides_dir / "tissue.tif", coords, np.array([0.1, 0.5, 0.9]), 256, tmp_path / "h.png",
                       normalize="none")
    assert (tmp_path / "h.png").stat().st_size > 1000
    with open_slide(slides_dir / "tissue.tif") as r:
        _, (sx, sy) = r.get_thumbnail(1024)
    assert out[int(300 / sy), int(600 / sx)] == pytest.approx(0.9)


def test_cli_tile_and_extract_on_real_slides(real_wsi_dir, tmp_path):
    from jwth.cli import app

    runner = CliRunner()
    out = tmp_path / "tiles"
    res = runner.invoke(app, ["tile", str(real_wsi_dir), "--out", str(out), "--tile-size", "224"])
    assert res.exit_code == 3, res.output  # one of two slides failed: not a silent success
    assert "1 of 2 slide(s) failed" in res.output
    st = {r["slide"]: r for r in _status(out)}
    assert st["CMU-1-Small-Region"]["status"] == "ok" and st["CMU-1-Small-Region"]["n_tiles"] > 10
    assert st["TCGA-CR-7395-01A-01-TS1"]["status"] == "failed"
    assert "--mpp" in st["TCGA-CR-7395-01A-01-TS1"]["reason"]
    res = runner.invoke(app, ["tile", str(real_wsi_dir / "TCGA-CR-7395-01A-01-TS1.svs"), "--out", str(out),
                              "--mpp", "0.5"])
    assert res.exit_code == 0, res.output
    assert (out / "previews" / "TCGA-CR-7395-01A-01-TS1.png").is_file()
    with h5py.File(out / "coords" / "TCGA-CR-7395-01A-01-TS1.h5") as f:
        assert f["coords"].shape[0] > 50 and f["coords"].attrs["patch_size_level0"] == 224

    ext = tmp_path / "ext"
    args = ["extract-slides", str(real_wsi_dir), "--out", str(ext), "--encoder",
            "timm:vit_tiny_patch16_224?img_size=32", "--target-mpp", "4.0", "--tile-size", "32",
            "--embedding", "jwth", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 3, res.output
    assert (ext / "features" / "CMU-1-Small-Region.h5").is_file()
    assert not (ext / "features" / "TCGA-CR-7395-01A-01-TS1.h5").exists()
    res = runner.invoke(app, args + ["--default-mpp", "0.5"])
    assert res.exit_code == 0, res.output
    st = [r for r in _status(ext)][-2:]
    assert {r["slide"]: r["status"] for r in st} == {"CMU-1-Small-Region": "skipped",
                                                      "TCGA-CR-7395-01A-01-TS1": "done"}
    with h5py.File(ext / "features" / "TCGA-CR-7395-01A-01-TS1.h5") as f:
        assert f["features"].shape[1] == 384 and f.attrs["level"] == 1 and f.attrs["mpp_source"] == "default"


def test_cli_mil_then_heatmap(slides_dir, tmp_path, tiny_encoder):
    """extract-slides -> mil (slide bags) -> heatmap of the saved ABMIL model, end to end."""
    from jwth.cli import app

    out = tmp_path / "ext"
    extract_slides([slides_dir / "tissue.tif"], out, tiny_encoder, **KW)
    rng = np.random.default_rng(0)
    rows = ["slide_id,label,patient_id", "tissue,MSS,P00"]
    for i in range(1, 12):  # more slides: random 192-d features (the width of the tiny encoder)
        with h5py.File(out / "features" / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(3 + i, 192)).astype(np.float32)
            f["coords"] = np.zeros((3 + i, 2), np.int64)
            f.attrs["embedding"] = "cls"
        rows.append(f"s{i},{'MSIMUT' if i % 2 else 'MSS'},P{i:02d}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["mil", "--features", str(out / "features"), "--labels", str(tmp_path / "labels.csv"),
                              "--embedding", "cls", "--epochs", "2", "--folds", "2", "--n-boot", "20",
                              "--out", str(tmp_path / "mil")])
    assert res.exit_code == 0, res.output
    assert "bag size only" in (tmp_path / "mil" / "results.md").read_text()
    png = tmp_path / "heat.png"
    res = runner.invoke(app, ["heatmap", str(slides_dir / "tissue.tif"), "--features",
                              str(out / "features" / "tissue.h5"), "--model", str(tmp_path / "mil" / "model_abmil_cls.pt"),
                              "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 1000
    res = runner.invoke(app, ["mil", "--labels", "x.csv"])
    assert res.exit_code != 0 and "--cache" in res.output
