"""Benchmarks of `jwth benchmark`, printed as ratios measured in one run.

    python benchmarks/bench_benchmark.py [--encoder SPEC] [--tiles-per-patient 2] [--n-boot 200]

1. wall time of the four-task benchmark (tasks/tcga_crc.yaml, all cohort settings)
   / wall time of a one-task probe (MSI, pooled 5-fold), same encoder, same tiles,
   both with a cold cache                                              (target <= 1.3)
2. colour-baseline extraction throughput (tiles/s) / the encoder's, same tiles, cold
3. the same wall-time ratio restricted to the pooled setting (four tasks, one cohort
   setting each), which isolates the cost of more tasks from that of more cells

Both runs compute the same baselines (majority, colour, tile count). Runs on
``tcga_crc_msi`` from the data root, capped at ``--tiles-per-patient`` tiles of each
patient (all 284 patients kept) so that it fits a small CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import yaml

from jwth.encoders import DEFAULT_ENCODER
from jwth.eval.benchmark import BenchmarkConfig, benchmark_run
from jwth.eval.probe import ProbeConfig
from jwth.eval.run import RunConfig, probe_run
from jwth.eval.tasks import task_file_path
from jwth.eval.train import HeadTrainConfig
from jwth.settings import dataset_dir


def _subset(data: Path, per_patient: int, folder: Path) -> Path:
    """A labels.csv (absolute paths) with at most ``per_patient`` tiles per patient, plus patients.csv."""
    import pandas as pd

    from jwth.eval.benchmark import cap_tiles

    df = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    df = df[cap_tiles(df, per_patient)].copy()
    df["path"] = [str(data / p) for p in df["path"]]
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / "labels.csv", index=False)
    (folder / "patients.csv").write_text((data / "patients.csv").read_text())
    return folder


def _extract_rate(res: dict, n_tiles: int) -> float:
    return n_tiles / max(res["timing_seconds"]["extract"], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=DEFAULT_ENCODER)
    ap.add_argument("--tiles-per-patient", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--heads", default="linear,attention")
    a = ap.parse_args()
    probe_cfg = ProbeConfig(heads=a.heads.split(","), n_boot=a.n_boot, train=HeadTrainConfig(epochs=a.epochs))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _subset(dataset_dir("tcga_crc_msi"), a.tiles_per_patient, tmp / "data")
        # 1. one-task probe, cold cache
        t0 = time.perf_counter()
        pr = probe_run(RunConfig(data=str(data), encoder=a.encoder, out=str(tmp / "probe"), num_workers=0,
                                 probe=dataclasses.replace(probe_cfg)), quiet=True)
        probe_s = time.perf_counter() - t0
        n = pr["n_tiles"]
        # 2. four-task benchmark, cold cache (its own cache folder)
        t0 = time.perf_counter()
        br = benchmark_run(BenchmarkConfig(data=str(data), tasks="tcga_crc", encoder=a.encoder, out=str(tmp / "bench"),
                                           num_workers=0, probe=dataclasses.replace(probe_cfg)), quiet=True)
        bench_s = time.perf_counter() - t0
        # 3. four tasks, pooled setting only, cold cache
        doc = yaml.safe_load(task_file_path("tcga_crc").read_text())
        doc["evaluations"] = [{"name": "pooled", "pooled": True}]
        (tmp / "pooled.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
        t0 = time.perf_counter()
        benchmark_run(BenchmarkConfig(data=str(data), tasks=str(tmp / "pooled.yaml"), encoder=a.encoder,
                                      out=str(tmp / "pooled"), num_workers=0, probe=dataclasses.replace(probe_cfg)),
                      quiet=True)
        pooled_s = time.perf_counter() - t0
        # colour throughput: the benchmark's colour cache was built cold, on the same tiles
        colour_rate = n / max(br["timing_seconds"]["colour_baseline_features"], 1e-9)
        enc_rate = _extract_rate(pr, n)
    cells = len(br["cells"])
    print(f"encoder {a.encoder}; {n} tiles ({a.tiles_per_patient} per patient), n_boot {a.n_boot}, epochs {a.epochs}")
    print("| ratio | measured | target |\n| --- | --- | --- |")
    print(f"| four-task benchmark ({cells} cells) / one-task probe, cold cache | {bench_s / probe_s:.2f} "
          f"({bench_s:.0f} s vs {probe_s:.0f} s) | <= 1.3 |")
    print(f"| four tasks, pooled only / one-task probe, cold cache | {pooled_s / probe_s:.2f} "
          f"({pooled_s:.0f} s vs {probe_s:.0f} s) | — |")
    print(f"| colour-baseline throughput / encoder extraction throughput | {colour_rate / enc_rate:.2f} "
          f"({colour_rate:.1f} vs {enc_rate:.1f} tiles/s, incl. tile decoding) | — |")


if __name__ == "__main__":
    main()
