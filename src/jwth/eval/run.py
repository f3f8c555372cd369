"""One probe run end to end: tiles -> token cache -> heads -> metrics -> run folder."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

import jwth
from jwth.cache.extract import extract_tokens
from jwth.data.labels import describe_classes
from jwth.data.tiles import TileTable, read_labels
from jwth.device import dtype_name, resolve_device, resolve_precision
from jwth.encoders import load_encoder
from jwth.eval import report
from jwth.eval.baselines import colour_features
from jwth.eval.probe import ProbeConfig, make_splits, run_probe
from jwth.heads import parse_heads


@dataclass
class RunConfig:
    """The full resolved configuration of ``jwth probe`` (saved as config.yaml)."""

    data: str
    encoder: str
    out: str
    cache: str | None = None
    labels: str = "labels.csv"
    path_col: str = "path"
    label_col: str = "label"
    patient_col: str | None = "patient_id"
    site_col: str | None = None
    classes: list[str] | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    num_workers: int = 1
    skip_bad_tiles: bool = False
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def positive_index(classes: list[str], tiles, positive: str | None) -> int:
    """Index of the ROC positive class: ``positive``, else the class with the fewest
    patients (ties: the first class in sorted order).

    Raises:
        ValueError: ``positive`` is not one of ``classes``.
    """
    if positive is not None:
        if positive not in classes:
            raise ValueError(f"--positive {positive!r} is not a class; classes: {classes}.")
        return classes.index(positive)
    per_class = tiles.groupby("label")["patient_id"].nunique().reindex(classes, fill_value=0).to_numpy()
    return int(np.argmin(per_class))


def load_table(cfg: RunConfig) -> TileTable:
    """Read and check the label file of ``cfg`` and check that its split is possible.

    Shared by ``jwth probe`` and ``jwth finetune`` so both stop on bad input with the same
    errors, before any tile is encoded.

    Raises:
        ValueError / FileNotFoundError: see :func:`jwth.data.tiles.read_labels` and
            :func:`jwth.eval.probe.make_splits`.
    """
    table = read_labels(
        cfg.data, cfg.labels, cfg.path_col, cfg.label_col,
        None if (cfg.patient_col or "").lower() in ("", "none") else cfg.patient_col,
        cfg.site_col, cfg.classes,
        check_files=not cfg.skip_bad_tiles,  # with --skip-bad-tiles a missing file is skipped and recorded
    )
    # an impossible split fails here, before any token is computed, naming the label file it came from
    try:
        make_splits(table.y, table.df["patient_id"].to_numpy(), table.df["site"].to_numpy(), cfg.probe,
                    table.classes)
    except ValueError as e:
        raise ValueError(f"{table.label_file}: {e}") from None
    return table


def resolved_config(cfg, device: torch.device, encoder, table: TileTable) -> dict:
    """The configuration as run (saved as config.yaml): options, versions, device, encoder, data notes."""
    return {
        "jwth_version": jwth.__version__,
        "torch_version": str(torch.__version__),
        "platform": platform.platform(),
        **_asdict(cfg),
        # the columns and classes this run used, not the options' defaults
        "patient_col": table.notes.get("patient_col"),
        "site_col": table.notes.get("site_col"),
        "classes": table.classes,
        "device": str(device),
        "autocast": dtype_name(resolve_precision(device, cfg.precision)),
        "encoder_info": encoder.describe(),
        "data_notes": table.notes,
    }


#: options that do not change a run's results (left out when two runs' settings are compared)
_NOT_RESULTS = ("out", "cache", "batch_size", "num_workers", "device")
#: the files a probe run writes into its folder (moved together when a run is replaced)
RUN_FILES = ("config.yaml", "results.json", "results.md", "predictions.csv", "confusion.png", "roc.png",
             "attention.png", "attention_learned-query.png", "stain_shift.png", "stain_shift_tiles.png")


def archive_previous_run(out: Path, resolved: dict, files: tuple[str, ...] = RUN_FILES) -> Path | None:
    """Move a finished run in ``out`` made with other settings to ``out/replaced-<UTC time>/``.

    Re-running the same settings into the same folder simply rewrites it; a run with other
    settings (labels, encoder, heads, protocol, data) never overwrites finished results, and
    none of its files (e.g. an attention figure of a head this run does not train) is left
    beside the new ones.

    Args:
        files: the run's files: names or glob patterns (``forest_*.png``) inside ``out``
            (default: a probe run's).

    Returns:
        The folder the previous run was moved to, or None (nothing finished there, or the
        same settings).
    """
    import shutil
    from datetime import datetime, timezone

    old_cfg = out / "config.yaml"
    if not (out / "results.json").is_file():
        return None
    try:
        old = yaml.safe_load(old_cfg.read_text()) or {}
    except (OSError, yaml.YAMLError):
        old = {}
    new = yaml.safe_load(yaml.safe_dump(resolved, sort_keys=False))  # as it will read back
    keys = (set(old) | set(new)) - set(_NOT_RESULTS) - {"jwth_version", "torch_version", "platform"}
    if all(old.get(k) == new.get(k) for k in keys):
        return None
    dest = out / f"replaced-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in files:
        for f in sorted(out.glob(pattern)):
            if f.is_file():
                shutil.move(str(f), dest / f.name)
    return dest


def write_run_config(out: Path, resolved: dict, files: tuple[str, ...] = RUN_FILES, quiet: bool = False,
                     kind: str = "run") -> None:
    """Write ``config.yaml`` of a finished run, first moving a finished run of other settings
    aside (:func:`archive_previous_run`; said unless ``quiet``). Called only once a run's
    results exist, so an interrupted run leaves the folder as it was."""
    moved = archive_previous_run(out, resolved, files)
    if moved is not None and not quiet:
        print(f"{out} held a finished {kind} with other settings: its files were moved to {moved}")
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))


def check_run_options(probe, batch_size: int, num_workers: int, precision: str = "auto") -> None:
    """Every option check of ``probe`` / ``benchmark`` that needs no tile: stain shift, head
    training, extraction and bootstrap (``probe`` is a :class:`jwth.eval.probe.ProbeConfig`).

    Raises:
        ValueError: naming the option and what it accepts.
    """
    from jwth.eval.stain_shift import check_shift_options

    check_shift_options(probe)
    probe.train.check()
    check_extraction_options(batch_size, num_workers, precision, probe.n_boot)


def check_extraction_options(batch_size: int, num_workers: int, precision: str = "auto", n_boot: int = 1000) -> None:
    """Fail before any tile is read on extraction (and bootstrap) options no run can use.

    Raises:
        ValueError: naming the option and what it accepts.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--precision {precision!r}: choose auto, fp32, bf16 or fp16 (CUDA only).")
    if n_boot < 10:
        raise ValueError(f"--n-boot {n_boot}: confidence intervals need at least 10 bootstrap resamples (1,000 is "
                         "the default).")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: give a positive number of tiles per extraction batch.")
    if num_workers < 0:
        raise ValueError(f"--num-workers {num_workers}: give 0 (decode tiles in the main process) or more.")


def probe_run(cfg: RunConfig, quiet: bool = False) -> dict:
    """Run ``jwth probe``: extract (or resume) the cache, train and score heads, write outputs.

    Writes into ``cfg.out``: ``config.yaml``, ``results.json``, ``results.md``,
    ``predictions.csv``, ``confusion.png``, ``roc.png``, ``attention.png`` (when an
    attention head ran), and with ``probe.stain_shift`` ``stain_shift.png`` and
    ``stain_shift_tiles.png``. The cache defaults to ``<out>/cache``; shifted tiles'
    caches go to ``<cache>/stain-shift/``.

    Returns:
        The results dict (also in results.json).

    Raises:
        ValueError / FileNotFoundError / jwth.data.tiles.TileError: bad data or options,
        before anything is written to the run folder.
    """
    t_start = time.time()
    parse_heads(cfg.probe.heads)  # fail fast on unknown heads
    check_run_options(cfg.probe, cfg.batch_size, cfg.num_workers, cfg.precision)  # fail fast, before any tile
    out = Path(cfg.out)
    table = load_table(cfg)
    if cfg.probe.stain_shift:
        from jwth.eval.stain_shift import check_shift_keys

        check_shift_keys(table.df, cfg.probe.stain_shift_per)
    pos = positive_index(table.classes, table.df, cfg.probe.positive_class)
    if not quiet:
        print(f"{table.label_file}: " + describe_classes(table.df["label"], table.df["patient_id"], table.classes)
              + f"; positive class for ROC: {table.classes[pos]}")
    device = resolve_device(cfg.device)
    encoder = load_encoder(cfg.encoder, device=device)
    if encoder.random_init and not quiet:
        print(
            f"NOTE: encoder {cfg.encoder} is RANDOMLY INITIALISED (no pretrained weights); "
            "results measure an untrained network."
        )
    cache_dir = Path(cfg.cache) if cfg.cache else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cache = extract_tokens(
        encoder, table, cache_dir, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        precision=cfg.precision, skip_bad_tiles=cfg.skip_bad_tiles, quiet=quiet,
    )
    extract_s = time.time() - t0
    resolved = resolved_config(cfg, device, encoder, table)
    resolved["cache"] = str(cache_dir)
    try:
        # labels, patients and sites from the current label file and options, aligned with the
        # cache rows (a cache holds tokens; it never decides how tiles are grouped)
        tiles = cache.tiles[["path"]].merge(table.df, on="path", how="left", validate="one_to_one")
        colour = None
        if "colour" in cfg.probe.baselines:
            colour = colour_features(table, cache, cache_dir / "baseline-colour", cfg.batch_size, cfg.num_workers, quiet)
        shifted = None
        if not cfg.probe.stain_shift:
            from jwth.eval.stain_shift import remove_stale_figures

            remove_stale_figures(out)
        else:
            from jwth.eval.stain_shift import ShiftedTokens
            from jwth.heads import token_input

            shifted = ShiftedTokens(
                encoder, table, cache, cache_dir / "stain-shift", cfg.probe.stain_shift, cfg.probe.stain_shift_per,
                cfg.probe.stain_shift_seed, {token_input(h) for h in cfg.probe.heads} - {None},
                colour=colour is not None, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                precision=cfg.precision, quiet=quiet,
            )
        po = run_probe(cache, cfg.probe, quiet=quiet, tiles=tiles, classes=table.classes, colour_cls=colour,
                       shifted=shifted)
        if shifted is not None:
            po.results["timing_seconds"]["stain_shift_extract"] = round(shifted.extract_seconds, 2)
        classes = po.results["classes"]
        res = {
            "dataset": table.root.name,
            "data": str(cfg.data),
            "encoder": encoder.describe(),
            "positive_class": classes[pos],
            "tile_checks": cache.manifest.get("tile_checks", {}),
            **po.results,
        }
        res["timing_seconds"]["extract"] = round(extract_s, 2)
        res["timing_seconds"]["wall"] = round(time.time() - t_start, 2)  # the run so far, as a user waits
        # all outputs are written now, at the end: an interrupted run leaves the folder as it was
        write_run_config(out, resolved, quiet=quiet)
        report.write_json(out / "results.json", res)
        report.write_markdown(out / "results.md", res)
        y = tiles["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
        m = po.test_mask
        report.write_predictions(out / "predictions.csv", tiles, classes, po.oof_prob, m)
        oof_t = {h: p[m] for h, p in po.oof_prob.items()}
        pats = tiles["patient_id"].to_numpy()[m]
        report.plot_confusion(out / "confusion.png", y[m], oof_t, pats, classes)
        report.plot_roc(out / "roc.png", y[m], oof_t, pats, classes, pos)
        if "stain_shift" in res:
            from jwth.eval.stain_shift import plot_shift_curves, plot_shift_examples

            plot_shift_curves(out / "stain_shift.png", {"": res["stain_shift"]}, chance=1 / len(classes))
            plot_shift_examples(out / "stain_shift_tiles.png", table.root, tiles[m], res["stain_shift"]["strengths"],
                                cfg.probe.stain_shift_per, cfg.probe.stain_shift_seed)
        for h in ("attention", "learned-query"):
            if h in po.attention:
                report.plot_attention(
                    out / ("attention.png" if h == "attention" else f"attention_{h}.png"),
                    table.root, tiles, po.attention[h], po.oof_prob[h], classes, cache.grid,
                )
    finally:
        cache.close()
    return res


def _asdict(cfg: RunConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


__all__ = ["RunConfig", "load_table", "positive_index", "probe_run", "resolved_config"]
