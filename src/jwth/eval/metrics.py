"""Metrics with patient-level bootstrap confidence intervals.

Balanced accuracy (primary), macro-F1 and AUROC (one-vs-rest macro for > 2
classes), equal to scikit-learn's (tested) but fast enough for bootstraps. Confidence intervals are percentile bootstrap
intervals (Efron & Tibshirani 1993, ch. 13) that resample *patients* with
replacement, since tiles of one patient are not independent. The paired bootstrap
of a difference resamples the same patients for both heads.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

METRICS = ("bacc", "f1_macro", "auroc")


def _confusion(y: np.ndarray, pred: np.ndarray, C: int) -> np.ndarray:
    return np.bincount(y * C + pred, minlength=C * C).reshape(C, C)


def _binary_auroc(pos: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney form of the ROC AUC with average ranks for ties (Hanley & McNeil 1982)."""
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metric(name: str, y: np.ndarray, prob: np.ndarray) -> float:
    """One metric of integer labels ``y`` (n,) against class probabilities ``prob`` (n, C).

    Implemented with numpy for the bootstrap's thousands of calls; equal to
    scikit-learn's ``balanced_accuracy_score`` (classes absent from ``y`` ignored),
    ``f1_score(average="macro", labels=range(C), zero_division=0)`` and
    ``roc_auc_score`` (binary, or one-vs-rest macro) -- checked in the tests.
    AUROC is NaN when a class is missing from ``y``.
    """
    y = np.asarray(y, dtype=np.int64)
    C = prob.shape[1]
    if name == "auroc":
        if C == 2:
            return _binary_auroc(y == 1, prob[:, 1])
        if len(np.unique(y)) < C:
            return float("nan")
        return float(np.mean([_binary_auroc(y == c, prob[:, c]) for c in range(C)]))
    cm = _confusion(y, prob.argmax(1), C)
    support = cm.sum(1)
    tp = np.diag(cm).astype(np.float64)
    if name == "bacc":
        present = support > 0
        return float(np.mean(tp[present] / support[present])) if present.any() else float("nan")
    if name == "f1_macro":
        denom = support + cm.sum(0)
        f1 = np.divide(2 * tp, denom, out=np.zeros(C), where=denom > 0)
        return float(f1.mean())
    raise ValueError(f"Unknown metric {name!r}; choose from {METRICS}.")


def classification_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, macro-F1 and AUROC (NaN when only one class is present).

    Args:
        y_true: integer labels (n,).
        prob: class probabilities (n, C).
    """
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    return {m: metric(m, y_true, prob) for m in METRICS}


def aggregate_by_patient(
    prob: np.ndarray, y: np.ndarray, patients: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean tile probability per patient.

    Returns:
        (prob_patient (P, C), y_patient (P,), patient_ids (P,)) in sorted patient order.

    Raises:
        ValueError: a patient whose tiles carry different labels.
    """
    patients = np.asarray(patients)
    ids, inv = np.unique(patients, return_inverse=True)
    P, C = len(ids), prob.shape[1]
    sums = np.zeros((P, C))
    np.add.at(sums, inv, prob)
    counts = np.bincount(inv, minlength=P)[:, None]
    yp = np.full(P, -1)
    yp[inv] = y
    if not np.array_equal(yp[inv], y):
        raise ValueError("A patient has tiles with different labels; patient-level metrics need one label per patient.")
    return sums / counts, yp, ids


def _resample_groups(groups: np.ndarray, n_boot: int, seed: int):
    """Yield tile index arrays of patient-level bootstrap samples.

    Each sample draws len(patients) patients with replacement and lists the tiles of
    every drawn patient, patient after patient, in draw order.
    """
    rng = np.random.default_rng(seed)
    ids, inv = np.unique(groups, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for _ in range(n_boot):
        pick = rng.integers(0, len(ids), len(ids))
        n = counts[pick]
        ends = np.cumsum(n)
        # position of each output tile within its drawn patient, without a Python loop
        within = np.arange(ends[-1]) - np.repeat(ends - n, n)
        yield order[np.repeat(starts[pick], n) + within]


def bootstrap_cis(
    y_true: np.ndarray,
    prob: np.ndarray,
    groups: np.ndarray | None = None,
    metric_names: tuple[str, ...] = METRICS,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of several metrics on the same resampled ``groups`` (patients).

    Equal to one :func:`bootstrap_ci` call per metric with the same seed (the resamples
    are drawn once and shared). With ``groups=None`` every row is its own group (use it
    for patient-level arrays). Resamples with one class are dropped, and so are those
    where a metric is undefined (for that metric).

    Returns:
        ``{metric: (low, high)}``; (nan, nan) when fewer than 10 resamples were defined.
    """
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    vals: dict[str, list[float]] = {m: [] for m in metric_names}
    for idx in _resample_groups(groups, n_boot, seed):
        yi = y_true[idx]
        if len(np.unique(yi)) < 2:
            continue
        pi = prob[idx]
        for m in metric_names:
            v = metric(m, yi, pi)
            if np.isfinite(v):
                vals[m].append(v)
    a = (1 - level) / 2
    return {m: ((float(np.quantile(v, a)), float(np.quantile(v, 1 - a))) if len(v) >= 10
                else (float("nan"), float("nan"))) for m, v in vals.items()}


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    groups: np.ndarray | None = None,
    metric_name: str = "bacc",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of a metric, resampling ``groups`` (patients).

    With ``groups=None`` every row is its own group (use it for patient-level arrays).
    Resamples where the metric is undefined (one class) are dropped.

    Returns:
        (low, high); (nan, nan) when fewer than 10 resamples were defined.
    """
    return bootstrap_cis(y_true, prob, groups, (metric_name,), n_boot, seed, level)[metric_name]


def paired_bootstrap(
    y_true: np.ndarray,
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    groups: np.ndarray | None = None,
    metric_name: str = "bacc",
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Paired bootstrap of metric(a) - metric(b) on the same resampled patients.

    Returns:
        ``{"diff": point difference, "ci": [low, high], "p_le_0": share of resamples
        with a difference <= 0, "n_boot": defined resamples}``.
    """
    y_true = np.asarray(y_true)
    groups = np.arange(len(y_true)) if groups is None else np.asarray(groups)
    diff = metric(metric_name, y_true, prob_a) - metric(metric_name, y_true, prob_b)
    ds = []
    for idx in _resample_groups(groups, n_boot, seed):
        if len(np.unique(y_true[idx])) < 2:
            continue
        ds.append(metric(metric_name, y_true[idx], prob_a[idx]) - metric(metric_name, y_true[idx], prob_b[idx]))
    ds_arr = np.asarray(ds)
    a = (1 - level) / 2
    return {
        "diff": float(diff),
        "ci": [float(np.quantile(ds_arr, a)), float(np.quantile(ds_arr, 1 - a))] if len(ds_arr) >= 10 else [float("nan")] * 2,
        "p_le_0": float((ds_arr <= 0).mean()) if len(ds_arr) else float("nan"),
        "n_boot": int(len(ds_arr)),
    }
