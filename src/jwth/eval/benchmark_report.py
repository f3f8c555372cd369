"""Run-folder outputs of ``jwth benchmark``: results.json, results.md and figures.

Tables are tasks x evaluations (cohort settings), one per head, each task's head row
followed by the trivial baselines of the same cells and splits; then the paired
head-minus-linear differences. Figures: a heatmap of the attention-minus-linear
difference with its CI, and one forest plot per task of every predictor's balanced
accuracy with CIs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jwth.eval.report import BASELINE_LABELS, _ci, _plt, footnotes, value_ci, write_json
from jwth.eval.stain_shift import strength_key


def _cells(res: dict) -> dict:
    return {(c["task"], c["evaluation"]): c for c in res["cells"]}


def _evals(res: dict) -> list[str]:
    return [e["name"] for e in res["evaluations"]]


def _predictors(res: dict, head: str) -> list[tuple[str, str, str]]:
    """(kind, key, label) rows of a head's table: the head, then each baseline."""
    rows = [("heads", head, head)]
    return rows + [("baselines", b, f"baseline: {BASELINE_LABELS.get(b, b)}") for b in res.get("baselines", [])]


class _Reasons:
    """Footnote letters for skip reasons, shared by the tables of one document."""

    def __init__(self) -> None:
        self.letters: dict[str, str] = {}

    def mark(self, reason: str) -> str:
        if reason not in self.letters:
            self.letters[reason] = chr(ord("a") + len(self.letters) % 26) + ("" if len(self.letters) < 26 else "'")
        return self.letters[reason]

    def lines(self) -> list[str]:
        return [f"({m}) skipped: {r}" for r, m in self.letters.items()]


