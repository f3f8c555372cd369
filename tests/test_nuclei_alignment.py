"""`jwth nuclei-alignment`: tile choice, token geometry, end to end (data and --run), bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from jwth.cli import app
from jwth.data.tiles import read_labels
from jwth.encoders import load_encoder
from jwth.eval.alignment import AlignmentConfig, choose_tiles, measure_tiles, per_tile_table
from jwth.heads.checkpoint import load_attention_head
from jwth_testutils import TINY, write_tiles
from test_nuclei import drawn_tile

runner = CliRunner()
FAST = ["--tiles", "2", "--max-per-patient", "1", "--epochs", "1", "--n-boot", "20"]


def test_choose_tiles_holds_out_patients_and_balances_classes(tmp_path):
    table = read_labels(write_tiles(tmp_path / "d", n_patients=10, per_patient=3))
    analysed, train = choose_tiles(table, n_tiles=4, max_per_patient=1, train_tiles=0, seed=0)
    pats = table.df["patient_id"].to_numpy()
    assert len(analysed) == 4 and sorted(table.df["label"].iloc[analysed]) == ["A", "A", "B", "B"]
    assert len(set(pats[analysed])) == 4 and not set(pats[analysed]) & set(pats[train])
    assert len(train) == 30 - 4 * 3  # every tile of the 6 other patients
    _, few = choose_tiles(table, n_tiles=4, max_per_patient=1, train_tiles=5, seed=0)
    assert len(few) == 5 and set(few) <= set(train)
    with pytest.raises(ValueError, match="No patients left"):
        choose_tiles(table, n_tiles=30, max_per_patient=3, train_tiles=0)


def test_token_fractions_follow_the_encoder_token_order(tmp_path):
    """A drawn 64-px tile through the pipeline: per-token fractions at the known tokens (0, 6, 15)."""
    d = tmp_path / "drawn"
    d.mkdir()
    Image.fromarray(drawn_tile()).save(d / "t.png")
    from jwth.data.tiles import TileTable

    table = TileTable(d, d / "labels.csv", pd.DataFrame({"path": ["t.png"], "label": ["A"], "patient_id": ["P"], "site": [""]}),
                      ["A", "B"])
    enc = load_encoder(TINY)  # 64 px input: no resize, 4 x 4 tokens of 16 px
    torch.manual_seed(0)
    from jwth.heads import build_head

    head = build_head("attention", enc.embed_dim, 2, 4).eval()
    meas = measure_tiles(enc, table, np.array([0]), {"jwth-trained": head}, AlignmentConfig(mpp=0.5))
    expected = np.zeros(16)
    expected[[0, 6, 15]] = [81 / 256, 81 / 256, 84 / 256]
    np.testing.assert_allclose(meas["fractions"]["nuclei"][0], expected)
    assert meas["fractions"]["lymph"][0][0] == 81 / 256 and meas["fractions"]["lymph"][0][1:].sum() == 0
    assert meas["attention"]["encoder"].shape == (1, 3, 16) and meas["attention"]["jwth-trained"].shape == (1, 4, 16)
    rows = per_tile_table(table.df, meas)
    assert len(rows) == (4 + 1) + (3 + 1)  # heads + their mean, per source
    # enrichment by hand from the attention the pipeline saw: sum a f / mean f
    a = meas["attention"]["encoder"][0].mean(0)
    row = rows[(rows.source == "encoder") & (rows["head"] == "mean")].iloc[0]
    assert row["enrichment_nuclei"] == pytest.approx((a * expected).sum() / expected.mean())


def test_end_to_end_on_data_then_on_a_run_folder(tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=8, per_patient=2, size=32)
    enc_spec = "timm:vit_tiny_patch16_224?img_size=32"
    r = runner.invoke(app, ["nuclei-alignment", "--data", str(data), "--encoder", enc_spec, "--out", str(tmp_path / "o"),
                            *FAST])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["sources"] == ["jwth-trained", "jwth-untrained", "encoder"]
    assert res["n_tiles"] == 2 and res["n_train_tiles"] == 12
    per_tile = pd.read_csv(tmp_path / "o" / "per_tile.csv")
    assert len(per_tile) == 2 * ((8 + 1) * 2 + (3 + 1))
    assert (tmp_path / "o" / "tiles.png").stat().st_size > 0 and (tmp_path / "o" / "enrichment.png").is_file()
    load_attention_head(tmp_path / "o" / "attention_head.pt", load_encoder(enc_spec))
    # --run: a probe run folder's config and token cache (the head trains on the cached tokens)
    from jwth.cache.extract import extract_tokens

    extract_tokens(load_encoder(enc_spec), read_labels(data), tmp_path / "run" / "cache", num_workers=0, quiet=True).close()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(
        {"data": str(data), "encoder": enc_spec, "cache": str(tmp_path / "run" / "cache"), "labels": "labels.csv",
         "path_col": "path", "label_col": "label", "patient_col": "patient_id"}))
    r = runner.invoke(app, ["nuclei-alignment", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "o2"), *FAST])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o2" / "results.json").read_text())["n_train_tiles"] == 12
    assert not (tmp_path / "o2" / "cache").exists()  # the run's cache was used


@pytest.mark.parametrize("case,msg", [
    ("no_labels", "labels.csv not found"),
    ("one_class", "only one class"),
    ("missing_tile", "do not exist"),
    ("no_run", "is not a `jwth probe` run folder"),
    ("run_and_data", "either --run, or --encoder and --data"),
])
def test_bad_input_gets_the_probe_errors(tmp_path, case, msg):
    data = write_tiles(tmp_path / "d", n_patients=8, per_patient=2, size=32)
    args = ["--data", str(data), "--encoder", "timm:vit_tiny_patch16_224?img_size=32"]
    if case == "no_labels":
        (data / "labels.csv").unlink()
    elif case == "one_class":
        df = pd.read_csv(data / "labels.csv")
        df.assign(label="A").to_csv(data / "labels.csv", index=False)
    elif case == "missing_tile":
        (data / "p0_t1.png").unlink()
    elif case == "no_run":
        args = ["--run", str(tmp_path)]
    elif case == "run_and_data":
        args = ["--run", str(tmp_path), *args]
    r = runner.invoke(app, ["nuclei-alignment", *args, "--out", str(tmp_path / "o"), *FAST])
    assert r.exit_code == 2 and msg in r.output, r.output
    assert not (tmp_path / "o" / "results.json").exists()
    if case == "missing_tile":  # the same message as `jwth probe`
        p = runner.invoke(app, ["probe", *args, "--out", str(tmp_path / "p")])
        assert msg in p.output and "p0_t1.png" in p.output and "p0_t1.png" in r.output
