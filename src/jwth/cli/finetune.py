"""`jwth finetune`: fine-tune the encoder with a head (full, LoRA, last k blocks) on the probe's splits."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jwth.cli.app import app
from jwth.cli.probe import _csv, _fail
from jwth.cli.probe import DEVICE_OPT, N_BOOT_OPT, PATIENT_COL_OPT, SEED_OPT, SITE_COL_OPT, SKIP_BAD_OPT, _LABEL_COL_HELP, _PATH_COL_HELP


@app.command()
def finetune(
    data: Path = typer.Option(..., "--data", help="Tile data set folder (with labels.csv)."),
    encoder: str = typer.Option(None, "--encoder", help="Encoder spec (default: the project's default encoder)."),
    out: Path = typer.Option(..., "--out", help="Run folder (finished folds in <out>/folds are reused on rerun)."),
    method: str = typer.Option("lora", help="full, lora, or last-blocks."),
    head: str = typer.Option("attention", help="attention (JWTH attention pooling) or linear."),
    last_blocks: int = typer.Option(2, help="With --method last-blocks: how many of the last blocks train."),
    lora_rank: int = typer.Option(8, help="LoRA rank r."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha (update scaled by alpha / r; default 2 r)."),
    lora_targets: str = typer.Option("qkv", help="Comma-separated names of the linear layers LoRA adapts "
                                     "(timm ViT: qkv, proj, fc1, fc2)."),
    lora_dropout: float = typer.Option(0.0, help="Dropout on the LoRA input."),
    epochs: int = typer.Option(10, help="Maximum epochs per fold."),
    patience: int = typer.Option(3, help="Early stopping: epochs without a better validation balanced accuracy "
                                 "(0 = train all epochs; the best epoch is restored either way)."),
    batch_size: int = typer.Option(32, help="Tiles per optimiser step."),
    lr: float = typer.Option(1e-3, help="Head learning rate."),
    encoder_lr: Optional[float] = typer.Option(None, help="Encoder / LoRA learning rate (default: full 1e-5, "
                                               "last-blocks 5e-5, lora 5e-4)."),
    weight_decay: float = typer.Option(1e-2, help="AdamW weight decay."),
    augment: str = typer.Option("", help="Training augmentation, comma-separated: flip, stain."),
    stain_strength: float = typer.Option(1.0, help="Strength of the stain augmentation."),
    split: str = typer.Option("patient", help="patient (stratified k-fold over patients) or site."),
    folds: int = typer.Option(5, help="k for patient k-fold."),
    test_sites: Optional[str] = typer.Option(None, help="With --split site: comma-separated test sites."),
    labels: str = typer.Option("labels.csv", help="Label file inside --data."),
    path_col: str = typer.Option("path", help=_PATH_COL_HELP),
    label_col: str = typer.Option("label", help=_LABEL_COL_HELP),
    patient_col: str = PATIENT_COL_OPT,
    site_col: Optional[str] = SITE_COL_OPT,
    positive: Optional[str] = typer.Option(None, help="Positive class for ROC (default: the rarer class)."),
    n_boot: int = N_BOOT_OPT,
    seed: int = SEED_OPT,
    num_workers: int = typer.Option(0, help="Tile-decoding workers (when the tiles do not fit in memory)."),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
    device: str = DEVICE_OPT,
    precision: str = typer.Option("auto", help="auto (bf16 where faster), fp32, bf16, fp16 (CUDA)."),
    skip_bad_tiles: bool = SKIP_BAD_OPT,
) -> None:
    """Fine-tune encoder + head (full, LoRA, last k blocks) with the probe's splits, metrics and run folder.

    Compare the run with a frozen `jwth probe` run on the same tiles: `jwth compare RUN PROBE_RUN`.
    """
    from jwth.encoders import DEFAULT_ENCODER
    from jwth.eval.probe import ProbeConfig
    from jwth.eval.report import results_table
    from jwth.eval.train import HeadTrainConfig
    from jwth.finetune import FinetuneConfig, FinetuneRunConfig, finetune_run

    cfg = FinetuneRunConfig(
        data=str(data), encoder=encoder or DEFAULT_ENCODER, out=str(out), labels=labels, path_col=path_col,
        label_col=label_col, patient_col=patient_col, site_col=site_col, device=device, precision=precision,
        num_workers=num_workers, skip_bad_tiles=skip_bad_tiles,
        probe=ProbeConfig(heads=[head], split=split, folds=folds, test_sites=_csv(test_sites), n_boot=n_boot,
                          positive_class=positive, train=HeadTrainConfig(seed=seed)),
        finetune=FinetuneConfig(
            method=method, head=head, last_blocks=last_blocks, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_targets=_csv(lora_targets) or ["qkv"], lora_dropout=lora_dropout, epochs=epochs, patience=patience,
            batch_size=batch_size, lr=lr, encoder_lr=encoder_lr, weight_decay=weight_decay, augment=_csv(augment),
            stain_strength=stain_strength, threads=threads,
        ),
    )
    try:
        res = finetune_run(cfg)
    except KeyboardInterrupt:
        typer.secho(f"\ninterrupted: finished folds are kept in {out / 'folds'}; rerun the same command to resume.",
                    err=True)
        raise typer.Exit(code=130)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    f = res["finetune"]
    typer.echo("")
    typer.echo(results_table(res))
    typer.echo(
        f"\n{f['method']}: {f['trainable_params']:,} of {f['total_params']:,} parameters trained; "
        f"{f['wall_seconds']:.0f} s, {f['train_tiles_per_s']} training tiles/s, peak memory "
        f"{f['peak_memory_mib']:.0f} MiB ({f['peak_memory_kind']})"
    )
    if res["encoder"]["random_init"]:
        typer.secho(f"NOTE: {cfg.encoder} started from a RANDOM INITIALISATION (no pretrained weights).",
                    fg=typer.colors.YELLOW)
    typer.echo(f"\nrun folder: {out} (results.json, results.md, config.yaml, predictions.csv, curves.png, figures); "
               f"compare with a probe run: jwth compare {out} PROBE_RUN")
