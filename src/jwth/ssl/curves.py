"""Loss curves of pretraining / post-training runs (``losses.csv`` -> PNG).

One panel per loss term (total, DINO, iBOT, KoLeo, Gram) plus the schedules (learning
rate, teacher temperature) and the collapse monitors (teacher entropy, embedding
spread). Several runs (e.g. pretraining then post-training) are drawn on one step axis,
each continuing where the previous one ended.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["read_losses", "plot_losses"]

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


def read_losses(run_dir: str | Path) -> pd.DataFrame:
    """Read ``<run_dir>/losses.csv`` (or a CSV path).

    Raises:
        FileNotFoundError: no losses.csv (the run has not logged a step yet).
        ValueError: the file has no ``step`` column.
    """
    p = Path(run_dir)
    f = p if p.suffix == ".csv" else p / "losses.csv"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: pass a `jwth pretrain` / `jwth posttrain` run folder.")
    try:
        df = pd.read_csv(f)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        raise ValueError(f"{f} cannot be read ({e}); the run has not logged a step yet, or the file is damaged.") from e
    if "step" not in df.columns:
        raise ValueError(f"{f} has no 'step' column; it was not written by jwth pretrain.")
    if df.empty:
        raise ValueError(f"{f} has no rows: the run has not logged a step yet.")
    numeric = df.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & df.notna()
    if bad.any().any():
        row = int(bad.any(axis=1).to_numpy().argmax())
        raise ValueError(f"{f}: non-numeric value in data row {row + 1} ({df.iloc[row].to_dict()}); the file is damaged.")
    df = numeric
    # a resumed run may repeat steps logged after its last checkpoint: keep the last write
    return df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    pad = np.concatenate([np.full(window - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


def plot_losses(runs: list[str | Path], out_png: str | Path, labels: list[str] | None = None,
                smooth: int = 20) -> Path:
    """Write a grid of loss / schedule panels for one or more runs, chained on one step axis.

    Args:
        runs: run folders (or ``losses.csv`` paths), in training order.
        out_png: output PNG.
        labels: legend names (default: folder names).
        smooth: moving-average window in steps for the loss panels (raw values are drawn faint).

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [read_losses(r) for r in runs]
    labels = labels or [Path(r).name if Path(r).suffix != ".csv" else Path(r).parent.name for r in runs]
    present = [(c, t) for c, t in PANELS if any(c in f.columns and f[c].abs().sum() > 0 for f in frames)]
    ncols = 3
    nrows = int(np.ceil(len(present) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    offset = 0
    for frame, label, color in zip(frames, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        x = frame["step"].to_numpy() + offset
        for ax, (col, title) in zip(axes.flat, present):
            if col not in frame.columns:
                continue
            y = frame[col].to_numpy(float)
            if col in ("loss", "dino", "ibot", "koleo", "gram"):
                ax.plot(x, y, color=color, alpha=0.25, lw=0.6)
                ax.plot(x, _smooth(y, smooth), color=color, lw=1.4, label=label)
            else:
                ax.plot(x, y, color=color, lw=1.2, label=label)
            ax.set_title(title, fontsize=9)
        offset = int(x[-1]) + 1 if len(x) else offset
    for ax in axes.flat[len(present):]:
        ax.axis("off")
    for ax in axes.flat[: len(present)]:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    if len(frames) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
