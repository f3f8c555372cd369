"""Test-time stain shift (jwth.eval.stain_shift): parsing, determinism, the amount of the
shift against an independent computation, caches, and the probe's curve end to end."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hsv2rgb, lab2rgb, rgb2hsv, rgb2lab

from jwth.eval.stain_shift import StainShift, delta_e, parse_strengths, shift_config

TINY = "timm:vit_tiny_patch16_224?img_size=32"


def test_parse_strengths():
    assert parse_strengths("1, 0.5,2") == [0.0, 0.5, 1.0, 2.0]  # sorted, 0 added
    assert parse_strengths("0,1,1") == [0.0, 1.0]
    assert parse_strengths("-0,5") == [0.0, 5.0]
    assert parse_strengths(None) == []  # option not given
    for bad, msg in (("-1", "in \\[0, 5\\]"), ("abc", "not a number"), ("nan", "in \\[0"), ("inf", "in \\[0"),
                     ("6", "saturation"), ("", "empty"), (",", "empty"), ("0", "above 0"), ("0,0", "above 0")):
        with pytest.raises(ValueError, match=msg):
            parse_strengths(bad)


def test_bad_per_is_refused():
    with pytest.raises(ValueError, match="tile, patient, site"):
        StainShift(1.0, per="slide")


def _tile(rgb=(200, 120, 170), size=24) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8))


def test_strength_zero_is_the_identity():
    img = _tile()
    assert StainShift(0.0)(img, "a.png") is img


def test_same_key_same_draw_across_instances_pickling_and_order():
    img = _tile()
    a = np.asarray(StainShift(1.0, seed=3)(img, "x/1.png"))
    b = np.asarray(pickle.loads(pickle.dumps(StainShift(1.0, seed=3)))(img, "x/1.png"))
    np.testing.assert_array_equal(a, b)
    # another key or another seed draws differently
    assert not np.array_equal(a, np.asarray(StainShift(1.0, seed=3)(img, "x/2.png")))
    assert not np.array_equal(a, np.asarray(StainShift(1.0, seed=4)(img, "x/1.png")))


def _expected(rgb: np.ndarray, d) -> np.ndarray:
    """The shift of one flat colour, computed with scikit-image and numpy (not jwth's code)."""
    x = rgb.astype(np.float64)[None, None] / 255.0
    lab = rgb2lab(x)[0, 0]
    lab = lab * (1 + d.lab_scale[0].numpy()) + d.lab_shift[0].numpy()
    lab[0] = np.clip(lab[0], 0, 100)
    x = np.clip(lab2rgb(lab[None, None]), 0, 1)
    hsv = rgb2hsv(x)[0, 0]
    hue, sat, val = d.hsv[0].numpy()
    hsv = np.array([(hsv[0] + hue) % 1.0, np.clip(hsv[1] * (1 + sat), 0, 1), np.clip(hsv[2] * (1 + val), 0, 1)])
    x = hsv2rgb(hsv[None, None])[0, 0]
    # colour deconvolution with the unit OD vectors of haematoxylin and eosin (Ruifrok & Johnston 2001)
    h = np.array([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11])
    m = np.stack([h, e, np.cross(h, e)])
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    od = -np.log(np.maximum(x, 1 / 512))
    c = od @ np.linalg.inv(m)
    c = c * (1 + d.hed_alpha[0].numpy()) + d.hed_beta[0].numpy()
    return np.clip(np.exp(-(c @ m)), 0, 1) * 255


@pytest.mark.parametrize("rgb", [(200, 120, 170), (120, 80, 160), (230, 160, 200)])
@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_shift_moves_a_flat_tile_by_the_drawn_amount(rgb, strength):
    shift = StainShift(strength, seed=1)
    out = np.asarray(shift(_tile(rgb), "k")).astype(float)
    want = _expected(np.array(rgb), shift.draw("k"))
    assert out.min() >= 0 and out.max() <= 255
    assert np.abs(out - want[None, None]).max() <= 1.5, (out[0, 0], want)
    assert np.abs(out[0, 0] - np.array(rgb)).max() >= 1  # it did move


def test_the_direction_is_the_same_at_every_strength():
    """The uniform variates do not depend on the strength: parameters scale linearly."""
    d1, d2 = StainShift(1.0, seed=5).draw("t"), StainShift(2.0, seed=5).draw("t")
    for f in ("lab_scale", "lab_shift", "hsv", "hed_alpha", "hed_beta"):
        torch.testing.assert_close(getattr(d2, f), 2 * getattr(d1, f))
    assert bool(d1.on.all())  # a test-time shift applies all three perturbations
    assert shift_config(2.0).p_lab == shift_config(2.0).p_hsv == shift_config(2.0).p_hed == 1.0


def test_colour_difference_grows_with_strength(root):
    from jwth.data.tiles import load_tile

    src = root / "tcga_crc_msi"
    import pandas as pd

    paths = pd.read_csv(src / "labels.csv")["path"].iloc[::500].tolist()[:8]
    means = []
    for s in (0.5, 1.0, 2.0):
        vals = []
        for p in paths:
            img, _ = load_tile(src / p)
            vals.append(delta_e(np.asarray(img), np.asarray(StainShift(s)(img, p))).mean())
        means.append(float(np.mean(vals)))
    assert 0 < means[0] < means[1] < means[2], means
    assert means[1] > 2.3  # strength 1 is a visible change (CIE76 ΔE of about 2.3 is just noticeable)


def test_site_shift_shares_one_draw_per_site(synth):
    """per='site': every tile of a site gets the same parameters, other sites other ones."""
    shift = StainShift(1.0, per="site")
    assert shift.key_column() == "site"
    img = _tile()
    a = np.asarray(shift(img, "AA"))
    np.testing.assert_array_equal(a, np.asarray(shift(img.copy(), "AA")))
    assert not np.array_equal(a, np.asarray(shift(img, "CM")))


def test_dataset_gives_each_tile_its_own_draw_whatever_the_order(synth):
    """The shifted pixels of a tile do not depend on its position, the batch or worker processes."""
    import pandas as pd

    from jwth.data.tiles import TileDataset

    df = pd.read_csv(synth / "labels.csv")
    paths = df["path"].tolist()

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img).copy())

    shift = StainShift(1.0, seed=2)
    fwd = TileDataset(synth, paths, to_tensor, shift, paths)
    rev = TileDataset(synth, paths[::-1], to_tensor, shift, paths[::-1])
    for i in (0, 3, len(paths) - 1):
        torch.testing.assert_close(fwd[i][0], rev[len(paths) - 1 - i][0], rtol=0, atol=0)
    loader = torch.utils.data.DataLoader(fwd, batch_size=4, num_workers=1)
    in_worker = torch.cat([x for x, _ in loader])
    torch.testing.assert_close(in_worker, torch.stack([fwd[i][0] for i in range(len(paths))]), rtol=0, atol=0)
    plain = TileDataset(synth, paths, to_tensor)
    assert not torch.equal(plain[0][0], fwd[0][0])


