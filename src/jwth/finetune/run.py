"""One fine-tuning run end to end (``jwth finetune``): tiles -> encoder + head per fold -> metrics -> run folder.

Same splits (:func:`jwth.eval.probe.make_splits`), metrics and bootstrap CIs
(:func:`jwth.eval.probe.summarize`) and run-folder files as ``jwth probe``, so that
``jwth compare FINETUNE_RUN PROBE_RUN`` pairs a fine-tuned model with a frozen probe on
the same tiles. Per outer fold: a fresh copy of the encoder, trainable parameters set
by the method (:mod:`jwth.finetune.model`), training on the fit tiles with early stopping
on the inner patient-level validation split (:func:`jwth.finetune.train.fit`), then the
test tiles are predicted. Finished folds are saved under ``<out>/folds/`` and reused
by a rerun with the same configuration; they are never overwritten by another one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from jwth.data.tiles import check_tiles
from jwth.device import resolve_device
from jwth.encoders import load_encoder
from jwth.eval import report
from jwth.eval.metrics import aggregate_by_patient, classification_metrics
from jwth.eval.probe import make_splits, summarize
from jwth.eval.run import RunConfig, load_table, positive_index, resolved_config, write_run_config
from jwth.finetune.model import FinetuneModel, configure_trainable
from jwth.finetune.train import FinetuneConfig, TileImages, evaluate, fit
from jwth.progress import progress_bar

#: settings that do not change results (left out of the resume check)
_VOLATILE = {"out", "device", "num_workers", "cache", "eval_batch_size", "preload_bytes", "threads"}


@dataclass
class FinetuneRunConfig(RunConfig):
    """The resolved configuration of ``jwth finetune`` (saved as config.yaml).

    The data, split and bootstrap fields are those of :class:`jwth.eval.run.RunConfig`
    (``probe.heads`` is set to the fine-tuned head; ``cache`` is unused: the encoder
    changes, so there is no token cache).
    """

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _fingerprint(resolved: dict, paths: list[str]) -> dict:
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _VOLATILE}

    keep = {k: resolved[k] for k in ("data", "labels", "path_col", "label_col", "patient_col", "site_col",
                                     "classes", "skip_bad_tiles", "probe", "finetune", "encoder")}
    keep["weights_hash"] = resolved["encoder_info"]["weights_hash"]
    keep["tiles_sha256"] = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    return json.loads(json.dumps(strip(keep)))


def _check_resume(folds_dir: Path, fp: dict) -> None:
    """Refuse to mix finished folds of another configuration into this run (ValueError naming the keys)."""
    f = folds_dir / "fingerprint.json"
    if f.is_file() and any(folds_dir.glob("fold_*.json")):
        old = json.loads(f.read_text())
        diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
        if diff:
            raise ValueError(
                f"{folds_dir.parent} holds finished folds of another configuration (differs in {diff}); "
                "they are kept. Use another --out, or delete that folder to start over."
            )
    folds_dir.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(fp, indent=1))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _run_fold(k, split, base_encoder, images, y, patients, cfg, device, seed, classes, bar) -> tuple[dict, dict]:
    tr, te, fit_idx, val_idx = split
    ft = cfg.finetune
    t0 = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed + k)
    model = FinetuneModel(copy.deepcopy(base_encoder), ft.head, len(classes), ft.num_heads, ft.dropout)
    info = configure_trainable(model, ft.method, ft.last_blocks, ft.lora_rank, ft.lora_alpha, ft.lora_targets,
                               ft.lora_dropout)
    model.to(device)
    hist = fit(model, images, y, fit_idx, val_idx, ft, device, cfg.precision, seed + k, cfg.num_workers, bar.advance)
    t1 = time.time()
    p, a = evaluate(model, images, te, ft, device, cfg.precision, cfg.num_workers, keep_attention=True)
    infer_s = time.time() - t1
    mem, mem_kind = _peak_memory_mib(device)
    fm = classification_metrics(y[te], p)
    pp, yp, _ = aggregate_by_patient(p, y[te], patients[te])
    rec = {
        "fold": k, "n_test_tiles": int(len(te)), "n_test_patients": int(len(set(patients[te]))),
        "n_fit_tiles": int(len(fit_idx)), "n_val_tiles": int(len(val_idx)),
        "tile_bacc": fm["bacc"], "tile_auroc": fm["auroc"], "patient_bacc": classification_metrics(yp, pp)["bacc"],
        "lr": ft.lr, "encoder_lr": ft.resolved_encoder_lr(), "weight_decay": ft.weight_decay,
        **{k_: v for k_, v in hist.items() if k_ != "curve"}, "curve": hist["curve"],
        "trainable_params": info["trainable_params"], "total_params": info["total_params"],
        "infer_tiles_per_s": round(len(te) / max(infer_s, 1e-9), 2),
        "wall_seconds": round(time.time() - t0, 2), "peak_memory_mib": round(mem, 1), "peak_memory_kind": mem_kind,
    }
    arrays = {"test_idx": te, "prob": p, "attention": a if a is not None else np.zeros((0, 0), np.float32)}
    return rec, arrays


def finetune_run(cfg: FinetuneRunConfig, quiet: bool = False) -> dict:
    """Run ``jwth finetune``; writes the run folder and returns the results dict.

    Writes into ``cfg.out``: ``config.yaml``, ``results.json`` (the probe schema plus a
    ``finetune`` block: method, trainable parameters, wall time, peak memory, tiles/s,
    validation curves), ``results.md``, ``predictions.csv`` (``prob_<head>_<class>``),
    ``confusion.png``, ``roc.png``, ``curves.png`` (validation curve per fold),
    ``attention.png`` (attention head), and ``folds/`` (finished folds, reused on rerun).

    Raises:
        ValueError / FileNotFoundError / jwth.data.tiles.TileError: bad data or options
            (the same checks and messages as ``jwth probe``), before any training; a run
            folder holding finished folds of another configuration.
        RuntimeError: CUDA requested but absent, hub weights not available offline.
    """
    ft = cfg.finetune
    ft.check()
    cfg.probe.heads = [ft.head]
    if ft.threads:
        torch.set_num_threads(ft.threads)
    table = load_table(cfg)
    device = resolve_device(cfg.device)
    base = load_encoder(cfg.encoder, device="cpu")
    if base.random_init and not quiet:
        print(f"NOTE: encoder {cfg.encoder} is RANDOMLY INITIALISED (no pretrained weights); "
              "results measure an untrained network.")
    # the method's settings are checked on a throw-away copy before any tile is decoded
    info = configure_trainable(FinetuneModel(copy.deepcopy(base), ft.head, len(table.classes)), ft.method,
                               ft.last_blocks, ft.lora_rank, ft.lora_alpha, ft.lora_targets, ft.lora_dropout)
    with progress_bar("check tiles", total=len(table), unit="tiles", disable=quiet) as bar:
        table, tile_checks = check_tiles(table, base.input_size, skip_bad=cfg.skip_bad_tiles, progress=bar.advance)
    tiles = table.df
    y, patients, sites = table.y, tiles["patient_id"].to_numpy(), tiles["site"].to_numpy()
    splits = make_splits(y, patients, sites, cfg.probe, table.classes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolved_config(cfg, device, base, table)
    for unused in ("cache", "batch_size"):  # no token cache, no extraction batches
        resolved.pop(unused, None)
    resolved["probe"]["train"] = {"seed": cfg.probe.train.seed}  # the head-probe training settings do not apply
    folds_dir = out / "folds"
    _check_resume(folds_dir, _fingerprint(resolved, tiles["path"].tolist()))

    t_start = time.time()
    images = TileImages(table.root, tiles["path"].tolist(), base.input_size)
    with progress_bar("decode tiles", total=len(images), unit="tiles", disable=quiet) as bar:
        preloaded = images.preload(ft.preload_bytes, bar.advance)
    seed = cfg.probe.train.seed
    T, C = len(tiles), len(table.classes)
    grid = base.grid_for(base.input_size, base.input_size)
    oof = np.full((T, C), np.nan)
    attn = np.full((T, grid[0] * grid[1]), np.nan, dtype=np.float32)
    test_mask = np.zeros(T, dtype=bool)
    records = []
    for k, split in enumerate(splits):
        jf, nf = folds_dir / f"fold_{k}.json", folds_dir / f"fold_{k}.npz"
        if jf.is_file() and nf.is_file():
            rec, arrays = json.loads(jf.read_text()), dict(np.load(nf))
            if not quiet:
                print(f"fold {k}: finished earlier, reused from {nf}")
        else:
            total = ft.epochs * len(split[2])
            with progress_bar(f"{ft.method} fold {k + 1}/{len(splits)}", total=total, unit="tiles", disable=quiet) as bar:
                rec, arrays = _run_fold(k, split, base, images, y, patients, cfg, device, seed, table.classes, bar)
            _atomic_write(nf, lambda p: _savez(p, arrays))
            _atomic_write(jf, lambda p: report.write_json(p, rec))  # written last: marks the fold finished
        te = arrays["test_idx"].astype(np.int64)
        oof[te], test_mask[te] = arrays["prob"], True
        if arrays["attention"].size:
            attn[te] = arrays["attention"]
        records.append(rec)

    tested = np.flatnonzero(test_mask)
    head = ft.head
    s = summarize(y[tested], oof[tested], patients[tested], cfg.probe.n_boot, seed)
    s["folds"] = [{k_: v for k_, v in r.items() if k_ != "curve"} for r in records]
    fb = [r["tile_bacc"] for r in records]
    s["fold_tile_bacc_mean"], s["fold_tile_bacc_sd"] = float(np.mean(fb)), float(np.std(fb))
    s["train_seconds"] = round(sum(r["train_seconds"] for r in records), 2)
    classes = table.classes
    pos = positive_index(classes, tiles, cfg.probe.positive_class)
    mems = [r["peak_memory_mib"] for r in records]
    train_tiles, train_s = sum(r["train_tiles"] for r in records), sum(r["train_seconds"] for r in records)
    res = {
        "dataset": table.root.name, "data": str(cfg.data), "encoder": base.describe(),
        "positive_class": classes[pos], "tile_checks": tile_checks,
        "heads": {head: s}, "comparisons": {}, "classes": classes,
        "n_tiles": int(len(tested)), "n_patients": int(len(set(patients[tested]))),
        "n_sites": int(len(set(sites[tested]))),
        "split": {"kind": cfg.probe.split, "folds": len(splits), "test_sites": cfg.probe.test_sites},
        "finetune": {
            **info, "head": head, "augment": ft.augment, "device": str(device), "precision": cfg.precision,
            "wall_seconds": round(sum(r["wall_seconds"] for r in records), 2),
            "train_tiles_per_s": round(train_tiles / max(train_s, 1e-9), 2),
            "train_cpu_seconds": round(sum(r.get("train_cpu_seconds", 0.0) for r in records), 2),
            "infer_tiles_per_s": round(float(np.mean([r["infer_tiles_per_s"] for r in records])), 2),
            "peak_memory_mib": max(mems), "peak_memory_kind": records[0]["peak_memory_kind"],
            "preloaded_tiles": bool(preloaded),
            "curves": {str(r["fold"]): r["curve"] for r in records},
        },
        "timing_seconds": {"total": round(time.time() - t_start, 2)},
    }
    write_run_config(out, resolved, FINETUNE_FILES, quiet)  # the run's files now, at the end
    report.write_json(out / "results.json", res)
    write_markdown(out / "results.md", res)
    report.write_predictions(out / "predictions.csv", tiles, classes, {head: oof}, test_mask)
    m = test_mask
    report.plot_confusion(out / "confusion.png", y[m], {head: oof[m]}, patients[m], classes)
    report.plot_roc(out / "roc.png", y[m], {head: oof[m]}, patients[m], classes, pos)
    plot_curves(out / "curves.png", res["finetune"]["curves"], f"{ft.method} + {head} head")
    if head == "attention" and np.isfinite(attn[tested]).any():
        report.plot_attention(out / "attention.png", table.root, tiles, attn, oof, classes, grid)
    return res


#: the files ``jwth finetune`` writes into its run folder besides ``folds/`` (moved together when
#: a finished run with other settings is replaced)
FINETUNE_FILES = ("config.yaml", "results.json", "results.md", "predictions.csv", "confusion.png", "roc.png",
                  "curves.png", "attention.png")


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_markdown(path: Path, res: dict) -> None:
    """results.md of a fine-tuning run: the probe's metrics table and the cost of the run."""
    f = res["finetune"]
    enc = res["encoder"]
    warn = ("\n> **Encoder is RANDOMLY INITIALISED** (no pretrained weights): these numbers measure an "
            "untrained network at the start of fine-tuning.\n") if enc.get("random_init") else ""
    text = (
        f"# Fine-tune ({f['method']}, {f['head']} head): {res['dataset']} with {enc['spec']}\n{warn}\n"
        f"{res['n_tiles']} tiles, {res['n_patients']} patients, {res['n_sites']} sites; split: "
        f"{res['split']['kind']} ({res['split']['folds']} fold(s)); classes: {', '.join(res['classes'])}.\n\n"
        + report.results_table(res)
        + "\n\n| trainable / total parameters | wall time (s) | train tiles/s | inference tiles/s | peak memory (MiB) |\n"
        "| --- | --- | --- | --- | --- |\n"
        f"| {f['trainable_params']:,} / {f['total_params']:,} | {f['wall_seconds']:.0f} | {f['train_tiles_per_s']} | "
        f"{f['infer_tiles_per_s']} | {f['peak_memory_mib']:.0f} ({f['peak_memory_kind']}) |\n"
    )
    path.write_text(text)


def plot_curves(path: Path, curves: dict, title: str) -> None:
    """Validation balanced accuracy and losses per epoch, one line per fold; the restored epoch marked."""
    plt = report._plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, c in curves.items():
        ep = [r["epoch"] + 1 for r in c]
        bacc = [r["val_bacc"] for r in c]
        line, = axes[0].plot(ep, bacc, marker="o", label=f"fold {k}")
        best = int(np.nanargmax(np.where(np.isfinite(bacc), bacc, -np.inf))) if c else None
        if best is not None:
            axes[0].plot(ep[best], bacc[best], "*", ms=14, color=line.get_color())
        axes[1].plot(ep, [r["val_loss"] for r in c], marker="o", color=line.get_color(), label=f"fold {k} val")
        axes[1].plot(ep, [r["train_loss"] for r in c], ls="--", color=line.get_color(), label=f"fold {k} train")
    axes[0].set(xlabel="epoch", ylabel="validation balanced accuracy", title=f"{title} (★ best epoch)")
    axes[1].set(xlabel="epoch", ylabel="class-weighted cross-entropy", title="train (dashed) / validation loss")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["FinetuneRunConfig", "finetune_run", "plot_curves", "write_markdown"]
