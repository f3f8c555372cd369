import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jwth.data.tiles import TileError, check_tiles, load_tile, read_labels


def _labels(folder, rows, cols=("path", "label", "patient_id")):
    pd.DataFrame(rows, columns=list(cols)).to_csv(folder / "labels.csv", index=False)


def test_truncated_and_corrupt_tiles_name_the_file(synth):
    good = synth / "p0_t0.png"
    (synth / "trunc.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (synth / "garbage.jpg").write_bytes(b"not an image at all")
    for name in ("trunc.png", "garbage.jpg"):
        with pytest.raises(TileError, match=name):
            load_tile(synth / name)
    df = pd.read_csv(synth / "labels.csv")
    df.loc[len(df)] = ["trunc.png", "A", "P0", "S0"]
    df.to_csv(synth / "labels.csv", index=False)
    t = read_labels(synth)
    with pytest.raises(TileError, match="trunc.png.*|--skip-bad-tiles"):
        check_tiles(t, 64)
    kept, report = check_tiles(t, 64, skip_bad=True)
    assert len(kept) == len(t) - 1 and report["skipped"][0]["path"] == "trunc.png"


def test_mode_conversions_are_counted(tmp_path):
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / "gray.png")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent -> white background
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((64, 64), 65535, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "small.png")
    g, kind = load_tile(tmp_path / "gray.png")
    assert kind == "gray" and g.mode == "RGB" and np.asarray(g)[0, 0].tolist() == [100, 100, 100]
    a, kind = load_tile(tmp_path / "rgba.png")
    assert kind == "alpha" and np.asarray(a)[0, 0].tolist() == [255, 255, 255]
    d, kind = load_tile(tmp_path / "deep.png")
    assert kind == "uint16+gray" and np.asarray(d)[0, 0].tolist() == [255, 255, 255]
    _labels(tmp_path, [("gray.png", "x", "1"), ("rgba.png", "y", "2"), ("deep.png", "x", "3"), ("small.png", "y", "4")])
    with pytest.warns(UserWarning, match="resized"):
        _, report = check_tiles(read_labels(tmp_path), 64)
    assert report["conversions"] == {"gray": 1, "alpha": 1, "uint16+gray": 1}
    assert report["resized"]["count"] == 1 and report["resized"]["sizes"] == {"48x32": 1}


def test_label_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.csv not found"):
        read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="no rows"):
        read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(ValueError, match="no column 'path'") as e:
        read_labels(tmp_path)
    assert "Did you mean" not in str(e.value)  # 'file' is not close to 'path'
    (tmp_path / "labels.csv").write_text("path,lable\na.png,x\n")
    with pytest.raises(ValueError, match="no column 'label'.*Did you mean 'lable'"):
        read_labels(tmp_path)
    _labels(tmp_path, [("a.png", "x", "1"), ("b.png", "x", "2")])
    with pytest.raises(ValueError, match="only one class"):
        read_labels(tmp_path, check_files=False)
    _labels(tmp_path, [("a.png", "x", "1"), ("b.png", "y", "1")])
    with pytest.raises(ValueError, match="different labels"):
        read_labels(tmp_path, check_files=False)
    _labels(tmp_path, [("a.png", "x", "1"), ("b.png", "zz", "2")])
    with pytest.raises(ValueError, match=r"\['zz'\] are not among"):
        read_labels(tmp_path, classes=["x", "y"], check_files=False)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        read_labels(tmp_path)
    _labels(tmp_path, [("a.png", "x", "1"), ("a.png", "y", "2")])
    with pytest.raises(ValueError, match="listed twice"):
        read_labels(tmp_path, check_files=False)


def test_configurable_columns(tmp_path):
    pd.DataFrame({"file": ["a", "b"], "msi": ["MSI", "MSS"], "case": ["c1", "c2"], "hospital": ["h1", "h2"]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    t = read_labels(tmp_path, path_col="file", label_col="msi", patient_col="case", site_col="hospital", check_files=False)
    assert t.classes == ["MSI", "MSS"] and t.df["site"].tolist() == ["h1", "h2"]


def test_every_sample_type_is_scaled_by_its_range(tmp_path):
    """The example: a 224 x 224 int32 TIFF holding 0-65535 was an all-black tile counted as '16bit'."""
    import tifffile

    ramp = np.linspace(0, 65535, 224 * 224).reshape(224, 224)
    cases = {
        "i32.tif": (ramp.astype(np.int32), "int32 0-65535+gray"),
        "i32rgb.tif": (np.stack([ramp] * 3, -1).astype(np.int32), "int32 0-65535"),
        "i64small.tif": ((ramp / 257).astype(np.int64), "int64 0-255+gray"),
        "u16rgb.tif": (np.stack([ramp] * 3, -1).astype(np.uint16), "uint16"),
        "f32.tif": ((ramp / 65535).astype(np.float32), "float32 0-1+gray"),
        "f64rgb.tif": (np.stack([ramp / 257] * 3, -1), "float64 0-255"),
    }
    for name, (arr, kind) in cases.items():
        tifffile.imwrite(tmp_path / name, arr, photometric="rgb" if arr.ndim == 3 else "minisblack")
        img, got = load_tile(tmp_path / name)
        x = np.asarray(img)
        assert got == kind, name
        assert x.dtype == np.uint8 and x.shape == (224, 224, 3) and x.min() == 0 and x.max() == 255, name
        assert abs(float(x.mean()) - 127.5) < 1.0, name  # scaled by the range, not by the type's maximum
    for name, arr, match in (("neg.tif", ramp.astype(np.int32) - 5, "negative int32"),
                             ("big.tif", (ramp * 100).astype(np.int64), "beyond 16 bits"),
                             ("nan.tif", np.full((8, 8), np.nan, np.float32), "NaN"),
                             ("hdr.tif", (ramp / 100).astype(np.float32) + 300, "beyond 0-1 and 0-255")):
        tifffile.imwrite(tmp_path / name, arr)
        with pytest.raises(TileError, match=f"{name}.*{match}"):
            load_tile(tmp_path / name)
    rows = [(n, "x" if i % 2 else "y", str(i)) for i, n in enumerate(cases)]
    _labels(tmp_path, rows)
    _, report = check_tiles(read_labels(tmp_path), 224)
    assert report["conversions"] == {kind: 1 for _, kind in cases.values()}