def test_shifted_cache_is_not_mistaken_for_another(synth, tmp_path):
    from jwth.cache import CacheMismatchError
    from jwth.cache.extract import extract_tokens
    from jwth.data.tiles import read_labels
    from jwth.encoders import load_encoder

    table = read_labels(synth)
    enc = load_encoder(TINY)
    plain = extract_tokens(enc, table, tmp_path / "c", num_workers=0, quiet=True)
    plain_cls = plain.read_cls(np.arange(plain.n_tiles))
    plain.close()
    # strength 0 through the shift path gives the unshifted tokens exactly
    zero = extract_tokens(enc, table, tmp_path / "z", num_workers=0, quiet=True, image_shift=StainShift(0.0))
    np.testing.assert_array_equal(zero.read_cls(np.arange(zero.n_tiles)), plain_cls)
    zero.close()
    one = extract_tokens(enc, table, tmp_path / "s1", num_workers=0, quiet=True, image_shift=StainShift(1.0))
    assert not np.array_equal(one.read_cls(np.arange(one.n_tiles)), plain_cls)
    assert one.manifest["image_shift"]["strength"] == 1.0
    one.close()
    for folder, shift in ((tmp_path / "c", StainShift(1.0)), (tmp_path / "s1", StainShift(2.0)), (tmp_path / "s1", None)):
        with pytest.raises(CacheMismatchError, match="image_shift"):
            extract_tokens(enc, table, folder, num_workers=0, quiet=True, image_shift=shift)


