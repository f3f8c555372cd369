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


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


#: Footnotes used by :func:`value_ci` instead of a bare "n/a".
NOTES = {
    "‡": "‡ undefined: a class has no test tiles here (macro one-vs-rest AUROC needs every class).",
    "†": "† no CI: fewer than 10 of the bootstrap resamples over patients hold two classes (too few patients).",
}


def _ci(ci, point=0.0) -> str:
    if _nan(point):
        return ""
    return "[—]†" if _nan(ci[0]) or _nan(ci[1]) else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def value_ci(m: dict, key: str) -> str:
    """``"0.612 [0.551, 0.680]"``, with a footnote mark (:data:`NOTES`) where a value or CI is undefined."""
    v = m.get(key)
    return "—‡" if _nan(v) else f"{_fmt(v)} {_ci(m.get(key + '_ci', [None, None]), v)}"


def footnotes(text: str) -> str:
    """The :data:`NOTES` whose marks occur in ``text``, one per line (empty if none)."""
    return "\n".join(n for mark, n in NOTES.items() if mark in text)


BASELINE_LABELS = {"majority": "majority class", "colour": "colour statistics (linear)", "tile-count": "tile count"}


def results_table(results: dict) -> str:
    """The Markdown table of a probe's results (one row per head and level, then the baselines)."""
    lines = [
        "| head | level | balanced accuracy [95% CI] | AUROC [95% CI] | macro-F1 | n |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = [(h, r) for h, r in results["heads"].items()]
    rows += [(f"baseline: {BASELINE_LABELS.get(b, b)}", r) for b, r in (results.get("baselines") or {}).items()]
    for h, r in rows:
        if "skipped" in r:
            lines.append(f"| {h} | — | skipped: {r['skipped']} | | | |")
            continue
        for level in ("tile", "patient"):
            if level not in r:
                continue
            m = r[level]
            lines.append(
                f"| {h} | {level} | {value_ci(m, 'bacc')} | {value_ci(m, 'auroc')} | {_fmt(m['f1_macro'])} | {m['n']} |"
            )
    if results.get("comparisons"):
        lines += ["", "| comparison (paired bootstrap over patients) | level | Δ balanced accuracy [95% CI] | P(Δ ≤ 0) |", "| --- | --- | --- | --- |"]
        for name, c in results["comparisons"].items():
            for level in ("tile", "patient"):
                d = c[level]
                lines.append(f"| {name} | {level} | {d['diff']:+.3f} {_ci(d['ci'])} | {_fmt(d['p_le_0'])} |")
    if len(results.get("classes", [])) > 2:
        lines += ["", f"AUROC: macro average of the {len(results['classes'])} one-vs-rest AUROCs."]
    for w in results.get("warnings") or []:
        lines += ["", f"WARNING: {w}"]
    notes = footnotes("\n".join(lines))
    return "\n".join(lines + (["", notes] if notes else []))


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
    body = results_table(results)
    if results.get("stain_shift"):
        from jwth.eval.stain_shift import shift_table

        body += "\n\n## Stain shift\n\n" + shift_table(results["stain_shift"]) + "\n\n![stain shift](stain_shift.png)"
    path.write_text(head + body + "\n")


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
    """Tile- and patient-level confusion matrices for each head, row-normalised (recall per true class).

    Panels grow with the number of classes C and the predicted-class labels are rotated,
    so matrices stay readable up to about 10 classes; the title of each says it is
    row-normalised and how many tiles / patients it counts.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    heads = list(oof)
    C = len(classes)
    side = max(3.6, 0.6 * C + 1.6)
    fig, axes = plt.subplots(2, len(heads), figsize=(side * len(heads), 2 * side + 0.4), squeeze=False)
    for j, h in enumerate(heads):
        p = oof[h]
        pp, yp, _ = aggregate_by_patient(p, y, patients)
        for i, (yy, pr, lvl) in enumerate([(y, p, "tile"), (yp, pp, "patient")]):
            disp = ConfusionMatrixDisplay.from_predictions(
                yy, pr.argmax(1), labels=range(len(classes)), display_labels=classes,
                normalize="true", values_format=".2f", ax=axes[i, j], colorbar=False,
                xticks_rotation=45 if C > 4 else "horizontal", text_kw={"fontsize": 9 if C <= 6 else 7},
                im_kw={"vmin": 0.0, "vmax": 1.0},  # one colour scale for every panel: 0.44 never looks like 1
            )
            image = disp.im_
            axes[i, j].set_title(f"{h} — {lvl} (n={len(yy)})\nrow-normalised: recall per true class", fontsize=9)
    fig.tight_layout()
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="share of the true class (0-1, all panels)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(path: Path, y: np.ndarray, oof: dict, patients: np.ndarray, classes: list[str], positive: int) -> None:
    """ROC curves of each head at tile and patient level.

    Two classes: one curve per head, positive class vs the other, labelled with the
    AUROC of the results table. More classes: one panel per head and level with the
    one-vs-rest curve of every class (its AUROC in the legend), titled with the
    macro one-vs-rest AUROC -- the mean of those, the quantity in the results table.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    if len(classes) > 2:
        _plot_roc_multiclass(plt, path, y, oof, patients, classes)
        return
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


def _plot_roc_multiclass(plt, path, y, oof, patients, classes) -> None:
    from sklearn.metrics import roc_curve

    from jwth.eval.metrics import metric

    heads = list(oof)
    fig, axes = plt.subplots(len(heads), 2, figsize=(10, 4.3 * len(heads)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, h in enumerate(heads):
        pp, yp, _ = aggregate_by_patient(oof[h], y, patients)
        for j, (yy, pr, lvl) in enumerate([(y, oof[h], "tile"), (yp, pp, "patient")]):
            ax = axes[i, j]
            for c, name in enumerate(classes):
                t = (yy == c).astype(int)
                if len(np.unique(t)) < 2:
                    ax.plot([], [], color=cmap(c % 10), label=f"{name}: no test {lvl}s of this class")
                    continue
                fpr, tpr, _ = roc_curve(t, pr[:, c])
                auc = metric("auroc", t, np.stack([1 - pr[:, c], pr[:, c]], 1))
                ax.plot(fpr, tpr, color=cmap(c % 10), lw=1.2, label=f"{name} vs rest ({auc:.3f})")
            macro = metric("auroc", yy, pr)
            macro_s = f"{macro:.3f}" if np.isfinite(macro) else "undefined (a class has no test samples)"
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
            ax.set(xlabel="false positive rate", ylabel="true positive rate",
                   title=f"{h} — {lvl}: macro one-vs-rest AUROC {macro_s}")
            ax.title.set_fontsize(9)
            ax.legend(loc="lower right", fontsize=7)
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
    # one colour scale for all tiles, in multiples of uniform attention (1 = every token 1/N): a nearly
    # uniform map stays dark instead of being stretched to look like a hot spot
    n_tok = grid[0] * grid[1]
    vmax = max(2.0, float(max(np.nanmax(attention[i]) for i, _ in chosen) * n_tok))
    overlay = None
    for k, (i, c) in enumerate(chosen):
        r, cc = divmod(k, cols)
        img, _ = load_tile(root / tiles["path"].iloc[i])
        a = attention[i].reshape(grid) * n_tok
        axes[r, 2 * cc].imshow(img)
        axes[r, 2 * cc].set_title(f"{c} p={prob[i].max():.2f}", fontsize=8)
        axes[r, 2 * cc + 1].imshow(img)
        overlay = axes[r, 2 * cc + 1].imshow(
            a, cmap="inferno", alpha=0.55, extent=(0, img.size[0], img.size[1], 0), interpolation="bilinear",
            vmin=0.0, vmax=vmax,
        )
        axes[r, 2 * cc + 1].set_title(f"attention (max {a.max():.1f}x uniform)", fontsize=8)
    fig.suptitle(
        "Class-token attention over patch tokens (JWTH head, mean over heads); per class, the test tiles "
        "predicted most confidently", fontsize=10,
    )
    fig.tight_layout(h_pad=1.5)
    fig.colorbar(overlay, ax=axes.ravel().tolist(), shrink=0.5, label="attention x N (1 = uniform)")
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
