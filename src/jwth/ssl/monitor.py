"""Online monitor of a pretraining run: a cheap, fixed evaluation every N steps.

A bad self-supervised recipe usually looks fine in its losses for hours. The monitor
answers the question that matters during training — do the teacher's features carry
the label signal, and are they healthy? — on a fixed, patient-disjoint subset of a
labelled tile folder (labels are used only here, never by the training losses):

* **k-NN** (cosine, class-balanced votes; Wu et al. 2018 / DINO's k-NN protocol) and
  **logistic regression** (standardised features, class-balanced; the linear probe)
  balanced accuracy, pooled over out-of-fold predictions of a patient-level
  stratified k-fold, on the teacher's **class token** and its **mean patch token**;
* **representation health**: effective rank (Roy & Vetterli 2007) of the class tokens
  over the subset, mean per-tile effective rank and mean pairwise cosine of the patch
  tokens (see :mod:`jwth.diagnose`).

The subset is drawn once per run (seeded): an equal number of tiles per class, spread
round-robin over each class's patients so that no patient dominates, then split into
patient-level folds (no patient in two folds). Tiles are decoded once, resized to the
training resolution and kept in memory, so an evaluation costs one teacher forward over
``n_tiles`` tiles plus a few small scikit-learn fits (seconds for ViT-Ti at 112 px).

Rows go to ``monitor.csv`` in the run folder (one per evaluation); ``jwth plot-losses``
draws them beside the losses.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MonitorSet", "build_monitor_set", "evaluate_features", "monitor_row", "MONITOR_COLUMNS",
           "knn_predict", "append_rows"]  # fmt: skip

MONITOR_COLUMNS = [
    "step", "wall_s", "n_tiles", "n_patients", "n_classes",
    "knn_bacc_cls", "logreg_bacc_cls", "knn_bacc_patch", "logreg_bacc_patch",
    "erank_cls", "erank_patch_per_tile", "patch_cosine", "teacher_entropy", "eval_s",
]  # fmt: skip


@dataclass
class MonitorSet:
    """The fixed evaluation subset.

    Attributes:
        images: normalised tiles, float32 (T, 3, S, S).
        y: class index per tile, int64 (T,).
        patients: patient ID per tile, (T,) strings.
        classes: class names; class index i is ``classes[i]``.
        folds: k pairs (train_idx, test_idx) of tile indices, patient-disjoint.
        source: the label file read.
    """

    images: torch.Tensor
    y: np.ndarray
    patients: np.ndarray
    classes: list[str]
    folds: list[tuple[np.ndarray, np.ndarray]]
    source: str


def _pick_tiles(y: np.ndarray, patients: np.ndarray, n_tiles: int, seed: int) -> np.ndarray:
    """Indices of ~n_tiles tiles: n_tiles // C per class, round-robin over the class's patients."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    quota = max(1, n_tiles // len(classes))
    chosen: list[int] = []
    for c in classes:
        idx_c = np.flatnonzero(y == c)
        pats = np.unique(patients[idx_c])
        rng.shuffle(pats)
        queues = {p: list(rng.permutation(idx_c[patients[idx_c] == p])) for p in pats}
        picked: list[int] = []
        while len(picked) < quota and any(queues.values()):
            for p in pats:
                if queues[p] and len(picked) < quota:
                    picked.append(int(queues[p].pop()))
        chosen += picked
    return np.sort(np.asarray(chosen, dtype=np.int64))


def build_monitor_set(
    data_dir: str | Path,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    n_tiles: int = 512,
    n_folds: int = 5,
    seed: int = 0,
    label_col: str = "label",
    patient_col: str | None = "patient_id",
) -> MonitorSet:
    """Draw, decode and split the monitor subset of a labelled tile folder.

    Args:
        data_dir: folder with a ``labels.csv`` (read and validated as by ``jwth probe``).
        size: side in pixels the tiles are resized to (the training global-crop size).
        mean, std: normalisation of the training crops.
        n_tiles: subset size (split equally over the classes).
        n_folds: patient-level folds for the out-of-fold predictions.
        seed: subset and fold seed.

    Returns:
        A :class:`MonitorSet`.

    Raises:
        FileNotFoundError / ValueError: as :func:`jwth.data.tiles.read_labels` (no labels.csv,
            one class, unknown columns, ...) and :func:`jwth.eval.splits.patient_folds`
            (fewer patients of a class than folds: lower ``monitor.n_folds``).
        jwth.data.tiles.TileError: a chosen tile cannot be decoded (the message names it).
    """
    from jwth.data.tiles import load_tile, read_labels
    from jwth.eval.splits import patient_folds

    table = read_labels(data_dir, label_col=label_col, patient_col=patient_col)
    y_all = table.y
    pats_all = table.df["patient_id"].to_numpy(dtype=str)
    idx = _pick_tiles(y_all, pats_all, int(n_tiles), seed)
    y, pats = y_all[idx], pats_all[idx]
    folds = patient_folds(y, pats, n_splits=int(n_folds), seed=seed, class_names=table.classes)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    imgs = []
    for i in idx:
        img, _ = load_tile(table.root / table.df["path"].iloc[i])
        img = img.convert("RGB").resize((size, size), resample=3)  # bicubic, as the encoder transforms
        t = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        imgs.append((t - m) / s)
    return MonitorSet(torch.stack(imgs), y, pats, list(table.classes), folds, str(table.label_file))


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int, n_classes: int) -> np.ndarray:
    """Class-balanced cosine k-NN: each of the k nearest training tiles votes for its class
    with weight 1 / (training tiles of that class); the class with the largest vote wins.

    Args:
        train_x: (n, D) features; train_y: (n,) class indices; test_x: (m, D).

    Returns:
        (m,) predicted class indices.
    """
    a = F.normalize(torch.from_numpy(train_x).double(), dim=-1)
    b = F.normalize(torch.from_numpy(test_x).double(), dim=-1)
    k = min(int(k), a.shape[0])
    nn_idx = (b @ a.T).topk(k, dim=1).indices.numpy()
    counts = np.bincount(train_y, minlength=n_classes).astype(float)
    w = 1.0 / np.maximum(counts, 1.0)
    votes = np.zeros((test_x.shape[0], n_classes))
    for c in range(n_classes):
        votes[:, c] = (train_y[nn_idx] == c).sum(1) * w[c]
    return votes.argmax(1)


