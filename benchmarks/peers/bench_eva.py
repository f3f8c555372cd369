"""A whole cold `jwth probe` run against kaiko eva's offline linear probe, timed in one run.

    pip install 'kaiko-eva[vision]'   # optional: without it the script says so and exits 2
    python benchmarks/peers/bench_eva.py [--tiles-per-patient 5] [--data DIR]

Same tiles, encoder and machine on both sides: a seeded subset of ``tcga_crc_msi`` with at
most ``--tiles-per-patient`` tiles of every patient (``jwth.eval.benchmark.cap_tiles``; 5
keeps all 284 patients, ~1,200 tiles; 0 = every tile), encoded by timm
``vit_small_patch16_224`` with a random init from the same seed (the script checks that
both sides hold the same weights), 224 px, each side at its own default precision (jwth:
bf16 autocast where this CPU runs it faster, ``--jwth-precision fp32`` to match eva; eva: fp32).

1. jwth: ``jwth.eval.run.probe_run`` (what ``jwth probe`` runs, as
   ``benchmarks/bench_probe.py`` times it) with its defaults: linear + attention heads,
   5-fold patient-level CV with early stopping on an inner split, 1,000 bootstrap resamples,
   baselines, report files; the token cache in a fresh temporary folder (cold).
2. eva (``kaiko-eva``): its offline patch-level classification workflow, ``eva
   predict_fit``, through its Python API (``Interface().predict`` then ``Interface().fit``,
   the two steps of ``predict_fit``, timed apart), built as eva's patch-level configs
   (``configs/vision/pathology/offline/classification``) build it:

   - embed: ``Trainer.predict`` over a ``train`` and a ``val`` dataset of the tiles (a small
     ``VisionDataset`` over the label table, below) with eva's ``ResizeAndCrop`` (224 px, the
     encoder's mean / std), batches of 64, 4 loader workers; the
     ``ClassificationEmbeddingsWriter`` callback runs the backbone (eva's timm wrapper
     ``TimmModel("vit_small_patch16_224", pretrained=False, model_kwargs={"num_classes": 0})``:
     the CLS token, 384-d, fp32) and writes one ``.pt`` per tile plus ``manifest.csv``;
   - fit: ``n_runs=5`` runs on the same split (eva's default; eva has no k-fold CV), each a
     ``torch.nn.Linear(384, 1)`` head (``BCEWithLogitsLoss``; ``Linear(384, C)`` and
     cross-entropy for C > 2 classes; as in ``eva predict_fit`` the head is built once, during
     predict, so the runs share its init and differ in batch order) trained on
     ``EmbeddingsClassificationDataset`` (one ``.pt`` read per tile and epoch) with eva's
     documented patch-level protocol: AdamW, lr 3e-4, cosine schedule to 0 without warm-up,
     batch 256, 12,500 steps, early stopping after 20% of the maximum epochs without a
     better ``val/BinaryBalancedAccuracy`` (checked every epoch; ``--eva-patience`` sets
     it), the best checkpoint kept; then the validate stage with that checkpoint. Loader
     workers 4, TensorBoard logger and learning-rate monitor as in eva's configs; no
     progress bar.
   - the split: patient-level, seeded, 20% of each class's patients in ``val`` (one fold's
     share of jwth's 5-fold CV); eva monitors, stops and reports on ``val``.

Each side runs in its own fresh (spawned) process; its clock starts after the imports and
stops when its run returns. Prints a Markdown table of the phases' wall seconds and
jwth time / eva time (issue target: <= 0.2). Development runs: ``--max-patients``,
``--jwth-epochs``, ``--n-boot``, ``--eva-max-steps`` and ``--eva-runs`` shrink the work.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

TIMM_MODEL = "vit_small_patch16_224"
INSTALL = "pip install 'kaiko-eva[vision]'"

try:  # eva's loader workers unpickle the dataset by name: the class has to live at module level
    import torch
    from eva.vision.data.datasets import VisionDataset as _EvaVisionDataset
except ImportError:
    _EvaVisionDataset = None
else:

    class TileTable(_EvaVisionDataset):
        """eva dataset of the tiles in a CSV (``path``, ``label``, ``split``; paths under ``root``)."""

        def __init__(self, root: str, table: str, split: str, classes: list[str], transforms=None) -> None:
            super().__init__(transforms=transforms)
            self._root, self._table, self._split, self._classes = root, table, split, classes
            self._rows = pd.DataFrame()

        @property
        def classes(self) -> list[str]:
            return self._classes

        @property
        def class_to_idx(self) -> dict[str, int]:
            return {c: i for i, c in enumerate(self._classes)}

        def configure(self) -> None:
            rows = pd.read_csv(self._table, dtype=str, keep_default_na=False)
            self._rows = rows[rows["split"] == self._split].reset_index(drop=True)

        def filename(self, index: int) -> str:  # where the embedding goes: flat and unique
            return self._rows.at[index, "name"]

        def load_data(self, index: int):
            from eva.vision.utils import io

            return io.read_image_as_tensor(os.path.join(self._root, self._rows.at[index, "path"]))

        def load_target(self, index: int):
            return torch.tensor(self.class_to_idx[self._rows.at[index, "label"]], dtype=torch.long)

        def __len__(self) -> int:
            return len(self._rows)


def _tiles(data: Path, per_patient: int, max_patients: int, seed: int) -> pd.DataFrame:
    """The label table's tiles kept on both sides: ``cap_tiles`` per patient, optionally fewer patients."""
    from jwth.eval.benchmark import cap_tiles

    df = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    if per_patient:
        df = df[cap_tiles(df, per_patient, seed)]
    if max_patients:  # development: half of the patients from each class, seeded
        rng = np.random.default_rng(seed)
        labels = sorted(df["label"].unique())
        keep = []
        for i, lab in enumerate(labels):
            pats = np.sort(df.loc[df["label"] == lab, "patient_id"].unique())
            n = max_patients // len(labels) + (i < max_patients % len(labels))
            keep += list(rng.permutation(pats)[:n])
        df = df[df["patient_id"].isin(keep)]
    return df.reset_index(drop=True)


