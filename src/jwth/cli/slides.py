"""Whole-slide commands: ``jwth tile``, ``jwth extract-slides``, ``jwth mil``, ``jwth heatmap``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from jwth.cli.app import app
from jwth.cli.probe import _DEVICE_HELP, _ENCODER_HELP, _PRECISION_HELP

console = Console()


def _status_table(records: list[dict], title: str) -> Table:
    t = Table(title=title)
    for c in ("slide", "status", "tiles"):
        t.add_column(c, no_wrap=True)
    t.add_column("reason", overflow="fold")
    colours = {"done": "green", "ok": "green", "skipped": "cyan", "empty": "yellow", "failed": "red"}
    for r in records:
        st = r["status"]
        t.add_row(r["slide"], f"[{colours.get(st, 'white')}]{st}[/]", str(r.get("n_tiles", "")),
                  str(r.get("reason", ""))[:600])
    return t


#: exit codes of `jwth tile` / `jwth extract-slides`: every slide failed, or only some did
EXIT_ALL_FAILED, EXIT_SOME_FAILED = 1, 3


def _exit_on_failures(records: list[dict], out: Path) -> None:
    """Exit 1 if every slide failed, 3 if some did (finished slides are kept either way)."""
    failed = [r for r in records if r["status"] == "failed"]
    if not failed:
        return
    console.print(f"[red]{len(failed)} of {len(records)} slide(s) failed[/]; reasons in {out / 'status.jsonl'}. "
                  "Finished slides are kept: fix the cause (e.g. --mpp) and re-run the same command.")
    raise typer.Exit(EXIT_ALL_FAILED if len(failed) == len(records) else EXIT_SOME_FAILED)


@app.command("tile")
def tile_cmd(
    slides: List[Path] = typer.Argument(..., help="Slide files, folders of slides, or .csv/.txt slide lists."),
    out: Path = typer.Option(Path("runs/tiles"), "--out", help="Output folder (coords/, previews/, status.jsonl)."),
    target_mpp: float = typer.Option(0.5, help="Tile resolution in um/px (0.5 ~ 20x)."),
    tile_size: int = typer.Option(224, help="Tile edge in px at --target-mpp."),
    mpp: Optional[float] = typer.Option(None, help="Level-0 um/px overriding the slide metadata."),
    default_mpp: Optional[float] = typer.Option(None, help="Level-0 um/px for slides WITHOUT mpp metadata only."),
    min_tissue: float = typer.Option(0.25, help="Minimum tissue fraction of a kept tile (0..1)."),
    tissue: str = typer.Option("otsu", help="Tissue detection: otsu (saturation) or none (keep all tiles)."),
    backend: str = typer.Option("auto", help="Reader: auto, openslide, tiffslide or image."),
) -> None:
    """Tile slides at a target mpp: coordinates (CLAM-style coords .h5) and preview PNGs.

    Coordinates are level-0 top-left corners. A slide that fails (e.g. no mpp) is
    reported and the others go on.
    """
    import h5py

    from jwth.progress import progress_bar
    from jwth.wsi.extract import _log_status, find_slides
    from jwth.wsi.reader import open_slide
    from jwth.wsi.tiling import plan_tiles, save_preview

    paths = find_slides(slides)
    (out / "coords").mkdir(parents=True, exist_ok=True)
    records = []
    with progress_bar("tiling slides", len(paths), unit="slide") as bar:
        for p in paths:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    with open_slide(p, mpp=mpp, backend=backend, default_mpp=default_mpp) as r:
                        plan = plan_tiles(r, target_mpp=target_mpp, tile_size=tile_size, tissue=tissue,
                                          min_tissue=min_tissue)
                save_preview(plan, out / "previews" / f"{p.stem}.png")
                tmp = out / "coords" / f"{p.stem}.h5.partial"
                with h5py.File(tmp, "w") as f:
                    ds = f.create_dataset("coords", data=plan.coords.reshape(-1, 2).astype("int64"))
                    f.create_dataset("tissue_fraction", data=plan.tissue_fraction)
                    for k, v in plan.attrs().items():
                        ds.attrs[k] = v
                        f.attrs[k] = v
                    f.attrs["status"], f.attrs["reason"] = plan.status, plan.reason
                tmp.replace(out / "coords" / f"{p.stem}.h5")
                rec = {"slide": p.stem, "status": plan.status, "n_tiles": plan.n_tiles, "level": plan.level,
                       "read_size": plan.read_size, "tile_size_level0": plan.tile_size_level0, "mpp": plan.mpp,
                       "mpp_source": plan.mpp_source,
                       "reason": plan.reason or "; ".join(str(w.message) for w in caught)[:300]}
            except Exception as e:  # noqa: BLE001 - report and go on
                rec = {"slide": p.stem, "status": "failed", "reason": f"{type(e).__name__}: {e}"}
            _log_status(out, rec)
            records.append(rec)
            bar.advance()
    console.print(_status_table(records, f"jwth tile -> {out}"))
    _exit_on_failures(records, out)


@app.command("extract-slides")
def extract_slides_cmd(
    slides: List[Path] = typer.Argument(..., help="Slide files, folders of slides, or .csv/.txt slide lists."),
    out: Path = typer.Option(Path("runs/slides"), "--out", help="Output folder (features/<slide>.h5, previews/, "
                                                             "status.jsonl, tile_errors.csv)."),
    encoder: Optional[str] = typer.Option(None, help=_ENCODER_HELP),
    embedding: str = typer.Option("cls", help="Tile embedding: cls, jwth (class token concatenated with the attention-pooled patch tokens) "
                                              "or cls+mean."),
    save_patch_tokens: bool = typer.Option(False, help="Also store patch tokens (N, P, D) float16."),
    target_mpp: Optional[float] = typer.Option(None, help="Tile um/px (default: the encoder's mpp, else 0.5)."),
    tile_size: Optional[int] = typer.Option(None, help="Tile px at --target-mpp (default: encoder input size)."),
    mpp: Optional[float] = typer.Option(None, help="Level-0 um/px overriding the slide metadata."),
    default_mpp: Optional[float] = typer.Option(None, help="Level-0 um/px for slides WITHOUT mpp metadata only."),
    min_tissue: float = typer.Option(0.25, help="Minimum tissue fraction of a kept tile (0..1)."),
    batch_size: int = typer.Option(64, help="Tiles per forward pass."),
    num_workers: int = typer.Option(0, help="Reader processes, each with its own slide handle (0 = read in the "
                                              "main process)."),
    device: str = typer.Option("auto", help=_DEVICE_HELP + " Under torchrun: cuda:LOCAL_RANK."),
    precision: str = typer.Option("auto", help=_PRECISION_HELP),
    overwrite: bool = typer.Option(False, help="Re-extract slides whose .h5 exists (default: skip them)."),
    head: Optional[Path] = typer.Option(None, help="A trained attention head (attention_head.pt from `jwth nuclei-alignment`) "
                                             "run with the encoder: stores [class token, pooled vector], attention "
                                             "and probs per tile, never the patch tokens (embedding jwth-head)."),
) -> None:
    """Encode the tiles of each slide into one HDF5 per slide (CLAM/TRIDENT layout).

    Resumable (finished slides are skipped); failing slides are logged in
    status.jsonl and the batch goes on; undecodable tiles are skipped and listed in
    tile_errors.csv. Under torchrun, each rank takes every WORLD_SIZE-th slide.
    """
    import os

    from jwth.device import resolve_device
    from jwth.encoders import DEFAULT_ENCODER, load_encoder
    from jwth.progress import progress_bar
    from jwth.wsi.extract import extract_slides, find_slides, shard

    if "LOCAL_RANK" in os.environ and device == "auto":
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    dev = resolve_device(device)
    enc = load_encoder(encoder or DEFAULT_ENCODER, device=dev)
    trained_head = None
    if head is not None:
        from jwth.heads.checkpoint import load_attention_head

        try:
            trained_head, _ = load_attention_head(head, enc)
        except (ValueError, FileNotFoundError) as e:
            raise typer.BadParameter(str(e), param_hint="--head")
        embedding = "jwth-head"
    paths = find_slides(slides)
    mine = shard(paths)
    with progress_bar(f"extracting slides ({enc.spec}, {embedding})", len(mine), unit="slide") as bar:
        records = extract_slides(
            paths, out, enc, mpp=mpp, overwrite=overwrite, on_slide=lambda r: bar.advance(), default_mpp=default_mpp,
            target_mpp=target_mpp, tile_size=tile_size, embedding=embedding, save_patch_tokens=save_patch_tokens,
            min_tissue=min_tissue, batch_size=batch_size, num_workers=num_workers, device=dev, precision=precision,
            head=trained_head)
    console.print(_status_table(records, f"jwth extract-slides -> {out / 'features'}"))
    _exit_on_failures(records, out)


@app.command("mil")
def mil_cmd(
    cache: Optional[Path] = typer.Option(None, help="Tile token cache (jwth extract): one bag per patient."),
    features: Optional[Path] = typer.Option(None, help="Folder of slide .h5 files (extract-slides' features/)."),
    labels: Optional[Path] = typer.Option(None, help="Labels csv for --features (slide_id, label[, patient_id])."),
    embedding: List[str] = typer.Option(["cls", "jwth"], help="Instance embeddings to compare (repeat)."),
    aggregator: List[str] = typer.Option(["abmil"], help="abmil and/or mean (repeat)."),
    group_by: str = typer.Option("patient", help="Bag unit: patient, or slide (for --features)."),
    label_col: str = typer.Option("label", help="Label column."),
    n_instances: int = typer.Option(16, help="Instances sampled per bag in training (evaluation uses all)."),
    epochs: int = typer.Option(40, help="Maximum epochs (best validation loss kept)."),
    lr: float = typer.Option(2e-4, help="AdamW learning rate."),
    folds: int = typer.Option(5, help="Patient-level CV folds."),
    seed: int = typer.Option(0, help="Seed of folds, sampling and initialisation."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for the CIs."),
    device: str = typer.Option("cpu", help="cpu or cuda (the MIL models are small)."),
    out: Path = typer.Option(Path("runs/mil"), "--out", help="Output folder (results.json/.md, models)."),
) -> None:
    """Patient-level MIL: compare instance embeddings on the same folds, with a bag-size baseline."""
    from jwth.mil.bags import bags_from_slide_h5, bags_from_token_cache
    from jwth.mil.train import MILConfig, run_mil

    if (cache is None) == (features is None):
        raise typer.BadParameter("give exactly one of --cache (tile token cache) or --features (slide .h5 folder)")
    if features is not None and labels is None:
        raise typer.BadParameter("--features needs --labels (csv with slide_id and label)")
    bags = {}
    for emb in embedding:
        with console.status(f"building {emb} bags"):
            if cache is not None:
                bags[emb] = _read_or_fail(bags_from_token_cache, cache, emb, label_col=label_col,
                                          group_by="patient_id" if group_by == "patient" else group_by)
            else:
                bags[emb] = _read_or_fail(bags_from_slide_h5, features, labels, emb, label_col=label_col,
                                          group_by=group_by)
    ref = next(iter(bags.values()))
    per_class = ", ".join(f"{name} ({c['bags']} bags, {c['instances']} tiles, median {c['median_bag_size']:g})"
                          for name, c in ref.summary()["classes"].items())
    console.print(f"{ref.n_bags} bags, {len(ref.class_names)} classes: {per_class}", highlight=False)
    if ref.skipped:
        console.print(f"[yellow]left out:[/] {json.dumps(ref.skipped)}")
    cfg = MILConfig(aggregator=aggregator[0], n_instances=n_instances, epochs=epochs, lr=lr, n_splits=folds,
                    seed=seed, n_boot=n_boot, device=device)
    run_mil(bags, cfg, aggregators=list(aggregator), out_dir=out, progress=console.log)
    console.print((out / "results.md").read_text())
    console.print(f"written: {out / 'results.json'}, {out / 'results.md'}")


def _read_or_fail(fn, *args, **kwargs):
    """Call ``fn``; a bad input (ValueError, FileNotFoundError) ends the command with its message, exit code 2."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}", markup=True, highlight=False)
        raise typer.Exit(2) from None


