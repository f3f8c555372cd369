"""Run-folder outputs of a probe: results.json, results.md, predictions.csv and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from jwth.eval.metrics import aggregate_by_patient


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _ci(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def results_table(results: dict) -> str:
    """The Markdown table of a probe's results (one row per head and level)."""
    lines = [
        "| head | level | balanced accuracy [95% CI] | AUROC [95% CI] | macro-F1 | n |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for h, r in results["heads"].items():
        for level in ("tile", "patient"):
            m = r[level]
            lines.append(
                f"| {h} | {level} | {_fmt(m['bacc'])} {_ci(m['bacc_ci'])} | {_fmt(m['auroc'])} "
                f"{_ci(m['auroc_ci'])} | {_fmt(m['f1_macro'])} | {m['n']} |"
            )
    if results.get("comparisons"):
        lines += ["", "| comparison (paired bootstrap over patients) | level | Δ balanced accuracy [95% CI] | P(Δ ≤ 0) |", "| --- | --- | --- | --- |"]
        for name, c in results["comparisons"].items():
            for level in ("tile", "patient"):
                d = c[level]
                lines.append(f"| {name} | {level} | {d['diff']:+.3f} {_ci(d['ci'])} | {_fmt(d['p_le_0'])} |")
    return "\n".join(lines)


def write_markdown(path: Path, results: dict) -> None:
    enc = results.get("encoder", {})
    warn = ""
    if enc.get("random_init"):
        warn = (
            "\n> **Encoder is RANDOMLY INITIALISED** (no pretrained weights): these numbers measure "
            "an untrained network and are a pipeline check, not a model's performance.\n"
        )
    head = (
        f"# Probe: {results.get('dataset', '?')} with {enc.get('spec', '?')}\n{warn}\n"
        f"{results['n_tiles']} tiles, {results['n_patients']} patients, {results['n_sites']} sites; "
        f"split: {results['split']['kind']} ({results['split']['folds']} fold(s)); classes: "
        f"{', '.join(results['classes'])} (positive: {results.get('positive_class')}).\n\n"
    )
    path.write_text(head + results_table(results) + "\n")


def write_predictions(path: Path, tiles: pd.DataFrame, classes: list[str], oof: dict, test_mask: np.ndarray) -> None:
    """Out-of-fold probabilities per tested tile and head (``prob_<head>_<class>``)."""
    df = tiles.loc[test_mask, ["path", "label", "patient_id", "site"]].copy()
    for h, p in oof.items():
        for j, c in enumerate(classes):
            df[f"prob_{h}_{c}"] = p[test_mask, j]
    df.to_csv(path, index=False)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, y: np.ndarray, oof: dict, patients: np.ndarray, classes: list[str]) -> None:
    """Tile- and patient-level confusion matrices (row-normalised) for each head."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    heads = list(oof)
    fig, axes = plt.subplots(2, len(heads), figsize=(3.6 * len(heads), 6.6), squeeze=False)
    for j, h in enumerate(heads):
        p = oof[h]
        pp, yp, _ = aggregate_by_patient(p, y, patients)
        for i, (yy, pr, lvl) in enumerate([(y, p, "tile"), (yp, pp, "patient")]):
            ConfusionMatrixDisplay.from_predictions(
                yy, pr.argmax(1), labels=range(len(classes)), display_labels=classes,
                normalize="true", values_format=".2f", ax=axes[i, j], colorbar=False,
            )
            axes[i, j].set_title(f"{h} — {lvl}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(path: Path, y: np.ndarray, oof: dict, patients: np.ndarray, classes: list[str], positive: int) -> None:
    """ROC curves of each head at tile and patient level (positive class vs rest)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for h, p in oof.items():
        pp, yp, _ = aggregate_by_patient(p, y, patients)
        for ax, yy, pr in [(axes[0], y, p), (axes[1], yp, pp)]:
            t = (yy == positive).astype(int)
            if len(np.unique(t)) < 2:
                continue
            fpr, tpr, _ = roc_curve(t, pr[:, positive])
            ax.plot(fpr, tpr, label=f"{h} (AUROC {roc_auc_score(t, pr[:, positive]):.3f})")
    for ax, lvl in zip(axes, ("tile", "patient")):
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{lvl} level, positive = {classes[positive]}")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(
    path: Path,
    root: Path,
    tiles: pd.DataFrame,
    attention: np.ndarray,
    prob: np.ndarray,
    classes: list[str],
    grid: tuple[int, int],
    per_class: int = 4,
) -> list[str]:
    """Tiles with the strongest class-token attention, attention drawn over each tile.

    For each class, the ``per_class`` tested tiles predicted most confidently as that
    class (correctly) are shown: the tile, and the head-averaged attention of the
    class token over the patch grid (upsampled bilinearly) over it.

    Returns:
        The tile paths shown.
    """
    from jwth.data.tiles import load_tile

    plt = _plt()
    labels = tiles["label"].to_numpy()
    chosen = []
    for j, c in enumerate(classes):
        ok = np.flatnonzero(np.isfinite(attention[:, 0]) & (labels == c) & (prob.argmax(1) == j))
        chosen += [(i, c) for i in ok[np.argsort(-prob[ok, j])][:per_class]]
    if not chosen:
        return []
    n = len(chosen)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.4 * 2 * cols, 2.9 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, (i, c) in enumerate(chosen):
        r, cc = divmod(k, cols)
        img, _ = load_tile(root / tiles["path"].iloc[i])
        a = attention[i].reshape(grid)
        axes[r, 2 * cc].imshow(img)
        axes[r, 2 * cc].set_title(f"{c} p={prob[i].max():.2f}", fontsize=8)
        axes[r, 2 * cc + 1].imshow(img)
        axes[r, 2 * cc + 1].imshow(
            a, cmap="inferno", alpha=0.55, extent=(0, img.size[0], img.size[1], 0), interpolation="bilinear"
        )
        axes[r, 2 * cc + 1].set_title(f"attention (max {a.max():.3f})", fontsize=8)
    fig.suptitle(
        "Class-token attention over patch tokens (JWTH head, mean over heads); per class, the test tiles "
        "predicted most confidently", fontsize=10,
    )
    fig.tight_layout(h_pad=1.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [tiles["path"].iloc[i] for i, _ in chosen]


def write_json(path: Path, obj: dict) -> None:
    def clean(o):
        if isinstance(o, float) and math.isnan(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, np.integer)):
            return clean(o.item())
        return o

    path.write_text(json.dumps(clean(obj), indent=2))