def head_table(res: dict, head: str, level: str, reasons: _Reasons) -> str:
    """Markdown tasks x evaluations table of ``head`` with the baselines below each task's row.

    Each cell: balanced accuracy [95 % CI], AUROC [95 % CI] (macro one-vs-rest for more
    than two classes), and on the head's row the patients / tiles tested.
    """
    evals, cells = _evals(res), _cells(res)
    lines = ["| task | predictor | " + " | ".join(evals) + " |", "| --- | --- |" + " --- |" * len(evals)]
    for task in res["tasks"]:
        for kind, key, label in _predictors(res, head):
            row = [task if kind == "heads" else "", label]
            for ev in evals:
                c = cells.get((task, ev))
                if c is None or c["status"] != "ok":
                    row.append(f"skipped ({reasons.mark(c['reason'])})" if kind == "heads" and c else "")
                    continue
                r = c.get(kind, {}).get(key)
                if r is None or "skipped" in r:
                    row.append("—")
                    continue
                if level not in r:
                    row.append(f"— ({next(iter(r))} level only)")
                    continue
                m = r[level]
                txt = f"{value_ci(m, 'bacc')}<br>AUROC {value_ci(m, 'auroc')}"
                if kind == "heads":
                    t = c["heads"][key]["tile"]["n"]
                    p = c["heads"][key]["patient"]["n"]
                    txt += f"<br>n = {p} patients / {t} tiles"
                row.append(txt)
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def delta_table(res: dict, comparison: str, level: str) -> str:
    """Markdown tasks x evaluations table of a paired difference (Δ balanced accuracy [95 % CI], P(Δ ≤ 0))."""
    evals, cells = _evals(res), _cells(res)
    lines = ["| task | " + " | ".join(evals) + " |", "| --- |" + " --- |" * len(evals)]
    for task in res["tasks"]:
        row = [task]
        for ev in evals:
            c = cells.get((task, ev))
            d = (c or {}).get("comparisons", {}).get(comparison, {}).get(level)
            row.append("skipped" if d is None else f"{d['diff']:+.3f} {_ci(d['ci'])}<br>P(Δ≤0) {d['p_le_0']:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _task_lines(res: dict) -> list[str]:
    lines = ["| task | column (source) | classes: patients / tiles | left out (patients) |", "| --- | --- | --- | --- |"]
    for name, t in res["tasks"].items():
        cls = ", ".join(f"{c}: {t['patients'][c]} / {t['tiles'][c]}" for c in t["classes"])
        lo = t["left_out_patients"]
        parts = [f"{lo['missing_value']} missing value", f"{lo['not_in_patient_table']} not in the patient table"]
        parts += [f"{n} with value {v!r}" for v, n in lo["other_values"].items()]
        if t.get("table_patients_without_tiles"):
            parts.append(f"({t['table_patients_without_tiles']} table patients have no tiles)")
        lines.append(f"| {name} | {t['column']} ({t['source']}) | {cls} | {'; '.join(parts)} |")
    return lines


def shift_tables(res: dict, level: str) -> str:
    """Markdown stain-shift tables, one per head and baseline that ran on shifted tiles:
    rows task / evaluation, columns strengths, cells balanced accuracy [CI] and the drop."""
    ok = [c for c in res["cells"] if c.get("stain_shift")]
    if not ok:
        return ""
    ss0 = ok[0]["stain_shift"]
    strengths = ss0["strengths"]
    de, moved = ss0.get("delta_e", {}), ss0.get("class_token_shift", {})
    out = [f"Heads trained on unshifted tiles; test tiles shifted per {ss0['per']} (seed {ss0['seed']}); "
           "drop = paired bootstrap over patients of shifted minus unshifted balanced accuracy "
           "(docs/stain-shift.md).", "",
           "| strength | " + " | ".join(f"{s:g}" for s in strengths) + " |", "| --- |" + " --- |" * len(strengths),
           "| mean ΔE (CIE76) | " + " | ".join(f"{de.get(strength_key(s), {}).get('mean', float('nan')):.1f}"
                                             for s in strengths) + " |",
           "| class-token displacement / inter-tile distance | "
           + " | ".join(f"{moved.get(strength_key(s), {}).get('relative', float('nan')):.3f}" for s in strengths) + " |",
           ""]
    for name in ok[0]["stain_shift"]["curves"]:
        label = f"baseline: {BASELINE_LABELS.get(name, name)}" if name in BASELINE_LABELS else name
        out += [f"### {label}", "", "| task / evaluation | " + " | ".join(f"strength {s:g}" for s in strengths) + " |",
                "| --- |" + " --- |" * len(strengths)]
        for c in ok:
            rows = c["stain_shift"]["curves"].get(name)
            if not rows:
                continue
            cells = []
            for r in rows:
                txt = value_ci(r[level], "bacc")
                if r["strength"]:
                    d = r["drop"][level]
                    txt += f"<br>drop {d['diff']:+.3f} {_ci(d['ci'])}"
                cells.append(txt)
            out.append(f"| {c['task']} / {c['evaluation']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_shift(path: Path, res: dict, level: str = "patient") -> bool:
    """One panel per task (its first evaluated cell): balanced accuracy against shift strength,
    one line per head and baseline. Returns False when no cell has a stain-shift curve."""
    first: dict = {}
    for c in res["cells"]:
        if c.get("stain_shift") and c["task"] not in first:
            first[c["task"]] = c
    if not first:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(first), figsize=(4.2 * len(first), 3.6), squeeze=False, sharey=True)
    for ax, (task, c) in zip(axes[0], first.items()):
        for name, rows in c["stain_shift"]["curves"].items():
            x = np.array([r["strength"] for r in rows])
            m = np.array([r[level]["bacc"] for r in rows])
            ci = np.array([r[level]["bacc_ci"] for r in rows], dtype=float)
            err = np.nan_to_num(np.abs(np.vstack([m - ci[:, 0], ci[:, 1] - m])))
            ax.errorbar(x, m, yerr=err, marker="o", capsize=3, label=name,
                        linestyle="--" if name in BASELINE_LABELS else "-")
        ax.axhline(1 / len(c["classes"]), color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{task} / {c['evaluation']}", fontsize=9)
        ax.set_xlabel("stain shift strength")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{level} balanced accuracy (95% CI)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(res: dict) -> str:
    """The whole results.md."""
    enc = res["encoder"]
    level = res.get("level", "patient")
    other = "tile" if level == "patient" else "patient"
    out = [f"# Benchmark: {res['task_file']['name']} on {res['dataset']} with {enc['spec']}", ""]
    if enc.get("random_init"):
        out += ["> **Encoder is RANDOMLY INITIALISED** (no pretrained weights): a pipeline check, not a model's "
                "performance.", ""]
    cap = res.get("tiles_per_patient_cap")
    out += [f"{res['n_tiles']} tiles, {res['n_patients']} patients"
            + (f" (at most {cap} tiles per patient: a subset)" if cap else "")
            + f"; cohorts: {res['cohorts']}; {res['n_boot']} bootstrap resamples over patients for every CI.", ""]
    out += ["## Tasks", ""] + _task_lines(res) + [""]
    reasons = _Reasons()
    for lvl in (level, other):
        out += [f"## {lvl.capitalize()} level" + (" (mean tile probability per patient)" if lvl == "patient" else ""), ""]
        for h in res["heads"]:
            out += [f"### {h}", "", head_table(res, h, lvl, reasons), ""]
        for comp in sorted({k for c in res["cells"] for k in c.get("comparisons", {})}):
            out += [f"### {comp} (paired bootstrap over patients, Δ balanced accuracy)", "", delta_table(res, comp, lvl), ""]
    shift = shift_tables(res, level)
    if shift:
        out += [f"## Stain shift ({level} level)", "", shift,
                "stain_shift.png: the first evaluation of each task.", ""]
    body = "\n".join(out)
    notes = [n for n in [footnotes(body)] if n]
    notes += reasons.lines()
    notes += ["AUROC of tasks with more than two classes: macro average of the one-vs-rest AUROCs.",
              "tile count: class-balanced logistic regression on log(tiles per patient), patient level only "
              "(bag size predicts MSI on this data: docs/benchmark.md)."]
    warn = [f"- {c['task']} / {c['evaluation']}: {w}" for c in res["cells"] for w in c.get("warnings") or []]
    if warn:
        notes += ["", "Warnings:"] + warn
    t = res.get("timing_seconds", {})
    notes += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items())]
    return body + "\n".join(notes) + "\n"