def _patient_split(df: pd.DataFrame, val_share: float, seed: int) -> np.ndarray:
    """``train`` / ``val`` per tile: ``val_share`` of each class's patients (at least one) in ``val``."""
    rng = np.random.default_rng(seed)
    val = []
    for lab in sorted(df["label"].unique()):
        pats = rng.permutation(np.sort(df.loc[df["label"] == lab, "patient_id"].unique()))
        val += list(pats[: max(1, round(val_share * len(pats)))])
    return np.where(df["patient_id"].isin(val), "val", "train")


def _child(side: str, out: str, kwargs: dict) -> None:
    """Run one side in this fresh process: its output to ``out``.log, its result to ``out``.json."""
    with open(out + ".log", "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        res = {"jwth": _jwth_side, "eva": _eva_side}[side](**kwargs)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except BaseException:
        traceback.print_exc()
        raise
    Path(out + ".json").write_text(json.dumps(res))


def _in_child(side: str, tmp: Path, **kwargs) -> dict:
    out = str(tmp / side)
    p = mp.get_context("spawn").Process(target=_child, args=(side, out, kwargs))
    p.start()
    p.join()
    if p.exitcode != 0 or not Path(out + ".json").is_file():
        tail = "".join(Path(out + ".log").read_text(errors="replace").splitlines(True)[-40:])
        raise SystemExit(f"the {side} side failed (exit {p.exitcode}); the end of its output:\n{tail}")
    return json.loads(Path(out + ".json").read_text())


def _jwth_side(data: str, out: str, spec: str, precision: str, epochs: int, n_boot: int, seed: int) -> dict:
    from jwth.eval.probe import ProbeConfig
    from jwth.eval.run import RunConfig, probe_run
    from jwth.eval.train import HeadTrainConfig

    train = HeadTrainConfig(seed=seed, **({"epochs": epochs} if epochs else {}))
    cfg = RunConfig(data=data, encoder=spec, out=out, precision=precision,
                    probe=ProbeConfig(heads=["linear", "attention"], n_boot=n_boot, train=train))
    t0 = time.perf_counter()
    r = probe_run(cfg, quiet=True)
    wall = time.perf_counter() - t0
    ts = r["timing_seconds"]
    autocast = yaml.safe_load((Path(out) / "config.yaml").read_text()).get("autocast")
    return {"wall": wall, "extract": ts["extract"], "heads": ts["total"], "n_tiles": r["n_tiles"],
            "n_patients": r["n_patients"], "autocast": autocast,
            "bacc": {h: r["heads"][h]["tile"]["bacc"] for h in r["heads"]}}


def _eva_side(root: str, table: str, out: str, spec: str, classes: list[str], n_train: int, runs: int,
              max_steps: int, patience: int, workers: int, seed: int) -> dict:
    import eva
    import lightning.pytorch as pl
    from eva.vision.data.transforms.common import ResizeAndCrop
    from eva.vision.models.wrappers import TimmModel
    from lightning.pytorch import callbacks as cb
    from lightning.pytorch.loggers import TensorBoardLogger
    from torchvision.transforms import v2

    from jwth.encoders import load_encoder
    from jwth.encoders.base import state_dict_hash

    enc = load_encoder(spec)  # the weights and input statistics to match (not timed)
    binary = len(classes) == 2
    monitor = "val/BinaryBalancedAccuracy" if binary else "val/MulticlassAccuracy"  # macro: balanced
    if not patience:  # eva's protocol: 20% of the maximum number of epochs
        patience = math.ceil(0.2 * math.ceil(max_steps / math.ceil(n_train / 256)))
    emb, logs = os.path.join(out, "embeddings"), os.path.join(out, "logs")

    t0 = time.perf_counter()
    pl.seed_everything(seed, workers=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = TimmModel(TIMM_MODEL, pretrained=False, model_kwargs={"num_classes": 0})
    same = state_dict_hash(backbone.model) == state_dict_hash(enc.model)
    trainer = eva.Trainer(
        default_root_dir=logs, n_runs=runs, max_steps=max_steps, checkpoint_type="best",
        enable_progress_bar=False,
        callbacks=[
            cb.LearningRateMonitor(logging_interval="epoch"),
            cb.ModelCheckpoint(filename="best", save_last=False, save_top_k=1, monitor=monitor, mode="max"),
            cb.EarlyStopping(min_delta=0, patience=patience, monitor=monitor, mode="max"),
            eva.callbacks.ClassificationEmbeddingsWriter(
                output_dir=emb, dataloader_idx_map={0: "train", 1: "val"}, backbone=backbone, overwrite=False),
        ],
        logger=[TensorBoardLogger(save_dir=logs, name="")],
    )
    metrics = eva.metrics.BinaryClassificationMetrics() if binary else \
        eva.metrics.MulticlassClassificationMetrics(num_classes=len(classes))
    model = eva.HeadModule(
        head={"class_path": "torch.nn.Linear",
              "init_args": {"in_features": enc.embed_dim, "out_features": 1 if binary else len(classes)}},
        criterion=torch.nn.BCEWithLogitsLoss() if binary else torch.nn.CrossEntropyLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=max_steps, eta_min=0.0),
        metrics=eva.metrics.MetricsSchema(common=[eva.metrics.AverageLoss(), metrics]),
    )
    tf = ResizeAndCrop(size=enc.input_size, mean=enc.mean, std=enc.std)
    target_tf = {"target_transforms": v2.ToDtype(torch.float32)} if binary else {}
    emb_args = {"root": emb, "manifest_file": "manifest.csv", **target_tf}
    data = eva.DataModule(
        datasets=eva.DatasetsSchema(
            train=eva.datasets.EmbeddingsClassificationDataset(split="train", **emb_args),
            val=eva.datasets.EmbeddingsClassificationDataset(split="val", **emb_args),
            predict=[TileTable(root, table, s, classes, transforms=tf) for s in ("train", "val")],
        ),
        dataloaders=eva.DataloadersSchema(
            train=eva.DataLoader(batch_size=256, num_workers=workers, shuffle=True),
            val=eva.DataLoader(batch_size=256, num_workers=workers),
            predict=eva.DataLoader(batch_size=64, num_workers=workers),
        ),
    )
    t1 = time.perf_counter()
    eva.Interface().predict(trainer=trainer, model=model, data=data, enable_clone=True)
    t2 = time.perf_counter()
    eva.Interface().fit(trainer=trainer, model=model, data=data)
    t3 = time.perf_counter()
    val = {}
    for f in Path(logs).glob("*/results.json"):
        for k, v in json.loads(f.read_text())["metrics"]["val"][0].items():
            val[k] = v.get("mean") if isinstance(v, dict) else v
    return {"wall": t3 - t0, "setup": t1 - t0, "embed": t2 - t1, "fit": t3 - t2, "same_weights": same,
            "patience": patience, "bacc": val.get(monitor)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="tile folder with labels.csv (default: tcga_crc_msi, data root)")
    ap.add_argument("--tiles-per-patient", type=int, default=5, help="at most K tiles per patient (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="tile subset, encoder init, eva split and runs")
    ap.add_argument("--eva-workers", type=int, default=4, help="eva's loader workers (its configs: 4)")
    ap.add_argument("--eva-patience", type=int, default=0,
                    help="eva's early-stopping patience in epochs (0: 20%% of the maximum epochs, as eva does)")
    ap.add_argument("--jwth-precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="jwth's extraction precision (auto: bf16 where this CPU runs it faster; eva runs fp32)")
    dev = ap.add_argument_group("development (smaller runs; the defaults are the benchmark)")
    dev.add_argument("--max-patients", type=int, default=0, help="keep N patients, half of each class (0: all)")
    dev.add_argument("--jwth-epochs", type=int, default=0, help="jwth head epochs (0: its default)")
    dev.add_argument("--n-boot", type=int, default=1000, help="jwth bootstrap resamples")
    dev.add_argument("--eva-max-steps", type=int, default=12500, help="eva head training steps")
    dev.add_argument("--eva-runs", type=int, default=5, help="eva runs (n_runs)")
    a = ap.parse_args()
    if _EvaVisionDataset is None:
        print(f"kaiko eva is not installed: `{INSTALL}` to time it against jwth.", file=sys.stderr)
        raise SystemExit(2)
    from importlib.metadata import version

    from jwth.settings import dataset_dir

    data = Path(a.data) if a.data else dataset_dir("tcga_crc_msi")
    spec = f"timm:{TIMM_MODEL}?seed={a.seed}"
    df = _tiles(data, a.tiles_per_patient, a.max_patients, a.seed)
    classes = sorted(df["label"].unique())
    df["split"] = _patient_split(df, 0.2, a.seed)
    df["name"] = [f"{i:06d}-{Path(p).name}" for i, p in enumerate(df["path"])]
    for p in df["path"]:  # the same page cache for both sides: read every tile once beforehand
        (data / p).read_bytes()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), kaiko-eva {version('kaiko-eva')}, "
          f"jwth {version('jwth')}")
    print(f"tiles: {len(df)} of {df['patient_id'].nunique()} patients ({a.tiles_per_patient or 'all'} per patient), "
          f"classes {classes}; encoder timm {TIMM_MODEL}, random init, seed {a.seed}; eva split "
          f"{(df['split'] == 'train').sum()} train / {(df['split'] == 'val').sum()} val tiles", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "data").mkdir()
        jt = df[["path", "label", "patient_id"]].assign(path=[str(data / p) for p in df["path"]])
        jt.to_csv(tmp / "data" / "labels.csv", index=False)
        df.to_csv(tmp / "eva_tiles.csv", index=False)
        j = _in_child("jwth", tmp, data=str(tmp / "data"), out=str(tmp / "jwth_run"), spec=spec,
                      precision=a.jwth_precision, epochs=a.jwth_epochs, n_boot=a.n_boot, seed=a.seed)
        e = _in_child("eva", tmp, root=str(data), table=str(tmp / "eva_tiles.csv"), out=str(tmp / "eva_run"),
                      spec=spec, classes=classes, n_train=int((df["split"] == "train").sum()), runs=a.eva_runs,
                      max_steps=a.eva_max_steps, patience=a.eva_patience, workers=a.eva_workers, seed=a.seed)
    if not e["same_weights"]:
        print("WARNING: the two sides' encoder weights differ", file=sys.stderr)
    j_rest = j["wall"] - j["extract"] - j["heads"]
    print(f"\njwth: {j['n_tiles']} tiles, {j['n_patients']} patients, autocast {j['autocast']}; eva: early-stopping "
          f"patience {e['patience']} epochs, same encoder weights: {'yes' if e['same_weights'] else 'NO'}\n")
    print("| side | phase | wall s |")
    print("| --- | --- | --- |")
    print(f"| jwth probe | extraction (tokens to the cache) | {j['extract']:.1f} |")
    print(f"| jwth probe | heads (5 folds, linear + attention), {a.n_boot:,} bootstraps, baselines "
          f"| {j['heads']:.1f} |")
    print("| jwth probe | the rest: encoder and table load, colour-baseline features, report files and figures "
          f"| {j_rest:.1f} |")
    print(f"| jwth probe | **total** (peak RSS {j['peak_rss_mib']:.0f} MiB) | **{j['wall']:.1f}** |")
    print(f"| eva | setup (trainer, backbone, data) | {e['setup']:.1f} |")
    print(f"| eva | embed (`predict`, embeddings writer) | {e['embed']:.1f} |")
    print(f"| eva | fit ({a.eva_runs} runs of the linear probe, {a.eva_max_steps:,} max steps, validate) "
          f"| {e['fit']:.1f} |")
    print(f"| eva | **total** (peak RSS {e['peak_rss_mib']:.0f} MiB) | **{e['wall']:.1f}** |")
    print(f"| jwth / eva | total time ratio (issue target: <= 0.2) | **{j['wall'] / e['wall']:.3f}** |")
    print(f"\njwth time / eva time = {j['wall'] / e['wall']:.3f} (issue target: <= 0.2)")
    jb = ", ".join(f"{h} {v:.3f}" for h, v in j["bacc"].items())
    eb = f"{e['bacc']:.3f}" if e["bacc"] is not None else "n/a"
    print(f"sanity, not comparable (different protocols): jwth tile BACC {jb} (5-fold CV); "
          f"eva val balanced accuracy {eb} (mean of {a.eva_runs} runs)")


if __name__ == "__main__":
    main()