@app.command("heatmap")
def heatmap_cmd(
    slide: Path = typer.Argument(..., help="The slide file."),
    features: Path = typer.Option(..., help="The slide's features .h5 (extract-slides)."),
    model: Optional[Path] = typer.Option(None, help="A MIL model_*.pt from `jwth mil` (attention / tile scores)."),
    scores: Optional[Path] = typer.Option(None, help="Or a csv with x, y, score per tile."),
    what: str = typer.Option("attention", help="attention or prob (tile predictions) with --model."),
    out: Path = typer.Option(Path("runs/heatmap.png"), "--out", help="Output PNG."),
    mpp: Optional[float] = typer.Option(None, help="um/px passed to the slide reader; drawing needs none, coordinates are level-0 px."),
    patch_size_level0: Optional[int] = typer.Option(
        None, help="Tile edge in level-0 px, for features files without it (default: the file's "
                   "patch_size_level0, else CLAM's patch_size x the downsample of patch_level)."),
) -> None:
    """Draw MIL attention (or tile predictions, or given scores) over the slide thumbnail."""
    import numpy as np
    import pandas as pd

    from jwth.mil.bags import read_slide_features
    from jwth.mil.train import load_mil_model
    from jwth.wsi.heatmap import draw_heatmap, patch_size_level0 as tile_edge_level0

    if (model is None) == (scores is None):
        raise typer.BadParameter("give exactly one of --model or --scores")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model is not None:
            m, meta = load_mil_model(model)
            feats, coords, attrs = _read_or_fail(read_slide_features, features, meta["embedding"])
            if feats.shape[1] != meta["in_dim"]:
                raise typer.BadParameter(f"{features} has {feats.shape[1]}-d features but {model} expects "
                                         f"{meta['in_dim']}-d ({meta['embedding']}); use the same encoder and "
                                         f"--embedding")
            if what == "attention":
                vals = m.forward_chunked(feats).attention[0].numpy()
                label = f"{meta['aggregator']} attention"
            elif what == "prob":
                vals = m.instance_probs(feats)[:, -1]
                label = f"tile P({meta['class_names'][-1]})"
            else:
                raise typer.BadParameter("--what must be attention or prob")
        else:
            _, coords, attrs = _read_or_fail(read_slide_features, features)
            df = pd.read_csv(scores)
            lookup = {(int(x), int(y)): s for x, y, s in zip(df["x"], df["y"], df["score"])}
            vals = np.array([lookup.get((int(x), int(y)), np.nan) for x, y in coords])
            label = "score"
        try:
            edge = patch_size_level0 or tile_edge_level0(attrs, slide, source=str(features))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        draw_heatmap(slide, coords, vals, edge, out, mpp=mpp, label=label,
                     normalize="rank" if what == "attention" and model is not None else "minmax")
    console.print(f"heatmap of {len(coords)} tiles written to {out}")
