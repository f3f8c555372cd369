"""Paired comparison of two probe runs (e.g. two encoders) on the same tiles.

``jwth probe`` compares heads within one run; this compares the same head across two
runs -- a pretrained encoder against a random initialisation, or an encoder before and
after Gram post-training -- with a paired patient-level bootstrap: each resample draws
patients with replacement and scores both runs on the same draw, so the interval is
for the *difference* (Efron & Tibshirani 1993, ch. 16; the same procedure as the
head-vs-linear comparison in ``results.json``).

Both runs must hold out-of-fold predictions for the same tiles with the same labels
and patients (``predictions.csv`` of ``jwth probe`` / ``jwth demo``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from jwth.eval.metrics import aggregate_by_patient, metric, paired_bootstrap

__all__ = ["compare_runs", "read_predictions", "comparison_table"]

_KEYS = ["path", "label", "patient_id"]


def read_predictions(run_dir: str | Path) -> tuple[pd.DataFrame, dict, list[str]]:
    """Read ``predictions.csv`` and ``results.json`` of a probe run.

    Returns:
        (predictions sorted by path, results dict, class names).

    Raises:
        FileNotFoundError: the folder is not a finished probe run.
        ValueError: ``predictions.csv`` lacks the columns a probe run writes.
    """
    run = Path(run_dir)
    pred_file, res_file = run / "predictions.csv", run / "results.json"
    for f in (pred_file, res_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} not found: {run} is not a finished probe run. Pass the --out folder of a "
                "completed `jwth probe`, `jwth demo` or `jwth finetune`."
            )
    try:
        # identifiers and labels stay text (patient 001 is not 1, NA is a name); probabilities are numbers
        df = pd.read_csv(pred_file, dtype=str, keep_default_na=False)
        for c in [c for c in df.columns if c.startswith("prob_")]:
            df[c] = pd.to_numeric(df[c].replace("", "nan"))
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        raise ValueError(f"{pred_file} cannot be read ({e}); re-run the probe to rewrite it.") from e
    missing = [c for c in _KEYS if c not in df.columns]
    if missing:
        raise ValueError(f"{pred_file} lacks columns {missing}; was it written by `jwth probe`?")
    try:
        res = json.loads(res_file.read_text())
        classes = [str(c) for c in res["classes"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{res_file} is not a probe result (no readable 'classes': {e}); re-run the probe.") from e
    return df.sort_values("path", kind="stable").reset_index(drop=True), res, classes


def _heads(df: pd.DataFrame, classes: list[str]) -> list[str]:
    """Heads with a probability column for every class."""
    suffix = f"_{classes[0]}"
    names = [c[len("prob_") : -len(suffix)] for c in df.columns if c.startswith("prob_") and c.endswith(suffix)]
    return [h for h in names if all(f"prob_{h}_{c}" in df.columns for c in classes)]


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    heads: list[str] | None = None,
    metric_name: str = "bacc",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap of ``metric(run_a) - metric(run_b)`` for each head, tile and patient level.

    Tile level resamples patients (all tiles of a drawn patient come along); patient level
    scores the mean tile probability per patient and resamples patients.

    Args:
        run_a, run_b: probe run folders (``predictions.csv`` + ``results.json``).
        heads: heads to compare (default: every head present in both runs).
        metric_name: ``bacc``, ``f1_macro`` or ``auroc``.
        n_boot: bootstrap resamples.
        seed: resampling seed.

    Returns:
        ``{"a", "b", "metric", "n_tiles", "n_patients", "heads": {head: {"tile": {"a", "b",
        "diff", "ci", "p_le_0", "n_boot"}, "patient": {...}}}}``; ``p_le_0`` is the share of
        resamples where run A did not beat run B.

    Raises:
        ValueError: the runs cover different tiles, disagree on a label or patient, use
            different classes, share no head, are the same folder, or ``n_boot < 10``;
            an unreadable ``predictions.csv`` / ``results.json`` (named in the message).
    """
    if n_boot < 10:
        raise ValueError(f"n_boot={n_boot}: a bootstrap interval needs at least 10 resamples (1000 is usual).")
    if Path(run_a).resolve() == Path(run_b).resolve():
        raise ValueError(f"Run A and run B are the same folder ({run_a}); compare two different runs.")
    da, ra, ca = read_predictions(run_a)
    db, rb, cb = read_predictions(run_b)
    if ca != cb:
        raise ValueError(f"Runs use different classes: {run_a} {ca} vs {run_b} {cb}.")
    if len(da) != len(db) or not (da["path"].to_numpy() == db["path"].to_numpy()).all():
        only_a = sorted(set(da["path"]) - set(db["path"]))[:3]
        only_b = sorted(set(db["path"]) - set(da["path"]))[:3]
        raise ValueError(
            f"The runs predicted different tiles ({len(da)} vs {len(db)}; only in A e.g. {only_a}, "
            f"only in B e.g. {only_b}). Compare runs made on the same data set, label file and split."
        )
    for col in ("label", "patient_id"):
        bad = (da[col].astype(str) != db[col].astype(str)).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"The runs disagree on {col} for {int(bad.sum())} tiles (first: {da['path'][i]}: "
                f"A {da[col][i]!r} vs B {db[col][i]!r}). Use the same label file for both runs."
            )
    common = [h for h in _heads(da, ca) if h in set(_heads(db, cb))]
    if heads:
        unknown = [h for h in heads if h not in common]
        if unknown:
            raise ValueError(f"Heads {unknown} are not in both runs; both have {common}.")
        common = list(heads)
    if not common:
        raise ValueError(f"The runs share no head ({_heads(da, ca)} vs {_heads(db, cb)}).")
    index = {c: i for i, c in enumerate(ca)}
    unknown_labels = sorted(set(da["label"].astype(str)) - set(index))
    if unknown_labels:
        raise ValueError(f"Labels {unknown_labels} in {run_a}/predictions.csv are not in classes {ca}.")
    y = da["label"].astype(str).map(index).to_numpy()
    patients = da["patient_id"].astype(str).to_numpy()
    out = {"a": str(run_a), "b": str(run_b), "encoder_a": ra.get("encoder", {}).get("spec"),
           "encoder_b": rb.get("encoder", {}).get("spec"), "metric": metric_name,
           "n_tiles": int(len(y)), "n_patients": int(len(np.unique(patients))), "heads": {}}
    for h in common:
        pa = da[[f"prob_{h}_{c}" for c in ca]].to_numpy(float)
        pb = db[[f"prob_{h}_{c}" for c in ca]].to_numpy(float)
        tile = paired_bootstrap(y, pa, pb, patients, metric_name, n_boot, seed)
        tile.update(a=metric(metric_name, y, pa), b=metric(metric_name, y, pb))
        ppa, yp, _ = aggregate_by_patient(pa, y, patients)
        ppb, _, _ = aggregate_by_patient(pb, y, patients)
        pat = paired_bootstrap(yp, ppa, ppb, None, metric_name, n_boot, seed)
        pat.update(a=metric(metric_name, yp, ppa), b=metric(metric_name, yp, ppb))
        out["heads"][h] = {"tile": tile, "patient": pat}
    return out


def comparison_table(cmp: dict) -> str:
    """Markdown table of :func:`compare_runs` output."""
    m = cmp["metric"]
    a, b = cmp["encoder_a"] or cmp["a"], cmp["encoder_b"] or cmp["b"]
    if a == b:  # same encoder (e.g. a fine-tuned run against a frozen probe): name the run folders
        a, b = cmp["a"], cmp["b"]
    lines = [
        f"A = {a}, B = {b} "
        f"({cmp['n_tiles']} tiles, {cmp['n_patients']} patients; paired bootstrap over patients)",
        "",
        f"| head | level | {m} A | {m} B | A - B [95% CI] | P(A <= B) |",
        "|---|---|---|---|---|---|",
    ]
    for h, r in cmp["heads"].items():
        for level in ("tile", "patient"):
            s = r[level]
            lines.append(
                f"| {h} | {level} | {s['a']:.3f} | {s['b']:.3f} | {s['diff']:+.3f} "
                f"[{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}] | {s['p_le_0']:.3f} |"
            )
    return "\n".join(lines)
