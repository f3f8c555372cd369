"""``jwth benchmark``: every task of a task file in every cohort setting, on one token cache.

The paper reports balanced accuracy over biomarkers x cohorts. Here the tokens of
every tile are extracted once per encoder (:func:`jwth.cache.extract.extract_tokens`)
and loaded once; each (task, evaluation) cell then runs the probe protocol of
:func:`jwth.eval.probe.run_probe` on its own tiles and splits:

- ``pooled`` / ``within <cohort>``: patient-level stratified k-fold; k is lowered to
  the number of patients of the rarest class when that is smaller (recorded), and a
  cell whose rarest class has fewer than 3 patients is skipped with the reason;
- ``train <a>, test <b>``: one split, train on cohort a, test on cohort b;
- ``test_sites``: one split, the listed sites held out (all cohorts).

A cell that cannot be evaluated (too few patients of a class, a side with one class)
is recorded as skipped with the reason; it never stops the other cells. Tiles without
a label for a task are left out of that task only and counted.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import jwth
from jwth.eval.run import RunConfig
from jwth.eval.splits import LeakError, assert_no_leak, inner_split, patient_folds, site_split
from jwth.eval.tasks import (
    Evaluation,
    TaskFile,
    TaskFileError,
    TaskLabels,
    load_task_file,
    read_patient_table,
    resolve_task,
    task_file_path,
    tile_cohorts,
)


@dataclass
class BenchmarkConfig(RunConfig):
    """The resolved configuration of ``jwth benchmark`` (saved as config.yaml).

    The fields of ``jwth probe``'s :class:`jwth.eval.run.RunConfig` (``probe.split`` and
    ``probe.test_sites`` are unused: the task file's evaluations define the splits), plus
    the task file, an optional cap on tiles per patient, and the level of the first tables.
    """

    tasks: str = "tcga_crc"
    tiles_per_patient: int | None = None
    level: str = "patient"


class CellSkip(Exception):
    """A (task, evaluation) cell that cannot be evaluated; the message says why."""


def _per_class_patients(y: np.ndarray, patients: np.ndarray, idx: np.ndarray, classes: list[str]) -> dict:
    return {c: len(set(patients[idx][y[idx] == i])) for i, c in enumerate(classes)}


def cell_splits(
    ev: Evaluation, y: np.ndarray, patients: np.ndarray, sites: np.ndarray, cohorts: np.ndarray,
    classes: list[str], folds: int, seed: int,
) -> tuple[list, dict]:
    """Outer and inner splits of one cell, as tile indices into the full arrays.

    Args:
        ev: the evaluation (cohort setting).
        y: class index per tile (T,), -1 for tiles without a label in this task.
        patients, sites, cohorts: per tile (T,) (cohort None where unknown).
        folds: k for k-fold settings (lowered to the rarest class's patient count).

    Returns:
        (list of (train_idx, test_idx, fit_idx, val_idx), info dict with ``folds``,
        ``n_patients`` / ``n_tiles`` per side and a ``note`` when k was lowered).

    Raises:
        CellSkip: too few patients of a class, a side without two classes, no tiles.
        jwth.eval.splits.LeakError: a patient on both sides (e.g. in two cohorts).
    """
    lab = y >= 0
    info: dict = {}
    if ev.kind in ("pooled", "within"):
        idx = np.flatnonzero(lab & ((cohorts == ev.cohort) if ev.kind == "within" else True))
        if len(idx) == 0:
            raise CellSkip("no labelled tiles in this cohort")
        per = _per_class_patients(y, patients, idx, classes)
        few = min(per.values())
        if few < 3:
            raise CellSkip(f"patients per class {per}: k-fold needs >= 3 patients of each class "
                           "(2 to train and choose lr / weight decay, 1 to test)")
        k = min(folds, few)
        if k < folds:
            info["note"] = f"{k}-fold instead of {folds}-fold: the rarest class has {few} patients ({per})"
        try:
            outer = [(idx[tr], idx[te]) for tr, te in patient_folds(y[idx], patients[idx], k, seed, classes)]
        except ValueError as e:
            raise CellSkip(str(e)) from e
        info["folds"] = k
    else:
        if ev.kind == "cross":
            idx = np.flatnonzero(lab & np.isin(cohorts, [ev.train, ev.test]))
            side, test = cohorts, [ev.test]
        else:
            idx = np.flatnonzero(lab)
            side, test = sites, ev.test_sites
        try:
            tr, te = site_split(y[idx], patients[idx], side[idx], test)[0]
        except LeakError:
            raise
        except ValueError as e:
            raise CellSkip(str(e).replace("--test-sites", "other test sites")) from e
        outer = [(idx[tr], idx[te])]
        info["folds"] = 1
    out = []
    for k, (tr, te) in enumerate(outer):
        assert_no_leak(patients, tr, te)
        try:
            fit, val = inner_split(y, patients, tr, seed=seed + k, class_names=classes)
        except ValueError as e:
            raise CellSkip(str(e)) from e
        out.append((tr, te, fit, val))
    test_all = np.concatenate([s[1] for s in outer])
    info["n_tiles"] = int(len(idx))
    info["n_patients"] = int(len(set(patients[idx])))
    if ev.kind in ("cross", "sites"):
        info["train"] = {"tiles": int(len(outer[0][0])), "patients": _per_class_patients(y, patients, outer[0][0], classes)}
        info["test"] = {"tiles": int(len(test_all)), "patients": _per_class_patients(y, patients, test_all, classes)}
    return out, info


def _check_sites(tf: TaskFile, sites: np.ndarray) -> None:
    known = set(sites.tolist())
    for ev in tf.evaluations:
        unknown = sorted(set(ev.test_sites) - known)
        if unknown:
            raise TaskFileError(f"{tf.path}: evaluation {ev.name!r}: test sites {unknown} are not in the data "
                                f"(sites: {sorted(known)}).")


def cap_tiles(df: pd.DataFrame, per_patient: int, seed: int = 0) -> np.ndarray:
    """Mask keeping at most ``per_patient`` tiles of each patient (a seeded random choice)."""
    order = df.sample(frac=1.0, random_state=seed)
    keep = order.groupby("patient_id", sort=False).head(per_patient).index
    return df.index.isin(keep)


def _prepare(cfg: BenchmarkConfig):
    """Read labels, task file and patient table; resolve every task (fails before extraction)."""
    from jwth.data.tiles import read_labels

    tf = load_task_file(task_file_path(cfg.tasks))
    patient_col = None if (cfg.patient_col or "").lower() in ("", "none") else cfg.patient_col
    table = read_labels(cfg.data, cfg.labels, cfg.path_col, cfg.label_col, patient_col, cfg.site_col,
                        check_files=not cfg.skip_bad_tiles)
    if cfg.tiles_per_patient:
        table = table.subset(cap_tiles(table.df, cfg.tiles_per_patient, cfg.probe.train.seed))
    raw = pd.read_csv(table.label_file, dtype=str, keep_default_na=False)
    raw.index = raw[cfg.path_col].str.strip()
    tile_cols = raw.loc[table.df["path"]].reset_index(drop=True)
    patients = read_patient_table(cfg.data, tf)
    pid = table.df["patient_id"]
    tasks = [resolve_task(t, tf, tile_cols, patients, pid) for t in tf.tasks]
    cohorts = tile_cohorts(tf, tile_cols, patients, pid)
    _check_sites(tf, table.df["site"].to_numpy())
    return tf, table, tasks, cohorts


def _cell_record(task: TaskLabels, ev: Evaluation) -> dict:
    return {"task": task.task.name, "evaluation": ev.name, "kind": ev.kind,
            "setting": {k: v for k, v in asdict(ev).items() if v and k not in ("name", "kind")}}


def run_cells(cache, cfg: BenchmarkConfig, tf: TaskFile, tasks: list[TaskLabels], rows: np.ndarray,
              tiles: pd.DataFrame, cohorts: np.ndarray, colour_cls, quiet: bool = False, shifted=None) -> list[dict]:
    """Evaluate every (task, evaluation) cell on the loaded cache.

    Args:
        rows: for each cache row, its row in the label table the tasks were resolved on.
        tiles: the label table in cache row order (path, label, patient_id, site).
        cohorts: cohort per label-table row.
        shifted: a :class:`jwth.eval.stain_shift.ShiftedTokens` holding every cache row, or
            None; each cell then also carries its stain-shift curve.

    Returns:
        One dict per cell: task, evaluation, kind, setting, status (``ok`` / ``skipped``),
        reason, split info, and the probe's heads / baselines / comparisons / warnings.
    """
    from jwth.eval.probe import load_features, run_probe
    from jwth.heads import token_input

    kinds = {token_input(h) for h in cfg.probe.heads} - {None}
    if kinds and not cache.has_patches:
        raise ValueError(f"Heads {cfg.probe.heads} need patch tokens but cache {cache.folder} has none.")
    from jwth.eval.train import resolve_token_dtype

    feats = load_features(cache, kinds, normalized_dtype=resolve_token_dtype(cfg.probe.train.token_precision)
                          if "normalized" in kinds else torch.float32)
    patients, sites = tiles["patient_id"].to_numpy(), tiles["site"].to_numpy()
    coh = np.array(["" if c is None else str(c) for c in cohorts[rows]], dtype=object)
    cells = []
    for task in tasks:
        label = task.label[rows]
        lookup = {c: i for i, c in enumerate(task.classes)}
        y = np.array([lookup.get(v, -1) if v is not None else -1 for v in label], dtype=np.int64)
        task_tiles = tiles.assign(label=label)
        for ev in tf.evaluations:
            rec = _cell_record(task, ev)
            t0 = time.time()
            try:
                splits, info = cell_splits(ev, y, patients, sites, coh, task.classes, cfg.probe.folds, cfg.probe.train.seed)
            except CellSkip as e:
                rec.update(status="skipped", reason=str(e))
                cells.append(rec)
                if not quiet:
                    print(f"  {task.task.name} / {ev.name}: skipped ({e})")
                continue
            po = run_probe(cache, cfg.probe, quiet=True, tiles=task_tiles, classes=task.classes, feats=feats,
                           splits=splits, colour_cls=colour_cls, shifted=shifted)
            r = po.results
            rec.update(status="ok", **info, classes=task.classes,
                       **{k: r[k] for k in ("heads", "baselines", "comparisons", "warnings", "stain_shift") if k in r},
                       seconds=round(time.time() - t0, 2))
            for h in rec["heads"].values():
                h.pop("folds", None)
            cells.append(rec)
            if not quiet:
                lin = r["heads"].get(cfg.probe.heads[0], {}).get(cfg.level, {})
                print(f"  {task.task.name} / {ev.name}: {cfg.probe.heads[0]} {cfg.level} balanced accuracy "
                      f"{lin.get('bacc', float('nan')):.3f} ({info['n_patients']} patients, {rec['seconds']:.0f} s)")
    return cells


def benchmark_run(cfg: BenchmarkConfig, quiet: bool = False) -> dict:
    """Run ``jwth benchmark`` end to end and write the run folder.

    Writes into ``cfg.out``: ``config.yaml``, ``results.json`` (schema in
    docs/benchmark.md), ``results.md``, ``delta_heatmap.png`` and ``forest_<task>.png`` (and
    ``stain_shift.png`` with ``probe.stain_shift``).
    The cache defaults to ``<out>/cache``; the colour baseline's to ``<cache>/baseline-colour``.

    Returns:
        The results dict.

    Raises:
        TaskFileError / ValueError / FileNotFoundError: bad task file, labels or options,
            before any token is computed.
    """
    from jwth.cache.extract import extract_tokens
    from jwth.device import dtype_name, resolve_device, resolve_precision
    from jwth.encoders import load_encoder
    from jwth.eval import benchmark_report as br
    from jwth.eval.baselines import colour_features
    from jwth.heads import parse_heads

    t_start = time.time()
    parse_heads(cfg.probe.heads)
    from jwth.eval.run import check_run_options, write_run_config
    from jwth.eval.stain_shift import check_shift_keys, remove_stale_figures

    check_run_options(cfg.probe, cfg.batch_size, cfg.num_workers, cfg.precision)  # fail fast, before any tile
    if cfg.level not in ("patient", "tile"):
        raise ValueError(f"--level {cfg.level!r}: choose patient or tile.")
    tf, table, tasks, cohorts = _prepare(cfg)
    if cfg.probe.stain_shift:
        check_shift_keys(table.df, cfg.probe.stain_shift_per)
    device = resolve_device(cfg.device)
    encoder = load_encoder(cfg.encoder, device=device)
    if encoder.random_init and not quiet:
        print(f"NOTE: encoder {cfg.encoder} is RANDOMLY INITIALISED (no pretrained weights).")
    out = Path(cfg.out)
    cache_dir = Path(cfg.cache) if cfg.cache else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cache = extract_tokens(encoder, table, cache_dir, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                           precision=cfg.precision, skip_bad_tiles=cfg.skip_bad_tiles, quiet=quiet)
    timing = {"extract": round(time.time() - t0, 2)}
    resolved = {
        "jwth_version": jwth.__version__, "torch_version": str(torch.__version__), "platform": platform.platform(),
        **asdict(cfg), "task_file": str(tf.path), "device": str(device),
        "autocast": dtype_name(resolve_precision(device, cfg.precision)),
        "cache": str(cache_dir), "encoder_info": encoder.describe(),
    }
    try:
        t0 = time.time()
        colour = None
        if "colour" in cfg.probe.baselines:
            colour = colour_features(table, cache, cache_dir / "baseline-colour", max(cfg.batch_size, 64),
                                     cfg.num_workers, quiet)
        timing["colour_baseline_features"] = round(time.time() - t0, 2)
        pos = {p: i for i, p in enumerate(table.df["path"])}
        rows = np.array([pos[p] for p in cache.tiles["path"]])
        tiles = table.df.iloc[rows].reset_index(drop=True)
        shifted = None
        if cfg.probe.stain_shift:
            from jwth.eval.stain_shift import ShiftedTokens
            from jwth.heads import token_input

            t0 = time.time()
            shifted = ShiftedTokens(
                encoder, table, cache, cache_dir / "stain-shift", cfg.probe.stain_shift, cfg.probe.stain_shift_per,
                cfg.probe.stain_shift_seed, {token_input(h) for h in cfg.probe.heads} - {None},
                colour=colour is not None, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                precision=cfg.precision, quiet=quiet,
            )
            shifted.get(np.arange(cache.n_tiles), colour)  # every cell's test tiles, extracted once
            timing["stain_shift_extract"] = round(time.time() - t0, 2)
        t0 = time.time()
        cells = run_cells(cache, cfg, tf, tasks, rows, tiles, cohorts, colour, quiet, shifted)
        timing["cells"] = round(time.time() - t0, 2)
        res = {
            "dataset": table.root.name,
            "data": str(cfg.data),
            "task_file": {"name": tf.name, "path": str(tf.path)},
            "encoder": encoder.describe(),
            "heads": list(cfg.probe.heads),
            "baselines": list(cfg.probe.baselines),
            "level": cfg.level,
            "n_boot": cfg.probe.n_boot,
            "n_tiles": int(cache.n_tiles),
            "n_patients": int(tiles["patient_id"].nunique()),
            "tiles_per_patient_cap": cfg.tiles_per_patient,
            "tile_checks": cache.manifest.get("tile_checks", {}),
            "tasks": {t.task.name: {"column": t.task.column, "classes": t.classes, "class_values": t.task.classes,
                                    "positive": t.positive, **t.counts} for t in tasks},
            "cohorts": {str(k): int(v) for k, v in pd.Series(cohorts[rows]).fillna("(none)").value_counts().items()},
            "evaluations": [asdict(e) for e in tf.evaluations],
            "cells": cells,
        }
    finally:
        cache.close()
    timing["total"] = round(time.time() - t_start, 2)
    res["timing_seconds"] = timing
    write_run_config(out, resolved, BENCHMARK_FILES, quiet, kind="benchmark")  # every output now, at the end
    if not cfg.probe.stain_shift:
        remove_stale_figures(out)
    br.write_outputs(out, res)
    return res


#: the files ``jwth benchmark`` writes into its run folder (moved together when a run is replaced)
BENCHMARK_FILES = ("config.yaml", "results.json", "results.md", "delta_heatmap*.png", "forest_*.png",
                   "stain_shift.png")


__all__ = ["BenchmarkConfig", "CellSkip", "benchmark_run", "cell_splits", "run_cells"]
