"""`jwth nuclei-alignment`: does the class token's attention fall on nuclei?"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jwth.cli.app import app
from jwth.cli.probe import _fail
from jwth.cli.probe import DEVICE_OPT, PATIENT_COL_OPT, SEED_OPT, _LABEL_COL_HELP, _PATH_COL_HELP


def _run_settings(run: Path) -> dict:
    """Data, encoder, cache and label options of a `jwth probe` run folder (its config.yaml).

    Raises:
        FileNotFoundError: not a probe run folder.
        ValueError: config.yaml without the needed keys.
    """
    import yaml

    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run} is not a `jwth probe` run folder (no config.yaml); run `jwth probe` "
                                "first, or pass --encoder and --data instead of --run.")
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    missing = [k for k in ("data", "encoder", "cache") if not cfg.get(k)]
    if missing:
        raise ValueError(f"{cfg_file} lacks {missing}; it was not written by `jwth probe`.")
    return cfg


@app.command("nuclei-alignment")
def nuclei_alignment(
    run: Optional[Path] = typer.Option(None, "--run", help="A `jwth probe` run folder: its data, encoder and token "
                                                           "cache (the head is trained on the cached tokens)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Encoder spec, without --run (default: the "
                                                                  "project's default encoder)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Tile data set folder (with labels.csv), without --run."),
    out: Path = typer.Option(..., "--out", help="Output folder (results.md/.json, per_tile.csv, figures, "
                                                "attention_head.pt)."),
    tiles: int = typer.Option(150, help="Analysed tiles, balanced over classes, from held-out patients."),
    max_per_patient: int = typer.Option(4, help="At most this many analysed tiles per patient."),
    train_tiles: int = typer.Option(1000, help="Tiles of the other patients the head is trained on (0 = all)."),
    mpp: float = typer.Option(0.5, help="Tile resolution in um/px (nucleus sizes are in um)."),
    epochs: int = typer.Option(10, help="Head training epochs."),
    n_boot: int = typer.Option(1000, help="Patient bootstrap resamples for the CIs."),
    seed: int = SEED_OPT,
    labels: str = typer.Option("labels.csv", help="Label file inside --data."),
    path_col: str = typer.Option("path", help=_PATH_COL_HELP),
    label_col: str = typer.Option("label", help=_LABEL_COL_HELP),
    patient_col: str = PATIENT_COL_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Token <-> nucleus alignment: attention-weighted nuclear fraction vs uniform, per head and class.

    Nuclei come from scikit-image (colour deconvolution, Otsu threshold, watershed). The
    attention of a JWTH head trained on other patients' tiles, of the same head untrained
    (control) and of the encoder's last block is compared with the nuclear fraction of each
    patch token.
    """
    from jwth.cache import TokenCache
    from jwth.data.tiles import read_labels
    from jwth.device import resolve_device
    from jwth.encoders import DEFAULT_ENCODER, load_encoder
    from jwth.eval.alignment import AlignmentConfig, run_alignment

    cache = None
    try:
        if run is not None:
            if data is not None or encoder is not None:
                raise ValueError("Give either --run, or --encoder and --data, not both.")
            cfg = _run_settings(run)
            data, encoder = Path(cfg["data"]), cfg["encoder"]
            labels, path_col, label_col = cfg.get("labels", labels), cfg.get("path_col", path_col), cfg.get("label_col", label_col)
            patient_col = cfg.get("patient_col") or "none"
        elif data is None:
            raise ValueError("Give --data DIR (a folder with labels.csv), or --run RUN (a `jwth probe` run folder).")
        table = read_labels(data, labels, path_col, label_col, None if patient_col.lower() == "none" else patient_col)
        enc = load_encoder(encoder or DEFAULT_ENCODER, device=resolve_device(device))
        if run is not None:
            cache = TokenCache.open(cfg["cache"])
            if cache.manifest.get("weights_hash") != enc.weights_hash:
                raise ValueError(f"Token cache {cfg['cache']} holds tokens of another encoder than {enc.spec!r}.")
        acfg = AlignmentConfig(n_tiles=tiles, max_per_patient=max_per_patient, train_tiles=0 if run else train_tiles,
                               mpp=mpp, epochs=epochs, seed=seed, n_boot=n_boot)
        res = run_alignment(enc, table, out, acfg, cache=cache)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    finally:
        if cache is not None:
            cache.close()
    typer.echo((out / "results.md").read_text())
    typer.echo(f"written to {out}: results.md, results.json, per_tile.csv, tiles.png, enrichment.png, "
               f"attention_head.pt ({res['seconds']:.0f} s)")
