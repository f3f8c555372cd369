"""`jwth benchmark`: biomarkers x cohorts on one token cache, with trivial baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jwth.cli.app import app
from jwth.cli.probe import EPOCHS_OPT, PATIENCE_OPT, _HEADS_HELP, _fail, head_token_precision
from jwth.cli.probe import (
    BATCH_SIZE_OPT, DEVICE_OPT, N_BOOT_OPT, PATIENT_COL_OPT, PRECISION_OPT, SEED_OPT, SITE_COL_OPT, SKIP_BAD_OPT,
    STAIN_SHIFT_OPT, STAIN_SHIFT_PER_OPT, STAIN_SHIFT_SEED_OPT, WORKERS_OPT, _PATH_COL_HELP,
)


@app.command()
def benchmark(
    data: Path = typer.Option(..., "--data", help="Tile data set folder (with labels.csv)."),
    tasks: str = typer.Option(..., "--tasks", help="Task file (YAML, docs/benchmark.md) or a shipped one: tcga_crc."),
    encoder: str = typer.Option(None, "--encoder", help="Encoder spec (default: the project's default; baseline:colour works too)."),
    out: Path = typer.Option(..., "--out", help="Run folder for results, config and figures."),
    heads: str = typer.Option("linear,attention", help=_HEADS_HELP),
    baselines: str = typer.Option("majority,colour,tile-count", help="Trivial baselines scored on the same splits ('none' to skip)."),
    folds: int = typer.Option(5, help="k for patient k-fold cells (lowered per cell to the rarest class's patients)."),
    level: str = typer.Option("patient", help="Level of the first tables and of the figures: patient or tile."),
    tiles_per_patient: Optional[int] = typer.Option(None, help="Keep at most this many tiles per patient (seeded): a cheaper subset."),
    cache: Optional[Path] = typer.Option(None, help="Token cache folder (default <out>/cache)."),
    labels: str = typer.Option("labels.csv", help="Label file inside --data."),
    path_col: str = typer.Option("path", help=_PATH_COL_HELP),
    label_col: str = typer.Option("label", help="labels.csv label column (read and checked; tasks name their own columns)."),
    patient_col: str = PATIENT_COL_OPT,
    site_col: Optional[str] = SITE_COL_OPT,
    epochs: int = EPOCHS_OPT,
    patience: int = PATIENCE_OPT,
    n_boot: int = N_BOOT_OPT,
    seed: int = SEED_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    num_workers: int = WORKERS_OPT,
    device: str = DEVICE_OPT,
    precision: str = PRECISION_OPT,
    skip_bad_tiles: bool = SKIP_BAD_OPT,
    stain_shift: Optional[str] = STAIN_SHIFT_OPT,
    stain_shift_per: str = STAIN_SHIFT_PER_OPT,
    stain_shift_seed: int = STAIN_SHIFT_SEED_OPT,
) -> None:
    """Every task of a task file x every cohort setting, one token cache, baselines in every table."""
    from jwth.encoders import DEFAULT_ENCODER
    from jwth.eval.baselines import parse_baselines
    from jwth.eval.benchmark import BenchmarkConfig, benchmark_run
    from jwth.eval.probe import ProbeConfig
    from jwth.eval.stain_shift import parse_strengths
    from jwth.eval.train import HeadTrainConfig
    from jwth.heads import parse_heads

    try:
        cfg = BenchmarkConfig(
            data=str(data), tasks=tasks, encoder=encoder or DEFAULT_ENCODER, out=str(out),
            cache=str(cache) if cache else None, labels=labels, path_col=path_col, label_col=label_col,
            patient_col=patient_col, site_col=site_col, tiles_per_patient=tiles_per_patient, level=level,
            device=device, precision=precision, batch_size=batch_size, num_workers=num_workers,
            skip_bad_tiles=skip_bad_tiles,
            probe=ProbeConfig(heads=parse_heads(heads), folds=folds, n_boot=n_boot, baselines=parse_baselines(baselines),
                              train=HeadTrainConfig(epochs=epochs, seed=seed, patience=patience,
                                                    token_precision=head_token_precision(precision)),
                              stain_shift=parse_strengths(stain_shift),
                              stain_shift_per=stain_shift_per, stain_shift_seed=stain_shift_seed),
        )
        res = benchmark_run(cfg)
    except KeyboardInterrupt:
        typer.secho("\ninterrupted: finished tiles are saved in the cache; rerun the same command to resume.", err=True)
        raise typer.Exit(code=130)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    from jwth.eval.benchmark_report import head_table, _Reasons

    reasons = _Reasons()
    for h in res["heads"]:
        typer.echo(f"\n{h} ({res['level']} level):\n" + head_table(res, h, res["level"], reasons).replace("<br>", " · "))
    for line in reasons.lines():
        typer.echo(line)
    from jwth.eval.benchmark_report import shift_tables

    shift = shift_tables(res, res["level"])
    if shift:
        typer.echo(f"\nstain shift ({res['level']} level):\n" + shift.replace("<br>", " · "))
    skipped = sum(c["status"] != "ok" for c in res["cells"])
    typer.echo(f"\n{len(res['cells']) - skipped} cells evaluated, {skipped} skipped; run folder: {out} "
               f"(results.md, results.json, {', '.join(res['figures'])})")
