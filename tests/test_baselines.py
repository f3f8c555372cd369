"""Trivial baselines: colour statistics against numpy, majority and tile-count predictors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jwth.encoders import load_encoder
from jwth.encoders.baselines import CHANNELS, STATS, channel_stats, feature_names
from jwth.eval.baselines import majority_prob, parse_baselines, tile_count_prob
from jwth.eval.metrics import metric


def _tile():
    """8x8 tile: left half pure red, right half white; the top-left pixel is black."""
    t = np.ones((8, 8, 3))
    t[:, :4] = (1.0, 0.0, 0.0)
    t[0, 0] = 0.0
    return t


def _feat(vec, channel, stat):
    return float(vec[CHANNELS.index(channel) * len(STATS) + STATS.index(stat)])


def test_colour_statistics_match_numpy_on_a_hand_made_tile():
    enc = load_encoder("baseline:colour?size=8&grid=2")
    assert enc.embed_dim == 72 and len(feature_names()) == 72 and not enc.random_init
    t = _tile()
    tok = enc(torch.from_numpy(t).permute(2, 0, 1)[None].float())
    assert tok.cls.shape == (1, 72) and tok.patches.shape == (1, 4, 72) and tok.grid == (2, 2)
    cls = tok.cls[0].numpy()
    for c, ch in enumerate("RGB"):
        v = t[..., c].ravel()
        assert _feat(cls, ch, "mean") == pytest.approx(v.mean(), abs=1e-6)
        assert _feat(cls, ch, "std") == pytest.approx(v.std(), abs=1e-6)
        for q in (1, 5, 25, 50, 75, 95):
            assert _feat(cls, ch, f"p{q}") == pytest.approx(np.percentile(v, q), abs=1e-6)
    # HSV by hand: red (0, 1, 1), white (0, 0, 1), black (0, 0, 0): 31 red, 32 white, 1 black pixels
    assert _feat(cls, "S", "mean") == pytest.approx(31 / 64, abs=1e-6)
    assert _feat(cls, "V", "mean") == pytest.approx(63 / 64, abs=1e-6)
    assert _feat(cls, "H", "p95") == pytest.approx(0.0, abs=1e-6)
    # LAB (D65): white L* = 100, a* = b* = 0; sRGB red L* 53.24, a* 80.09, b* 67.20; black 0
    assert _feat(cls, "L", "mean") == pytest.approx((31 * 53.24 + 32 * 100) / 64, abs=0.05)
    assert _feat(cls, "a", "p95") == pytest.approx(80.09, abs=0.05)
    assert _feat(cls, "b", "p1") == pytest.approx(np.percentile([0.0] * 33 + [67.20] * 31, 1), abs=0.05)
    # patch tokens: the statistics of each 4x4 block, row-major; block 1 (top-right) is white
    top_right = tok.patches[0, 1].numpy()
    assert _feat(top_right, "R", "mean") == pytest.approx(1.0) and _feat(top_right, "S", "std") == pytest.approx(0.0)
    assert _feat(top_right, "L", "p50") == pytest.approx(100.0, abs=0.05)


def test_channel_stats_percentiles_equal_numpy():
    v = np.random.default_rng(0).normal(size=(2, 3, 101, 9))
    s = channel_stats(v).reshape(2, 3, 9, 8)
    np.testing.assert_allclose(s[..., 0], v.mean(-2), atol=1e-5)
    np.testing.assert_allclose(s[..., 1], v.std(-2), atol=1e-5)
    np.testing.assert_allclose(s[..., 2:], np.moveaxis(np.percentile(v, [1, 5, 25, 50, 75, 95], axis=-2), 0, -1), atol=1e-5)


def test_bad_baseline_specs():
    with pytest.raises(ValueError, match="Unknown baseline encoder 'texture'"):
        load_encoder("baseline:texture")
    with pytest.raises(ValueError, match="divisible"):
        load_encoder("baseline:colour?size=10&grid=4")
    with pytest.raises(ValueError, match="Unknown baseline"):
        parse_baselines("majority,cnn")
    assert parse_baselines("none") == [] and parse_baselines(None) == ["majority", "colour", "tile-count"]


def test_majority_is_chance_level():
    y = np.array([0] * 90 + [1] * 10)
    prob = majority_prob(y, np.arange(100), 100, 2)
    assert metric("bacc", y, prob) == 0.5 and metric("auroc", y, prob) == 0.5
    assert (prob.argmax(1) == 0).all() and prob[0, 1] == pytest.approx(0.1)


def test_tile_count_predictor_reads_bag_size():
    """Positive patients have 20-29 tiles, negative 1-10: the bag-size predictor is perfect (sklearn check)."""
    from sklearn.metrics import balanced_accuracy_score

    rows = [(f"P{p}", 1, n) for p, n in enumerate(range(20, 30))] + [(f"N{p}", 0, n) for p, n in enumerate(range(1, 11))]
    pid = np.array([r[0] for r in rows for _ in range(r[2])])
    y = np.array([r[1] for r in rows for _ in range(r[2])])
    sizes = {r[0]: r[2] for r in rows}
    test_pat = {"P0", "P5", "N0", "N9"}
    te = np.flatnonzero(np.isin(pid, list(test_pat)))
    tr = np.flatnonzero(~np.isin(pid, list(test_pat)))
    prob, yp, ids = tile_count_prob(y, pid, sizes, tr, te, 2)
    assert sorted(ids) == sorted(test_pat) and prob.shape == (4, 2)
    assert balanced_accuracy_score(yp, prob.argmax(1)) == 1.0
    assert metric("bacc", yp, prob) == 1.0