def test_probe_stain_shift_curve_end_to_end(real_mini, tmp_path):
    from typer.testing import CliRunner

    from jwth.cli import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["probe", "--data", str(real_mini), "--encoder", TINY, "--out", str(out),
                                 "--folds", "3", "--n-boot", "50", "--epochs", "2", "--num-workers", "0",
                                 "--stain-shift", "1,3"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    ss = res["stain_shift"]
    assert ss["strengths"] == [0.0, 1.0, 3.0] and ss["per"] == "tile"
    assert set(ss["curves"]) == {"linear", "attention", "colour"}
    for name, rows in ss["curves"].items():
        # strength 0 is the unshifted evaluation itself: the same numbers and CIs
        ref = res["heads"][name] if name in res["heads"] else res["baselines"][name]
        for level in ("tile", "patient"):
            assert rows[0][level]["bacc"] == ref[level]["bacc"]
            assert rows[0][level]["bacc_ci"] == ref[level]["bacc_ci"]
            assert rows[0]["drop"][level]["diff"] == 0.0
            for r_ in rows[1:]:
                assert r_["drop"][level]["diff"] == pytest.approx(r_[level]["bacc"] - rows[0][level]["bacc"])
    assert 0 < ss["delta_e"]["1"]["mean"] < ss["delta_e"]["3"]["mean"]
    moved = ss["class_token_shift"]
    assert moved["0"]["relative"] == 0.0 and 0 < moved["1"]["relative"] < moved["3"]["relative"]
    # the heads saw other tokens on shifted tiles: the colour baseline's predictions must move
    for f in ("stain_shift.png", "stain_shift_tiles.png"):
        assert (out / f).stat().st_size > 1000
    assert "## Stain shift" in (out / "results.md").read_text()
    assert "| attention | 3 |" in r.output
    # rerun: the shifted caches are reused, not recomputed
    caches = sorted(p.name for p in (out / "cache" / "stain-shift").iterdir())
    assert len(caches) == 4  # two strengths x (encoder, colour)
    r2 = CliRunner().invoke(app, ["probe", "--data", str(real_mini), "--encoder", TINY, "--out", str(out),
                                  "--folds", "3", "--n-boot", "50", "--epochs", "2", "--num-workers", "0",
                                  "--stain-shift", "1,3"])
    assert r2.exit_code == 0, r2.output
    assert "extracted" not in r2.output
    assert json.loads((out / "results.json").read_text())["stain_shift"]["curves"]["linear"][2]["tile"]["bacc"] == \
        ss["curves"]["linear"][2]["tile"]["bacc"]
    # the same folder without --stain-shift: no stale curves left beside results without them
    r3 = CliRunner().invoke(app, ["probe", "--data", str(real_mini), "--encoder", TINY, "--out", str(out),
                                  "--folds", "3", "--n-boot", "50", "--epochs", "2", "--num-workers", "0"])
    assert r3.exit_code == 0, r3.output
    assert not (out / "stain_shift.png").exists() and not (out / "stain_shift_tiles.png").exists()
    assert "stain_shift" not in json.loads((out / "results.json").read_text())


def test_site_split_shifts_only_the_test_sites(real_mini, tmp_path):
    from typer.testing import CliRunner

    from jwth.cli import app
    from jwth.data.tiles import read_labels

    df = read_labels(real_mini).df
    sites = df.groupby("site")["label"].nunique()
    both = sorted(sites[sites == 2].index)
    if not both:
        pytest.skip("no site with both classes in the mini set")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["probe", "--data", str(real_mini), "--encoder", TINY, "--out", str(out),
                                 "--split", "site", "--test-sites", both[0], "--n-boot", "20", "--epochs", "1",
                                 "--num-workers", "0", "--stain-shift", "2"])
    assert r.exit_code == 0, r.output
    n_test = int((df["site"] == both[0]).sum())
    shifted = [p for p in (out / "cache" / "stain-shift").iterdir() if not p.name.endswith("-colour")]
    assert len(shifted) == 1
    assert json.loads((shifted[0] / "manifest.json").read_text())["n_tiles"] == n_test
    assert json.loads((out / "results.json").read_text())["stain_shift"]["curves"]["linear"][1]["tile"]["n"] == n_test


def test_bad_stain_shift_options_fail_before_extraction(real_mini, tmp_path):
    from typer.testing import CliRunner

    from jwth.cli import app

    for opt, val, msg in (("--stain-shift", "1,x", "not a number"), ("--stain-shift-per", "slide", "tile, patient, site")):
        args = ["probe", "--data", str(real_mini), "--encoder", TINY, "--out", str(tmp_path / "r"), opt, val]
        if opt == "--stain-shift-per":
            args += ["--stain-shift", "1"]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and msg in r.output, r.output
        assert not (tmp_path / "r" / "cache").exists()