def plot_delta_heatmap(path: Path, res: dict, comparison: str = "attention-minus-linear", level: str = "patient") -> bool:
    """Heatmap of a paired Δ balanced accuracy, tasks x evaluations.

    Each cell is annotated with Δ and its 95 % CI; a ``*`` marks a CI that excludes 0,
    grey cells were skipped. Returns False (nothing drawn) when no cell has the comparison.
    """
    evals, cells, tasks = _evals(res), _cells(res), list(res["tasks"])
    D = np.full((len(tasks), len(evals)), np.nan)
    txt = [["skipped"] * len(evals) for _ in tasks]
    for i, t in enumerate(tasks):
        for j, e in enumerate(evals):
            d = (cells.get((t, e)) or {}).get("comparisons", {}).get(comparison, {}).get(level)
            if d is None:
                continue
            D[i, j] = d["diff"]
            lo, hi = d["ci"]
            ci_ok = lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi))
            sig = "*" if ci_ok and (lo > 0 or hi < 0) else ""
            txt[i][j] = f"{d['diff']:+.3f}{sig}\n" + (f"[{lo:+.3f}, {hi:+.3f}]" if ci_ok else "no CI")
    if np.isnan(D).all():
        return False
    plt = _plt()
    lim = max(0.05, float(np.nanmax(np.abs(D))))
    fig, ax = plt.subplots(figsize=(1.7 * len(evals) + 2.5, 0.9 * len(tasks) + 1.8))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(D), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(evals)):
            dark = np.isfinite(D[i, j]) and abs(D[i, j]) > 0.6 * lim  # deep red / blue: white text reads
            ax.text(j, i, txt[i][j], ha="center", va="center", fontsize=7.5, color="white" if dark else "black")
    ax.set_xticks(range(len(evals)), evals, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    fig.colorbar(im, ax=ax, label=f"Δ balanced accuracy ({comparison})")
    ax.set_title(f"{comparison}, {level} level: Δ [95% CI]; * CI excludes 0; grey: skipped", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_forest(path: Path, res: dict, task: str, level: str = "patient") -> None:
    """Forest plot of one task: balanced accuracy [95 % CI] of every head and baseline per evaluation.

    The dashed line is chance (1 / number of classes); skipped cells are labelled.
    """
    plt = _plt()
    evals, cells = _evals(res), _cells(res)
    preds = [("heads", h, h) for h in res["heads"]] + [
        ("baselines", b, BASELINE_LABELS.get(b, b)) for b in res.get("baselines", [])]
    fig, ax = plt.subplots(figsize=(10, 0.2 * len(evals) * max(2, len(preds)) + 1.4))
    cmap = plt.get_cmap("tab10")
    step = 0.8 / max(1, len(preds))
    for k, (kind, key, label) in enumerate(preds):
        ys, xs, lo, hi = [], [], [], []
        for j, e in enumerate(evals):
            c = cells.get((task, e))
            m = ((c or {}).get(kind, {}).get(key) or {}).get(level)
            if m is None or m.get("bacc") is None or (isinstance(m["bacc"], float) and math.isnan(m["bacc"])):
                continue
            ci = m["bacc_ci"]
            ok = ci[0] is not None and not math.isnan(ci[0])
            ys.append(j - 0.4 + (k + 0.5) * step)  # y is inverted: first predictor on top
            xs.append(m["bacc"])
            lo.append(m["bacc"] - ci[0] if ok else 0)
            hi.append(ci[1] - m["bacc"] if ok else 0)
        style = "o" if kind == "heads" else "s"
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt=style, color=cmap(k % 10), ms=4, capsize=2, lw=1,
                    label=label if kind == "heads" else f"baseline: {label}", mfc="white" if kind != "heads" else None)
    for j, e in enumerate(evals):
        c = cells.get((task, e))
        if c is not None and c["status"] != "ok":
            ax.text(0.02, j, "skipped: " + c["reason"][:70], transform=ax.get_yaxis_transform(), fontsize=6.5,
                    va="center", color="grey")
    C = len(res["tasks"][task]["classes"])
    ax.axvline(1 / C, ls="--", c="grey", lw=0.8)
    ax.set_yticks(range(len(evals)), evals, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"balanced accuracy, {level} level [95% CI] (dashed: chance 1/{C})")
    ax.set_title(f"{task}: every predictor on the same splits", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def forest_filename(task: str) -> str:
    """``forest_<task>.png`` with characters outside [A-Za-z0-9_-] replaced by ``_``."""
    return "forest_" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in task) + ".png"


def write_outputs(out: Path, res: dict) -> None:
    """results.json, results.md, delta_heatmap.png (when attention and linear ran) and the forest plots."""
    level = res.get("level", "patient")
    figures = []
    for comp in sorted({k for c in res["cells"] for k in c.get("comparisons", {})}):
        name = "delta_heatmap.png" if comp == "attention-minus-linear" else f"delta_heatmap_{comp}.png"
        if plot_delta_heatmap(out / name, res, comp, level):
            figures.append(name)
    for task in res["tasks"]:
        plot_forest(out / forest_filename(task), res, task, level)
        figures.append(forest_filename(task))
    if plot_shift(out / "stain_shift.png", res, level):
        figures.append("stain_shift.png")
    res["figures"] = figures
    write_json(out / "results.json", res)
    (out / "results.md").write_text(markdown(res))
