"""Patient-level splits: no patient ever on both sides of a split.

Folds are stratified by the patient's label (scikit-learn's StratifiedGroupKFold
with patients as groups), so class balance is kept at the patient level, which is
what patient-level metrics are computed on (REFERENCE sec. 7).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


class LeakError(ValueError):
    """A split puts the same patient on both sides."""


def assert_no_leak(patients: np.ndarray, a: np.ndarray, b: np.ndarray, what: str = "train/test") -> None:
    """Raise :class:`LeakError` if any patient has tiles in both index sets ``a`` and ``b``."""
    both = set(np.asarray(patients)[a]) & set(np.asarray(patients)[b])
    if both:
        raise LeakError(f"{len(both)} patients are on both sides of the {what} split (e.g. {sorted(both)[:3]}).")


def _check_classes(labels: np.ndarray, idx: np.ndarray, what: str) -> None:
    present = np.unique(labels[idx])
    if len(present) < 2:
        raise ValueError(
            f"The {what} set holds only class {present.tolist()}; metrics such as balanced accuracy "
            "and AUROC are undefined there. Use fewer folds, or other --test-sites."
        )


def _per_class_patients(labels: np.ndarray, patients: np.ndarray, class_names: Sequence[str] | None) -> dict:
    name = (lambda c: class_names[int(c)]) if class_names is not None else (lambda c: int(c))
    return {name(c): len(set(patients[labels == c])) for c in np.unique(labels)}


def patient_folds(
    labels: Sequence[int],
    patients: Sequence[str],
    n_splits: int = 5,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold over patients.

    Args:
        labels: class index per tile, (n,).
        patients: patient ID per tile, (n,).
        n_splits: k.
        seed: shuffling seed.

    Returns:
        k pairs (train_idx, test_idx) of tile indices; every tile is in exactly one test fold.

    Raises:
        ValueError: fewer patients of a class than folds, or a fold without both classes.
        LeakError: never, unless the splitter is broken (checked).
    """
    if n_splits < 2:
        raise ValueError(f"--folds {n_splits}: k-fold cross-validation needs at least 2 folds.")
    labels = np.asarray(labels)
    patients = np.asarray(patients)
    per_class = _per_class_patients(labels, patients, class_names)
    if min(per_class.values()) < n_splits:
        few = min(per_class.values())
        fix = f"use --folds {few} or fewer" if few >= 2 else "remove that class or add patients of it"
        raise ValueError(f"Too few patients per class for {n_splits}-fold CV (patients per class: {per_class}): {fix}.")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = []
    for tr, te in sgkf.split(np.zeros(len(labels)), labels, groups=patients):
        assert_no_leak(patients, tr, te)
        _check_classes(labels, te, "test fold")
        folds.append((tr, te))
    return folds


def site_split(
    labels: Sequence[int], patients: Sequence[str], sites: Sequence[str], test_sites: Sequence[str]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train on every site but ``test_sites``, test on those (cross-site transfer).

    Raises:
        ValueError: unknown test sites, or a side without both classes.
        LeakError: a patient seen at a test site and a training site.
    """
    labels, patients, sites = np.asarray(labels), np.asarray(patients), np.asarray(sites)
    known = set(sites)
    unknown = sorted(set(test_sites) - known)
    if unknown:
        raise ValueError(f"Test sites {unknown} are not in the data; known sites: {sorted(known)}.")
    te = np.flatnonzero(np.isin(sites, list(test_sites)))
    tr = np.flatnonzero(~np.isin(sites, list(test_sites)))
    assert_no_leak(patients, tr, te, "train-site/test-site")
    _check_classes(labels, tr, "training-site")
    _check_classes(labels, te, "test-site")
    return [(tr, te)]


def inner_split(
    labels: Sequence[int],
    patients: Sequence[str],
    idx: np.ndarray,
    val_fraction: float = 0.2,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split training tiles ``idx`` into fit and validation sets by patient.

    Used to choose learning rate and weight decay without touching the test fold.

    Returns:
        (fit_idx, val_idx), subsets of ``idx``.

    Raises:
        ValueError: the validation set cannot hold both classes.
    """
    labels, patients, idx = np.asarray(labels), np.asarray(patients), np.asarray(idx)
    k = max(2, int(round(1.0 / val_fraction)))
    sub_labels, sub_pat = labels[idx], patients[idx]
    per_class = _per_class_patients(sub_labels, sub_pat, class_names)
    if min(per_class.values()) < 2:
        raise ValueError(
            f"Too few training patients per class for the inner validation split that chooses lr / weight "
            f"decay (training patients per class: {per_class}); each class needs >= 2 training patients: "
            "fewer folds, other --test-sites, or more patients of that class."
        )
    k = min(k, min(per_class.values()))
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed + 1)
    fit, val = next(sgkf.split(np.zeros(len(idx)), sub_labels, groups=sub_pat))
    fit_idx, val_idx = idx[fit], idx[val]
    assert_no_leak(patients, fit_idx, val_idx, "fit/validation")
    if len(np.unique(labels[val_idx])) < 2:
        warnings.warn("The inner validation split holds one class; hyper-parameters fall back to the first grid point.")
    return fit_idx, val_idx


def missing_training_classes(
    labels: np.ndarray, splits: Sequence[tuple], class_names: Sequence[str], what: str = "split"
) -> list[str]:
    """Warnings for classes with no training tiles, or no test tiles, in a split.

    A head cannot predict a class it never saw; macro one-vs-rest AUROC is undefined
    when a class is absent from the test side. Each warning is also emitted with
    :func:`warnings.warn` so it is printed; callers record the returned list.

    Args:
        labels: class index per tile (T,); tiles outside the run may be -1.
        splits: (train_idx, test_idx, ...) tuples.
        class_names: class index -> name.

    Returns:
        One message per split and side with a missing class.
    """
    out = []
    labels = np.asarray(labels)
    for k, sp in enumerate(splits):
        for side, idx in (("training", sp[0]), ("test", sp[1])):
            absent = [class_names[c] for c in range(len(class_names)) if not (labels[idx] == c).any()]
            if absent:
                msg = f"{what} {k}: class(es) {absent} have no {side} tiles"
                msg += " (the heads never learn them)" if side == "training" else " (AUROC is undefined there)"
                warnings.warn(msg, stacklevel=2)
                out.append(msg)
    return out