def test_benchmark_stain_shift_extracts_once_for_all_cells(root, real_mini, tmp_path):
    import pandas as pd
    import yaml
    from typer.testing import CliRunner

    from jwth.cli import app

    pats = pd.read_csv(root / "tcga_crc_msi" / "patients.csv", dtype=str, keep_default_na=False)
    ids = set(pd.read_csv(real_mini / "labels.csv")["patient_id"])
    pats[pats.patient_id.isin(ids)].to_csv(real_mini / "patients.csv", index=False)
    tasks = {"patients": "patients.csv", "cohort": "tcga_project",
             "evaluations": [{"name": "pooled", "pooled": True}],
             "tasks": [{"name": "MSI", "from": "labels", "column": "label", "classes": {"MSS": ["MSS"], "MSI": ["MSIMUT"]}},
                       {"name": "hypermutated", "column": "clin_hypermutated", "classes": {"no": [0], "yes": [1]}}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tasks))
    out = tmp_path / "bench"
    r = CliRunner().invoke(app, ["benchmark", "--data", str(real_mini), "--tasks", str(tmp_path / "t.yaml"),
                                 "--encoder", TINY, "--out", str(out), "--folds", "3", "--n-boot", "30",
                                 "--epochs", "1", "--num-workers", "0", "--stain-shift", "2", "--stain-shift-per", "site"])
    assert r.exit_code == 0, r.output
    # encoder + colour, unshifted and shifted: each extracted once for both tasks
    assert r.output.count("extracted 48 tiles") == 4, r.output
    res = json.loads((out / "results.json").read_text())
    for c in res["cells"]:
        ss = c["stain_shift"]
        assert ss["strengths"] == [0.0, 2.0] and ss["per"] == "site"
        assert ss["curves"]["linear"][0]["patient"]["bacc"] == c["heads"]["linear"]["patient"]["bacc"]
        assert ss["curves"]["colour"][0]["tile"]["bacc"] == c["baselines"]["colour"]["tile"]["bacc"]
    assert "stain_shift.png" in res["figures"] and (out / "stain_shift.png").is_file()
    assert "## Stain shift (patient level)" in (out / "results.md").read_text()


def test_token_displacement_against_hand_values():
    from jwth.eval.stain_shift import token_displacement

    base = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    # unchanged embeddings: no displacement, cosine 1 (where defined)
    same = token_displacement(base[1:], base[1:])
    assert same["relative"] == 0.0 and same["cosine"] == pytest.approx(1.0)
    # shift every tile by (0, 5): moves 5; 3 tiles pairwise at distances 5/10/5 -> derangement mean
    moved = token_displacement(base, base + [0.0, 5.0], seed=0)
    perm = np.random.default_rng(0).permutation(3)
    perm = np.where(perm == np.arange(3), (perm + 1) % 3, perm)
    spread = np.linalg.norm(base - base[perm], axis=1).mean()
    assert moved["relative"] == pytest.approx(5.0 / spread)
    # scale-free: the same geometry scaled by 10 gives the same number
    assert token_displacement(10 * base, 10 * (base + [0.0, 5.0]), seed=0)["relative"] == pytest.approx(moved["relative"])


@pytest.mark.parametrize("rgb", [(255, 255, 255), (0, 0, 0), (250, 248, 252), (30, 200, 40)])
def test_background_and_flat_tiles_shift_without_nan_and_glass_stays_white(rgb):
    out = np.asarray(StainShift(3.0)(_tile(rgb), "glass")).astype(int)
    assert out.min() >= 0 and out.max() <= 255
    if min(rgb) >= 248:  # bright glass: the shift fades out (preserve_background)
        assert np.abs(out - np.array(rgb)).max() <= 2



def test_per_patient_shift_cache_is_keyed_by_the_patients(synth, tmp_path):
    """The same tiles with other patient IDs draw other shifts: the cache must not be reused."""
    from jwth.cache import CacheMismatchError
    from jwth.cache.extract import extract_tokens
    from jwth.data.tiles import read_labels
    from jwth.encoders import load_encoder

    table = read_labels(synth)
    enc = load_encoder(TINY)
    shift = StainShift(1.0, per="patient")
    extract_tokens(enc, table, tmp_path / "p", num_workers=0, quiet=True, image_shift=shift).close()
    other = table.subset(np.ones(len(table), dtype=bool))
    other.df["patient_id"] = other.df["patient_id"].astype(str) + "-x"
    with pytest.raises(CacheMismatchError, match="image_shift"):
        extract_tokens(enc, other, tmp_path / "p", num_workers=0, quiet=True, image_shift=shift)
    # per tile, patient IDs do not matter: the cache is reused
    extract_tokens(enc, table, tmp_path / "t", num_workers=0, quiet=True, image_shift=StainShift(1.0)).close()
    extract_tokens(enc, other, tmp_path / "t", num_workers=0, quiet=True, image_shift=StainShift(1.0)).close()


