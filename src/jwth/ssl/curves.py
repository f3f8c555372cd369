"""Loss curves of pretraining / post-training runs (``losses.csv`` -> PNG).

One panel per loss term (total, DINO, iBOT, KoLeo, Gram) plus the schedules (learning
rate, teacher temperature) and the collapse monitors (teacher entropy, embedding
spread). Several runs (e.g. pretraining then post-training) are drawn on one step axis,
each continuing where the previous one ended. Where a run has a ``monitor.csv`` (the
online evaluation of :mod:`jwth.ssl.monitor`), two more panels show its balanced
accuracies (k-NN and logistic regression on the class token and the mean patch token)
and its effective ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["read_losses", "read_monitor", "plot_losses"]

#: (column, legend) of the monitor panels: balanced accuracy, then representation health
MONITOR_BACC = [
    ("knn_bacc_cls", "k-NN, class token"),
    ("logreg_bacc_cls", "logreg, class token"),
    ("knn_bacc_patch", "k-NN, mean patch token"),
    ("logreg_bacc_patch", "logreg, mean patch token"),
]
MONITOR_RANK = [("erank_cls", "class tokens (over tiles)"), ("erank_patch_per_tile", "patch tokens (per tile)")]

PANELS = [
    ("loss", "total loss"),
    ("dino", "DINO (class token)"),
    ("ibot", "iBOT (masked patch tokens)"),
    ("koleo", "KoLeo"),
    ("gram", "Gram anchoring"),
    ("lr", "learning rate"),
    ("teacher_temp", "teacher temperature"),
    ("teacher_entropy", "teacher entropy / log K"),
    ("embedding_spread", "class-token spread"),
]


def _read_step_csv(f: Path, empty_hint: str) -> pd.DataFrame:
    """A CSV written by a run (``step`` column, numeric values), one row per step (the last
    write of a step wins: a resumed run may repeat steps logged after its last checkpoint).

    Raises:
        ValueError: unparseable, no ``step`` column, no rows, or a non-numeric value.
    """
    try:
        df = pd.read_csv(f)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        raise ValueError(f"{f} cannot be read ({e}); {empty_hint}") from e
    if "step" not in df.columns:
        raise ValueError(f"{f} has no 'step' column; it was not written by jwth pretrain.")
    if df.empty:
        raise ValueError(f"{f} has no rows: {empty_hint}")
    numeric = df.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & df.notna()
    if bad.any().any():
        row = int(bad.any(axis=1).to_numpy().argmax())
        raise ValueError(f"{f}: non-numeric value in data row {row + 1} ({df.iloc[row].to_dict()}); the file is damaged.")
    return numeric.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def read_losses(run_dir: str | Path) -> pd.DataFrame:
    """Read ``<run_dir>/losses.csv`` (or a CSV path).

    Raises:
        FileNotFoundError: no losses.csv (the run has not logged a step yet).
        ValueError: the file is damaged (see :func:`_read_step_csv`).
    """
    p = Path(run_dir)
    f = p if p.suffix == ".csv" else p / "losses.csv"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: pass a `jwth pretrain` / `jwth posttrain` run folder.")
    return _read_step_csv(f, "the run has not logged a step yet, or the file is damaged.")


def read_monitor(run_dir: str | Path) -> pd.DataFrame | None:
    """Read ``<run_dir>/monitor.csv``; None when the run has no monitor.

    Raises:
        ValueError: the file exists but is damaged (see :func:`_read_step_csv`).
    """
    p = Path(run_dir)
    f = (p.parent if p.suffix == ".csv" else p) / "monitor.csv"
    if not f.is_file():
        return None
    return _read_step_csv(f, "delete the damaged monitor.csv to plot without the monitor.")


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    pad = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


def plot_losses(runs: list[str | Path], out_png: str | Path, labels: list[str] | None = None,
                smooth: int = 20, overlay: bool = False) -> Path:
    """Write a grid of loss / schedule panels for one or more runs, chained on one step axis.

    Args:
        runs: run folders (or ``losses.csv`` paths), in training order.
        out_png: output PNG.
        labels: legend names (default: folder names).
        smooth: moving-average window in steps for the loss panels (raw values are drawn faint).
        overlay: draw the runs over each other on their own step counts (pilot runs side by
            side) instead of chaining them (pretraining, then post-training).

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [read_losses(r) for r in runs]
    monitors = [read_monitor(r) for r in runs]
    labels = labels or [Path(r).name if Path(r).suffix != ".csv" else Path(r).parent.name for r in runs]
    present = [(c, t) for c, t in PANELS if any(c in f.columns and f[c].abs().sum() > 0 for f in frames)]
    n_loss_panels = len(present)
    if any(m is not None and len(m) for m in monitors):
        present += [("monitor_bacc", "monitor: balanced accuracy"), ("monitor_rank", "monitor: effective rank")]
    ncols = 3
    nrows = int(np.ceil(len(present) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    offset = 0
    styles = ["-", "--", ":", "-."]
    for frame, mon, label, color in zip(frames, monitors, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        x = frame["step"].to_numpy() + offset
        if mon is not None and len(mon):
            xm = mon["step"].to_numpy() + offset
            for ax, cols in ((axes.flat[n_loss_panels], MONITOR_BACC), (axes.flat[n_loss_panels + 1], MONITOR_RANK)):
                for i, ((col, name), ls) in enumerate(zip(cols, styles)):
                    if col in mon.columns:
                        # one run: a colour per metric; several runs: the run's colour, a line style per metric
                        c = f"C{i}" if len(frames) == 1 else color
                        ax.plot(xm, mon[col].to_numpy(float), ls, color=c, marker=".", lw=1.1,
                                label=f"{name}" if len(frames) == 1 else f"{label}: {name}")  # fmt: skip
        for ax, (col, title) in zip(axes.flat[:n_loss_panels], present):
            if col not in frame.columns:
                continue
            y = frame[col].to_numpy(float)
            if col in ("loss", "dino", "ibot", "koleo", "gram"):
                ax.plot(x, y, color=color, alpha=0.25, lw=0.6)
                ax.plot(x, _smooth(y, smooth), color=color, lw=1.4, label=label)
            else:
                ax.plot(x, y, color=color, lw=1.2, label=label)
            ax.set_title(title, fontsize=9)
        if not overlay:
            offset = int(x[-1]) + 1 if len(x) else offset
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax, (col, title) in zip(axes.flat[: len(present)], present):
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if col.startswith("monitor_"):
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=6)
            n_cls = {int(c) for m in monitors if m is not None and "n_classes" in m for c in m["n_classes"].dropna()}
            if col == "monitor_bacc" and len(n_cls) == 1:
                ax.axhline(1.0 / n_cls.pop(), color="grey", lw=0.6, ls=":")  # chance balanced accuracy = 1 / C
    if len(frames) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
