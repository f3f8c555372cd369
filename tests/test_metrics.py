import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from jwth.eval.metrics import aggregate_by_patient, bootstrap_ci, classification_metrics, paired_bootstrap


def _probs(rng, n, C=2):
    p = rng.random((n, C))
    return p / p.sum(1, keepdims=True)


def test_metrics_match_sklearn_binary_and_multiclass():
    rng = np.random.default_rng(0)
    for C in (2, 3):
        y = rng.integers(0, C, 200)
        p = _probs(rng, 200, C)
        m = classification_metrics(y, p)
        assert m["bacc"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
        assert m["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
        ref = roc_auc_score(y, p[:, 1]) if C == 2 else roc_auc_score(y, p, multi_class="ovr")
        assert m["auroc"] == pytest.approx(ref)


def test_degenerate_all_negative_predictions():
    y = np.array([0] * 90 + [1] * 10)
    p = np.tile([0.9, 0.1], (100, 1))
    assert accuracy_score(y, p.argmax(1)) == pytest.approx(0.90)
    m = classification_metrics(y, p)
    assert m["bacc"] == pytest.approx(0.50)
    assert m["auroc"] == pytest.approx(0.50)


def test_single_class_auroc_is_nan_not_one():
    m = classification_metrics(np.zeros(5, int), np.tile([0.8, 0.2], (5, 1)))
    assert np.isnan(m["auroc"])


def test_aggregate_by_patient_by_hand():
    prob = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    pp, yp, ids = aggregate_by_patient(prob, np.array([0, 0, 1]), np.array(["a", "a", "b"]))
    assert ids.tolist() == ["a", "b"]
    np.testing.assert_allclose(pp, [[0.7, 0.3], [0.2, 0.8]])
    assert yp.tolist() == [0, 1]
    with pytest.raises(ValueError, match="different labels"):
        aggregate_by_patient(prob, np.array([0, 1, 1]), np.array(["a", "a", "b"]))


def test_bootstrap_ci_brackets_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(np.stack([1 - y, y], 1) * 0.6 + rng.random((300, 2)) * 0.4, 0, 1)
    groups = np.repeat(np.arange(60), 5)
    lo, hi = bootstrap_ci(y, p, groups, "bacc", n_boot=300, seed=0)
    point = classification_metrics(y, p)["bacc"]
    assert lo <= point <= hi and hi - lo < 0.3
    assert (lo, hi) == bootstrap_ci(y, p, groups, "bacc", n_boot=300, seed=0)


def test_patient_bootstrap_is_wider_than_tile_bootstrap_for_clustered_data():
    # tiles of a patient are identical copies: resampling tiles would understate uncertainty
    rng = np.random.default_rng(2)
    y_pat = rng.integers(0, 2, 40)
    correct = rng.random(40) < 0.7
    pred_pat = np.where(correct, y_pat, 1 - y_pat)
    y, pred = np.repeat(y_pat, 20), np.repeat(pred_pat, 20)
    p = np.stack([1 - pred, pred], 1).astype(float)
    groups = np.repeat(np.arange(40), 20)
    lo_p, hi_p = bootstrap_ci(y, p, groups, n_boot=300)
    lo_t, hi_t = bootstrap_ci(y, p, None, n_boot=300)
    assert (hi_p - lo_p) > 2 * (hi_t - lo_t)


def test_paired_bootstrap_identical_heads_and_better_head():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = _probs(rng, 200)
    same = paired_bootstrap(y, p, p, np.arange(200), n_boot=200)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0]
    perfect = np.stack([1 - y, y], 1).astype(float)
    better = paired_bootstrap(y, perfect, p, np.arange(200), n_boot=200)
    assert better["diff"] > 0.3 and better["ci"][0] > 0 and better["p_le_0"] == 0.0


def test_fast_metrics_equal_sklearn_on_many_random_cases():
    rng = np.random.default_rng(7)
    for trial in range(60):
        C = 2 + trial % 3
        n = int(rng.integers(5, 80))
        y = rng.integers(0, C, n)
        p = _probs(rng, n, C)
        if trial % 5 == 0:  # ties in the scores
            p = np.round(p, 1)
            p = p / p.sum(1, keepdims=True)
        m = classification_metrics(y, p)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_bacc = balanced_accuracy_score(y, p.argmax(1))
        assert m["bacc"] == pytest.approx(ref_bacc)
        assert m["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro", labels=range(C), zero_division=0))
        if len(np.unique(y)) == C:
            ref = roc_auc_score(y, p[:, 1]) if C == 2 else roc_auc_score(y, p, multi_class="ovr", labels=range(C))
            assert m["auroc"] == pytest.approx(ref)
