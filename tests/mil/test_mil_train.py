"""Patient-level MIL cross-validation, the bag-size leak and its baseline, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mil_synth import make_bags

from jwth.eval.metrics import classification_metrics
from jwth.eval.splits import patient_folds
from jwth.mil.train import MILConfig, bag_size_baseline, cross_validate, load_mil_model, predict, run_mil, \
    sample_instances

FAST = dict(epochs=12, hidden=16, attn_dim=8, n_splits=3, n_boot=200, batch_size=8, lr=3e-3)


def test_sample_instances_fixed_size():
    rng = np.random.default_rng(0)
    x = np.arange(10)[:, None].astype(np.float32)
    s = sample_instances(x, 4, rng)
    assert s.shape == (4, 1) and len(np.unique(s)) == 4  # without replacement when the bag is large enough
    assert sample_instances(x[:2], 5, rng).shape == (5, 1)  # with replacement for small bags
    assert sample_instances(x[:1], 3, rng).tolist() == [[0.0]] * 3  # a bag of one tile


def test_bag_size_leak_is_caught_by_the_baseline():
    """Noise instances, labels that only show in bag size (MSI median 27 vs MSS 7 tiles):
    the bag-size baseline scores high, MIL trained on fixed-size samples stays near chance."""
    bags = make_bags(n_pos=20, n_neg=40, signal=0.0, seed=1)
    folds = patient_folds(bags.labels, bags.patients, n_splits=3)
    base = classification_metrics(bags.labels, bag_size_baseline(bags, folds))
    assert base["bacc"] > 0.85
    r = cross_validate(bags, MILConfig(**FAST), folds)
    assert r["metrics"]["bacc"] < 0.72
    assert r["oof_prob"].shape == (60, 2) and np.isfinite(r["oof_prob"]).all()


def test_mil_learns_witness_instances_whatever_the_bag_size():
    bags = make_bags(n_pos=20, n_neg=40, signal=4.0, size_pos=10, size_neg=10, seed=2)
    r = cross_validate(bags, MILConfig(**{**FAST, "epochs": 25}))
    assert r["metrics"]["bacc"] > 0.8 and r["metrics"]["auroc"] > 0.85
    lo, hi = r["metrics"]["bacc_ci"]
    assert lo <= r["metrics"]["bacc"] <= hi


def test_run_mil_reports_and_models(tmp_path):
    a = make_bags(n_pos=12, n_neg=18, signal=2.0, seed=3)
    b = make_bags(n_pos=12, n_neg=18, signal=0.0, seed=3)
    b.embedding = "jwth"
    cfg = MILConfig(**{**FAST, "epochs": 4, "n_boot": 30})
    res = run_mil({"cls": a, "jwth": b}, cfg, aggregators=["abmil", "mean"], out_dir=tmp_path)
    assert set(res["runs"]) == {"abmil/cls", "abmil/jwth", "mean/cls", "mean/jwth"}
    assert -1 <= res["runs"]["abmil/cls"]["spearman_score_vs_bag_size"] <= 1
    assert abs(res["bag_size_baseline"]["spearman_score_vs_bag_size"]) > 0.9  # monotone in size per fold
    assert "abmil/jwth - abmil/cls" in res["paired"] and "mean/cls - bag_size_baseline" in res["paired"]
    assert res["cohort"]["classes"]["MSIMUT"]["median_bag_size"] > res["cohort"]["classes"]["MSS"]["median_bag_size"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["bag_size_baseline"]["bacc"] == pytest.approx(res["bag_size_baseline"]["bacc"])
    md = (tmp_path / "results.md").read_text()
    assert "bag size only" in md and "abmil/cls" in md
    assert (tmp_path / "oof_predictions.csv").is_file()
    model, meta = load_mil_model(tmp_path / "model_abmil_cls.pt")
    assert meta["embedding"] == "cls" and meta["class_names"] == ["MSS", "MSIMUT"]
    p = predict(model, a, np.arange(a.n_bags))
    assert p.shape == (30, 2) and np.allclose(p.sum(1), 1)
    with pytest.raises(ValueError, match="same bags"):
        run_mil({"cls": a, "x": make_bags(n_pos=5, n_neg=5)}, cfg)