def test_empty_site_or_patient_keys_are_refused():
    import pandas as pd

    from jwth.eval.stain_shift import check_shift_keys

    df = pd.DataFrame({"path": ["a", "b", "c"], "patient_id": ["p1", "p2", "p3"], "site": ["AA", "", "CM"]})
    check_shift_keys(df, "tile")
    check_shift_keys(df, "patient")
    with pytest.raises(ValueError, match="1 of 3 tiles have no site.*--site-col"):
        check_shift_keys(df, "site")
    with pytest.raises(ValueError, match="tile, patient, site"):
        check_shift_keys(df, "slide")


def test_resumed_and_shifted_caches_keep_the_recorded_precision(synth, tmp_path):
    from jwth.cache.extract import extract_tokens, recorded_precision
    from jwth.data.tiles import read_labels
    from jwth.encoders import load_encoder

    table = read_labels(synth)
    enc = load_encoder(TINY)
    assert recorded_precision(tmp_path / "none") is None
    extract_tokens(enc, table, tmp_path / "f", num_workers=0, quiet=True, precision="fp32").close()
    extract_tokens(enc, table, tmp_path / "b", num_workers=0, quiet=True, precision="bf16").close()
    assert recorded_precision(tmp_path / "f") == "fp32" and recorded_precision(tmp_path / "b") == "bf16"


def test_a_rerun_records_newly_skipped_tiles(synth, tmp_path):
    """A cache reused by a run that skips a bad tile must say so in its manifest."""
    import pandas as pd

    from jwth.cache.extract import extract_tokens
    from jwth.data.tiles import read_labels
    from jwth.encoders import load_encoder

    enc = load_encoder(TINY)
    extract_tokens(enc, read_labels(synth), tmp_path / "c", num_workers=0, quiet=True).close()
    df = pd.read_csv(synth / "labels.csv")
    (synth / "broken.png").write_bytes(b"not an image")
    bad = df.iloc[:1].assign(path="broken.png")
    pd.concat([df, bad]).to_csv(synth / "labels.csv", index=False)
    c = extract_tokens(enc, read_labels(synth, check_files=False), tmp_path / "c", num_workers=0, quiet=True,
                       skip_bad_tiles=True)
    assert [s["path"] for s in c.manifest["tile_checks"]["skipped"]] == ["broken.png"]
    c.close()


def test_compare_figure_only_for_comparable_shifts(tmp_path):
    from jwth.eval.stain_shift import plot_compared_shift

    def run(name, strengths, per="tile", curve=True):
        d = tmp_path / name
        d.mkdir()
        rows = [{"strength": s, "tile": {"bacc": 0.5, "bacc_ci": [0.4, 0.6]}, "patient": {"bacc": 0.5, "bacc_ci": [0.4, 0.6]}}
                for s in strengths]
        ss = {"strengths": strengths, "per": per, "seed": 0, "delta_e": {}, "class_token_shift": {},
              "curves": {"linear": rows}}
        (d / "results.json").write_text(json.dumps({"classes": ["a", "b"], **({"stain_shift": ss} if curve else {})}))
        return d

    a, b = run("a", [0.0, 1.0]), run("b", [0.0, 1.0])
    ok, msg = plot_compared_shift(tmp_path / "x.png", {"A": a, "B": b})
    assert ok and (tmp_path / "x.png").is_file()
    ok, msg = plot_compared_shift(tmp_path / "y.png", {"A": a, "B": run("c", [0.0, 2.0])})
    assert not ok and "different shifts" in msg and not (tmp_path / "y.png").exists()
    ok, msg = plot_compared_shift(tmp_path / "z.png", {"A": a, "B": run("d", [], curve=False)})
    assert not ok and "B have no stain-shift curve" in msg
    assert plot_compared_shift(tmp_path / "w.png", {"A": run("e", [], curve=False)}) == (False, "")


def test_compared_runs_are_named_by_registry_spec_or_run_folder_never_a_checkpoint_path(tmp_path):
    from jwth.eval.stain_shift import run_label

    ckpt = tmp_path / "home" / "runs" / "long" / "encoder"
    ckpt.mkdir(parents=True)
    assert run_label(tmp_path / "probe_pretrained", {"encoder": {"spec": str(ckpt)}}) == "probe_pretrained"
    assert run_label(tmp_path / "probe_random", {"encoder": {"spec": "timm:vit_tiny_patch16_224"}}) == \
        "timm:vit_tiny_patch16_224"
    # a checkpoint path from another machine (absent here) is still a path, not a name
    assert run_label(tmp_path / "r", {"encoder": {"spec": "/elsewhere/encoder"}}) == "r"
    long = "hf-hub:" + "x" * 60
    assert run_label(tmp_path / "r", {"encoder": {"spec": long}}).endswith("…")
    assert len(run_label(tmp_path / "r", {"encoder": {"spec": long}})) == 40
