"""`jwth extract`, `jwth probe`, `jwth demo`, `jwth compare`, `jwth encoders`, `jwth env`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from jwth.cli.app import app

DEMO_DATASET = "tcga_crc_msi"


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


_HEADS_HELP = "Comma-separated heads: linear, attention, mean, learned-query."
_ENCODER_HELP = ("Encoder spec (see `jwth encoders`). Default: timm:vit_small_patch16_224 with a RANDOM "
                 "initialisation (no pretrained weights are bundled), i.e. a pipeline check.")
_DEVICE_HELP = "Where the encoder runs: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
_PRECISION_HELP = ("Autocast precision of the encoder, and of the attention heads' products with the patch "
                   "tokens (heads train on CPU): auto (bf16 on CUDA; on CPU bf16 only where measured faster than "
                   "fp32, see `jwth env`), fp32, bf16, or fp16 (CUDA only; the heads then use auto).")


def head_token_precision(precision: str) -> str:
    """The heads' token precision (:attr:`jwth.eval.train.HeadTrainConfig.token_precision`) for
    ``--precision``: the same name, except fp16 (CUDA-only autocast), for which the heads,
    trained on CPU, choose themselves (auto)."""
    return "auto" if precision == "fp16" else precision
_WORKERS_HELP = "Tile-decoding worker processes (0 = decode in the main process)."
_PATH_COL_HELP = "Column of labels.csv with the tile paths (relative to --data)."
_LABEL_COL_HELP = "Column of labels.csv with the class labels."
_SEED_HELP = "Seed of the folds, the inner splits, head initialisation and the bootstrap."

# options shared by probe, benchmark, finetune and nuclei-alignment (one definition, one help text)
PATIENT_COL_OPT = typer.Option("patient_id", help="Patient column ('none': derive from TCGA barcodes or per tile).")
SITE_COL_OPT = typer.Option(None, help="Site column (default: site or tss).")
N_BOOT_OPT = typer.Option(1000, help="Bootstrap resamples for CIs.")
SEED_OPT = typer.Option(0, help=_SEED_HELP)
BATCH_SIZE_OPT = typer.Option(32, help="Extraction batch size.")
WORKERS_OPT = typer.Option(1, help=_WORKERS_HELP)
DEVICE_OPT = typer.Option("auto", help=_DEVICE_HELP)
EPOCHS_OPT = typer.Option(10, help="Head training epochs (at most, with early stopping).")
PATIENCE_OPT = typer.Option(
    3, help="Early stopping of the heads on the inner validation split: stop once the validation balanced "
    "accuracy has not improved for this many epochs, and refit on all training tiles for the best epoch count. "
    "0 = train all --epochs and choose lr / weight decay at the last epoch.")
PRECISION_OPT = typer.Option("auto", help=_PRECISION_HELP)
SKIP_BAD_OPT = typer.Option(False, help="Leave undecodable tiles out (recorded).")
STAIN_SHIFT_OPT = typer.Option(
    None, help="Test-time stain shift strengths, e.g. 0,0.5,1,2: the trained heads are re-scored on test tiles "
    "perturbed by jwth.augment at each strength (LAB+HSV+HED, ranges x strength; 0 = unshifted). Writes the "
    "balanced accuracy curve with CIs and drops (stain_shift.png).")
STAIN_SHIFT_PER_OPT = typer.Option(
    "tile", help="What shares one stain-shift draw: tile, patient, or site (one colour change per centre).")
STAIN_SHIFT_SEED_OPT = typer.Option(
    0, help="Seed of the stain-shift draws: each tile (patient, site) keeps its draw across encoders and reruns.")


def _csv(s: Optional[str]) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


@app.command()
def extract(
    data: Path = typer.Option(..., "--data", help="Tile data set folder (with labels.csv)."),
    encoder: str = typer.Option(None, "--encoder", help=_ENCODER_HELP),
    cache: Path = typer.Option(..., "--cache", help="Token cache folder (created or resumed)."),
    labels: str = typer.Option("labels.csv", help="Label file inside --data."),
    path_col: str = typer.Option("path", help=_PATH_COL_HELP),
    label_col: str = typer.Option("label", help=_LABEL_COL_HELP),
    patient_col: str = typer.Option("patient_id", help="Patient column ('none' to derive)."),
    batch_size: int = typer.Option(32, help="Tiles per forward pass."),
    num_workers: int = WORKERS_OPT,
    device: str = DEVICE_OPT,
    precision: str = PRECISION_OPT,
    no_patches: bool = typer.Option(False, "--no-patches", help="Store class/register tokens only."),
    skip_bad_tiles: bool = typer.Option(False, help="Leave undecodable tiles out (recorded in the manifest)."),
) -> None:
    """Extract class, register and patch tokens of every tile into a resumable fp16 HDF5 cache."""
    from jwth.cache.extract import extract_tokens
    from jwth.data.labels import describe_classes
    from jwth.data.tiles import read_labels
    from jwth.device import resolve_device
    from jwth.encoders import DEFAULT_ENCODER, load_encoder

    try:
        table = read_labels(data, labels, path_col, label_col, None if patient_col.lower() == "none" else patient_col,
                            check_files=not skip_bad_tiles)
        typer.echo(f"{table.label_file}: "
                   + describe_classes(table.df["label"], table.df["patient_id"], table.classes))
        enc = load_encoder(encoder or DEFAULT_ENCODER, device=resolve_device(device))
        c = extract_tokens(
            enc, table, cache, batch_size=batch_size, num_workers=num_workers, precision=precision,
            store_patches=not no_patches, skip_bad_tiles=skip_bad_tiles,
        )
    except KeyboardInterrupt:
        typer.secho(f"\ninterrupted: finished tiles are saved in {cache}; rerun the same command to resume.", err=True)
        raise typer.Exit(code=130)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    typer.echo(f"cache {cache}: {c.n_tiles} tiles, D={c.embed_dim}, grid={c.grid}, {c.nbytes_per_tile} bytes/tile")
    c.close()


def _probe(
    data: Path, encoder: str, out: Path, heads: str, split: str, folds: int, test_sites: Optional[str],
    cache: Optional[Path], labels: str, path_col: str, label_col: str, patient_col: str, site_col: Optional[str],
    positive: Optional[str], epochs: int, n_boot: int, seed: int, batch_size: int, num_workers: int,
    device: str, precision: str, skip_bad_tiles: bool, stain_shift: Optional[str] = None,
    stain_shift_per: str = "tile", stain_shift_seed: int = 0, patience: int = 3,
) -> dict:
    from jwth.eval.probe import ProbeConfig
    from jwth.eval.report import results_table
    from jwth.eval.run import RunConfig, probe_run
    from jwth.eval.stain_shift import parse_strengths
    from jwth.eval.train import HeadTrainConfig
    from jwth.heads import parse_heads

    cfg = RunConfig(
        data=str(data), encoder=encoder, out=str(out), cache=str(cache) if cache else None, labels=labels,
        path_col=path_col, label_col=label_col, patient_col=patient_col, site_col=site_col,
        device=device, precision=precision, batch_size=batch_size, num_workers=num_workers,
        skip_bad_tiles=skip_bad_tiles,
        probe=ProbeConfig(
            heads=parse_heads(heads), split=split, folds=folds, test_sites=_csv(test_sites),
            n_boot=n_boot, positive_class=positive, train=HeadTrainConfig(epochs=epochs, seed=seed, patience=patience,
                                                              token_precision=head_token_precision(precision)),
            stain_shift=parse_strengths(stain_shift), stain_shift_per=stain_shift_per,
            stain_shift_seed=stain_shift_seed,
        ),
    )
    res = probe_run(cfg)
    typer.echo("")
    typer.echo(results_table(res))
    if res.get("stain_shift"):
        from jwth.eval.stain_shift import shift_table

        typer.echo("\n" + shift_table(res["stain_shift"]))
    n_cls = len(res["classes"])
    typer.echo(f"\nchance level: balanced accuracy {1 / n_cls:.3f} ({n_cls} classes), AUROC 0.5; "
               f"ROC positive class {res['positive_class']}.")
    if res["encoder"]["random_init"]:
        typer.secho(
            f"\nNOTE: {encoder} is a RANDOMLY INITIALISED encoder (no pretrained weights): these numbers "
            "are a pipeline check of an untrained network, not a foundation model's performance.",
            fg=typer.colors.YELLOW,
        )
    skipped = (res.get("tile_checks") or {}).get("skipped") or []
    if skipped:
        shown = ", ".join(str(s_["path"]) for s_ in skipped[:5])
        typer.secho(f"\n{len(skipped)} tile(s) left out by --skip-bad-tiles (listed in results.json "
                    f"tile_checks.skipped): {shown}{' ...' if len(skipped) > 5 else ''}", fg=typer.colors.YELLOW)
    typer.echo(f"\nrun folder: {out} (results.json, results.md, config.yaml, predictions.csv, figures)")
    return res




@app.command()
def probe(
    data: Path = typer.Option(..., "--data", help="Tile data set folder (with labels.csv)."),
    encoder: str = typer.Option(None, "--encoder", help=_ENCODER_HELP),
    out: Path = typer.Option(..., "--out", help="Run folder for results, config and figures."),
    heads: str = typer.Option("linear,attention", help=_HEADS_HELP),
    split: str = typer.Option("patient", help="patient (stratified k-fold over patients) or site."),
    folds: int = typer.Option(5, help="k for patient k-fold."),
    test_sites: Optional[str] = typer.Option(None, help="With --split site: comma-separated test sites."),
    cache: Optional[Path] = typer.Option(None, help="Token cache folder (default <out>/cache)."),
    labels: str = typer.Option("labels.csv", help="Label file inside --data."),
    path_col: str = typer.Option("path", help=_PATH_COL_HELP),
    label_col: str = typer.Option("label", help=_LABEL_COL_HELP),
    patient_col: str = PATIENT_COL_OPT,
    site_col: Optional[str] = SITE_COL_OPT,
    positive: Optional[str] = typer.Option(
        None, help="Positive class of the ROC curve (default: the class with the fewest patients)."),
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
    """Linear probe vs JWTH attention pooling on a frozen encoder, with patient-level CV and CIs."""
    from jwth.encoders import DEFAULT_ENCODER

    try:
        _probe(data, encoder or DEFAULT_ENCODER, out, heads, split, folds, test_sites, cache, labels, path_col,
               label_col, patient_col, site_col, positive, epochs, n_boot, seed, batch_size, num_workers,
               device, precision, skip_bad_tiles, stain_shift, stain_shift_per, stain_shift_seed, patience)
    except KeyboardInterrupt:
        typer.secho(f"\ninterrupted: finished tiles are saved in the token cache ({cache or out / 'cache'}); "
                    "rerun the same command to resume.", err=True)
        raise typer.Exit(code=130)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run folder."),
    encoder: str = typer.Option(None, "--encoder", help=_ENCODER_HELP),
    heads: str = typer.Option("linear,attention", help=_HEADS_HELP + " The ablations add training time."),
    device: str = DEVICE_OPT,
) -> None:
    """The main job: probe MSI vs MSS on the bundled TCGA colorectal tiles and print the table."""
    from jwth.encoders import DEFAULT_ENCODER
    from jwth.settings import dataset_dir

    t0 = time.time()
    try:
        data = dataset_dir(DEMO_DATASET)
        spec = encoder or DEFAULT_ENCODER
        typer.echo(f"jwth demo: {DEMO_DATASET} ({data}) with encoder {spec}")
        _probe(data, spec, out, heads, "patient", 5, None, None, "labels.csv", "path", "label",
               "patient_id", None, "MSIMUT", 10, 1000, 0, 32, 1, device, "auto", False)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    typer.echo(f"demo finished in {time.time() - t0:.0f} s")


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="Probe run folder A (e.g. the pretrained encoder)."),
    run_b: Path = typer.Argument(..., help="Probe run folder B (e.g. the random-init baseline)."),
    heads: str = typer.Option(None, help="Comma-separated heads (default: all heads in both runs)."),
    metric: str = typer.Option("bacc", help="bacc, f1_macro or auroc."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples."),
    seed: int = typer.Option(0, help="Resampling seed."),
    out: Path = typer.Option(None, "--out", help="Write compare.json and compare.md here (and stain_shift.png "
                             "when both runs have stain-shift curves made with the same --stain-shift options)."),
) -> None:
    """Paired patient-level bootstrap of run A minus run B, per head (same tiles, same labels)."""
    from jwth.eval.compare import compare_runs, comparison_table
    from jwth.eval.report import write_json

    try:
        cmp = compare_runs(run_a, run_b, _csv(heads) or None, metric, n_boot, seed)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    table = comparison_table(cmp)
    typer.echo(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "compare.json", cmp)
        (out / "compare.md").write_text(table + "\n")
        typer.echo(f"wrote {out / 'compare.json'} and {out / 'compare.md'}")
        from jwth.eval.stain_shift import plot_compared_shift, remove_stale_figures

        remove_stale_figures(out)
        _, msg = plot_compared_shift(out / "stain_shift.png", {"A": run_a, "B": run_b})
        if msg:
            typer.echo(msg)


@app.command()
def encoders() -> None:
    """List encoder specs: registry models, released checkpoints and the default."""
    from jwth.encoders import DEFAULT_ENCODER, REGISTRY, released_checkpoints

    typer.echo(f"default: {DEFAULT_ENCODER}")
    typer.echo(f"released (jwth:<name>): {', '.join(released_checkpoints()) or 'none yet'}")
    typer.echo("registry (needs the weights in the local Hugging Face cache):")
    for e in REGISTRY.values():
        typer.echo(
            f"  {e.name:12s} {e.hub_id:24s} {e.arch:9s} D={e.embed_dim:<5d} registers={e.num_registers} "
            f"{e.input_size}px @ {e.mpp} µm/px  mean={e.mean} std={e.std}  embedding={e.embedding}"
        )
    typer.echo("also: timm:<model>[?key=value&...], hf-hub:<org>/<repo>, a checkpoint folder")


@app.command()
def env() -> None:
    """Check the environment: versions, device, bf16 speed choice, data root."""
    import torch

    from jwth.device import cpu_bf16_speedup, cpu_has_fast_bf16, resolve_device, resolve_precision
    from jwth.settings import data_root

    dev = resolve_device("auto")
    typer.echo(f"python {sys.version.split()[0]}, torch {torch.__version__}, device {dev}")
    if cpu_has_fast_bf16():
        typer.echo("measuring bf16 autocast against fp32 on this CPU (under a second on an idle machine) ...")
    speed = cpu_bf16_speedup()
    measured = f"bf16 autocast measured {speed:.1f}x the fp32 speed" if speed else "bf16 not measured (no native units)"
    typer.echo(f"CPU native bf16: {cpu_has_fast_bf16()}; {measured}; autocast chosen: {resolve_precision(dev, 'auto')}")
    root = data_root(required=False)
    typer.echo(f"data root: {root or 'NOT FOUND (set JWTH_DATA_ROOT)'}")