def evaluate_features(x: np.ndarray, ms: MonitorSet, k: int = 20) -> tuple[float, float]:
    """Out-of-fold balanced accuracy of k-NN and of logistic regression on features x (T, D).

    Returns:
        (k-NN balanced accuracy, logistic-regression balanced accuracy), each from the
        predictions pooled over the folds (scikit-learn's ``balanced_accuracy_score``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    n_classes = len(ms.classes)
    pk = np.empty(len(ms.y), dtype=np.int64)
    pl = np.empty(len(ms.y), dtype=np.int64)
    for tr, te in ms.folds:
        pk[te] = knn_predict(x[tr], ms.y[tr], x[te], k, n_classes)
        sc = StandardScaler().fit(x[tr])
        clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
        clf.fit(sc.transform(x[tr]), ms.y[tr])
        pl[te] = clf.predict(sc.transform(x[te]))
    return float(balanced_accuracy_score(ms.y, pk)), float(balanced_accuracy_score(ms.y, pl))


@torch.no_grad()
def monitor_row(backbone: torch.nn.Module, ms: MonitorSet, device: torch.device, k: int = 20,
                batch_size: int = 64) -> dict[str, float]:
    """Evaluate a backbone (the EMA teacher) on the monitor subset.

    Args:
        backbone: timm ViT with a class token and dynamic image size (as in pretraining).
        ms: the subset from :func:`build_monitor_set`.

    Returns:
        The metric columns of :data:`MONITOR_COLUMNS` (without step / wall time).
    """
    import time

    from jwth.diagnose import effective_rank, mean_pairwise_cosine
    from jwth.ssl.model import backbone_forward

    t0 = time.perf_counter()
    was_training = backbone.training
    backbone.eval()
    cls, mean_patch, erank_tile, cos_tile = [], [], [], []
    for i in range(0, ms.images.shape[0], batch_size):
        out = backbone_forward(backbone, ms.images[i : i + batch_size].to(device))
        c, p = out.cls.float().cpu(), out.patches.float().cpu()
        cls.append(c)
        mean_patch.append(p.mean(1))
        for tile in p[:: max(1, p.shape[0] // 8)]:  # 8 tiles per batch are enough for the health numbers
            erank_tile.append(effective_rank(tile))
            cos_tile.append(mean_pairwise_cosine(tile))
    backbone.train(was_training)
    xc = torch.cat(cls)
    xp = torch.cat(mean_patch)
    knn_c, lr_c = evaluate_features(xc.numpy().astype(np.float64), ms, k)
    knn_p, lr_p = evaluate_features(xp.numpy().astype(np.float64), ms, k)
    return {
        "n_tiles": int(len(ms.y)), "n_patients": int(len(np.unique(ms.patients))), "n_classes": len(ms.classes),
        "knn_bacc_cls": knn_c, "logreg_bacc_cls": lr_c, "knn_bacc_patch": knn_p, "logreg_bacc_patch": lr_p,
        "erank_cls": effective_rank(xc - xc.mean(0, keepdim=True)),
        "erank_patch_per_tile": float(np.mean(erank_tile)), "patch_cosine": float(np.mean(cos_tile)),
        "eval_s": round(time.perf_counter() - t0, 2),
    }  # fmt: skip


def append_rows(path: Path, rows: list[dict], keep_below_step: int | None = None) -> None:
    """Append rows to ``monitor.csv`` (header written when new). With ``keep_below_step``
    the existing file is first cut to rows with step <= that value (a resumed run)."""
    old: list[dict] = []
    if keep_below_step is not None and path.is_file():
        with open(path) as f:
            old = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= keep_below_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, MONITOR_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(old)
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, MONITOR_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
