"""`jwth pretrain`, `jwth posttrain`, `jwth diagnose`, `jwth augment-preview`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import typer

from jwth.cli.app import app


def _fail(msg: str) -> None:
    typer.echo(f"Error: {msg}", err=True)
    raise typer.Exit(2)


@app.command("pretrain")
def pretrain_cmd(
    data: Path = typer.Option(..., "--data", help="Folder of tiles (labels.csv with a path column, or images)."),
    out: Path = typer.Option(..., "--out", help="Run folder (resumed when it holds a checkpoint)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML merged over the default config."),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides, e.g. optim.batch_size=32"),
) -> None:
    """Self-supervised pretraining (DINO + iBOT + KoLeo, multi-crop, stain augmentation).

    Multi-process: `torchrun --nproc_per_node 2 -m jwth.ssl pretrain ...`; optim.batch_size is the global batch.
    """
    from jwth.ssl.config import ConfigError, load_config
    from jwth.ssl.train import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(config, overrides or [])
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        r = train(cfg, data, out)
    except (FileNotFoundError, ValueError) as e:  # no tiles, bad values, a resume with other settings
        _fail(str(e))
    _report(r)


def _report(r) -> None:
    """Print a run's outcome; a run stopped early says how to resume and exits non-zero."""
    if r.encoder_dir:
        typer.echo(f"{r.steps_done}/{r.total_steps} steps; final loss {r.final_loss}; encoder: {r.encoder_dir}")
    if r.monitor:
        m = r.monitor[-1]
        typer.echo(
            f"monitor (step {m['step']}, {m['n_tiles']} tiles): balanced accuracy k-NN / logreg — class token "
            f"{m['knn_bacc_cls']:.3f} / {m['logreg_bacc_cls']:.3f}, mean patch token {m['knn_bacc_patch']:.3f} / "
            f"{m['logreg_bacc_patch']:.3f} (all rows: {r.out_dir / 'monitor.csv'})"
        )
    for m in r.collapse[:3]:
        typer.echo(f"collapse warning: {m}", err=True)
    if r.stopped_by:
        typer.echo(f"Stopped early ({r.stopped_by}) after step {r.steps_done}: checkpoint saved; run the same "
                   "command again to resume.", err=True)  # fmt: skip
        raise typer.Exit(3 if r.stopped_by == "max_minutes" else 130)


@app.command("posttrain")
def posttrain_cmd(
    from_run: Path = typer.Option(..., "--from", help="A `jwth pretrain` run folder."),
    data: Path = typer.Option(..., "--data", help="Folder of tiles."),
    out: Path = typer.Option(..., "--out", help="Post-training run folder."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML merged over the run's config."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. posttrain.gram.loss_weight=2"),
) -> None:
    """Gram-anchored post-training (DINOv3) of a pretraining run."""
    from jwth.ssl.config import ConfigError
    from jwth.ssl.posttrain import posttrain

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        r = posttrain(from_run, data, out, overrides or [], config)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    _report(r)


@app.command("diagnose")
def diagnose_cmd(
    encoder: List[str] = typer.Option(..., "--encoder", help="Encoder spec; repeat to compare (before/after)."),
    data: Path = typer.Option(..., "--data", help="Folder of tiles."),
    out: Path = typer.Option(..., "--out", help="Output folder for metrics.json and PNGs."),
    n_tiles: int = typer.Option(32, help="Tiles used for the metrics."),
    n_show: int = typer.Option(6, help="Tiles shown in the PCA figure."),
    size: Optional[int] = typer.Option(None, help="Input size in px (default: the encoder's)."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="Display name per --encoder."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
) -> None:
    """Patch-token health: effective rank, pairwise cosine, Gram spectrum, PCA maps."""
    from jwth.diagnose import diagnose

    try:
        res = diagnose(encoder, data, out, n_tiles, n_show, size, label, device)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    for lab, m in res["encoders"].items():
        typer.echo(
            f"{lab}: effective rank {m['effective_rank_per_tile']:.2f}/tile ({m['effective_rank_pooled']:.1f} pooled), "
            f"mean cosine {m['mean_pairwise_cosine']:.3f}, Gram top-1 share {m['gram_top1_share']:.3f}"
        )
    typer.echo(f"wrote {out}/metrics.json, gram_spectrum.png, pca_maps.png")


@app.command("plot-losses")
def plot_losses_cmd(
    runs: List[Path] = typer.Argument(..., help="Run folders in training order (e.g. pretrain run, then posttrain run)."),
    out: Path = typer.Option(..., "--out", help="Output PNG."),
    smooth: int = typer.Option(20, help="Moving-average window in steps."),
    overlay: bool = typer.Option(False, "--overlay", help="Draw the runs over each other (pilots compared) instead of one after the other."),
) -> None:
    """Loss curves, schedules, collapse monitors and online-monitor metrics of pretraining /
    post-training runs as a PNG."""
    from jwth.ssl.curves import plot_losses

    try:
        plot_losses(list(runs), out, smooth=smooth, overlay=overlay)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out}")


@app.command("augment-preview")
def augment_preview_cmd(
    data: Path = typer.Option(..., "--data", help="Folder of tiles."),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    n_tiles: int = typer.Option(4, help="Tiles (rows)."),
    n_draws: int = typer.Option(5, help="Random draws per tile (columns after the original)."),
    strength: float = typer.Option(1.0, help="Multiplier of all augmentation ranges."),
    seed: int = typer.Option(0, help="Seed of the tile choice and the augmentation draws."),
) -> None:
    """Write a PNG grid of real tiles under several random stain augmentations."""
    from jwth.augment import preview_grid

    try:
        preview_grid(data, out, n_tiles, n_draws, strength, seed)
    except FileNotFoundError as e:
        _fail(str(e))
    typer.echo(f"wrote {out}")
