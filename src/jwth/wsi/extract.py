"""Per-slide feature extraction into HDF5 files that CLAM and TRIDENT can read.

One file per slide, ``<out>/features/<slide_id>.h5``:

- ``coords``: ``(N, 2)`` int64, level-0 top-left ``(x, y)`` px of each tile. Its
  attributes (and the file's root attributes) hold ``patch_size`` (tile px at
  ``target_mpp``), ``patch_size_level0``, ``patch_level`` / ``level``,
  ``downsample``, ``target_mpp``, ``mpp`` (level 0, um/px), TRIDENT's
  ``level0_magnification`` / ``target_magnification`` (10 / mpp) and ``name``.
- ``features``: ``(N, E)`` float32 tile embeddings. ``E = D`` for ``cls``; ``E = 2D``
  for ``jwth`` (``[class token, class-attention-pooled patch tokens]``) and for
  ``cls+mean`` (``[class token, mean patch token]``, Virchow2's embedding).
- ``patch_tokens`` (optional): ``(N, P, D)`` float16 patch tokens (registers excluded).
- with a trained attention head (``head=``, embedding ``jwth-head``): ``features`` are
  ``[class token, the head's pooled vector]`` ``(N, 2D)``, plus ``attention`` ``(N, H, P)``
  float16 (the head's weights over the patch tokens, for heatmaps) and ``probs``
  ``(N, C)`` float32; the patch tokens themselves are never stored.
- root attributes: ``encoder``, ``weights_hash``, ``embedding``, ``embed_dim`` (D),
  ``n_tiles``, ``n_bad_tiles``, ``jwth_version``, ``complete`` (written last).

Runs are resumable: a slide is written to ``<slide_id>.h5.partial`` and renamed
atomically when complete, with the root attribute ``complete`` written last. An
existing ``.h5`` is skipped only when it opens and is complete (rows of ``features``
and ``coords`` match ``n_tiles``, ``complete`` set); any other file of that name
(truncated, short, from an interrupted or foreign writer) is recomputed, and replaced
only once the new file is complete. Every
slide appends one JSON line to ``<out>/status.jsonl`` (``done``, ``skipped``,
``empty`` with the reason, or ``failed`` with the error); tiles that fail to decode
are skipped and appended to ``<out>/tile_errors.csv`` with their coordinates. Under
``torchrun`` each rank takes the slides ``slides[RANK::WORLD_SIZE]``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Literal

import h5py
import numpy as np
import torch
from PIL import Image

from jwth.heads.checkpoint import pool_with_head
from jwth.wsi.reader import SlideReader, SlideReadError, open_slide
from jwth.wsi.tiling import TilingPlan, plan_tiles, read_tile, save_preview

Embedding = Literal["cls", "jwth", "cls+mean"]
EMBEDDINGS: tuple[str, ...] = ("cls", "jwth", "cls+mean")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu",
                  ".dcm", ".png", ".jpg", ".jpeg")


#: Root attribute written last into a features file; without it the file is not trusted as finished.
COMPLETE_ATTR = "complete"


class FeatureFileError(ValueError):
    """A per-slide features file that cannot be used (unreadable, truncated or incomplete)."""


def feature_file_problem(path: str | Path, require_mark: bool | None = None) -> str | None:
    """Why a per-slide features ``.h5`` cannot be trusted as finished, or None when it can.

    A file is complete when it opens, holds ``features`` and ``coords`` with the same
    number of rows, its ``n_tiles`` attribute (when present) equals that number, and --
    with ``require_mark`` -- the completion attribute ``complete`` is set (written last by
    :func:`extract_slide`). ``require_mark=None`` requires it only from files written by
    jwth (attribute ``jwth_version``) without ``n_tiles`` (files of CLAM or TRIDENT have
    no mark; jwth files older than the mark end with ``n_tiles``).

    Args:
        path: the ``.h5`` file.
        require_mark: see above.

    Returns:
        ``None``, or a sentence saying what is wrong (for logs and errors).
    """
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                return f"has no 'features' and 'coords' datasets of the CLAM/TRIDENT layout (found {sorted(f.keys())})"
            nf, nc = int(f["features"].shape[0]), int(f["coords"].shape[0])
            attrs = dict(f.attrs)
    except OSError as e:
        return f"cannot be opened as HDF5 (truncated, still being written, or not HDF5: {e})"
    if nf != nc:
        return f"has {nf} features rows but {nc} coords rows (an interrupted or partial write)"
    if "n_tiles" in attrs and int(attrs["n_tiles"]) != nf:
        return f"has {nf} rows but its n_tiles attribute says {int(attrs['n_tiles'])}"
    if require_mark is None:
        require_mark = "jwth_version" in attrs and "n_tiles" not in attrs
    if require_mark and not attrs.get(COMPLETE_ATTR):
        return f"has no completion mark (attribute {COMPLETE_ATTR!r}): its extraction did not finish"
    return None


def embed_tokens(cls: torch.Tensor, patches: torch.Tensor, embedding: Embedding) -> torch.Tensor:
    """Tile embedding from the encoder's tokens.

    Args:
        cls: class tokens ``(B, D)``.
        patches: patch tokens ``(B, N, D)`` (register tokens excluded).
        embedding: ``cls`` -> ``(B, D)``; ``jwth`` -> ``[cls, pooled]`` ``(B, 2D)`` with
            ``pooled`` the parameter-free class attention pooling
            ``softmax(cls P^T / sqrt(D)) P`` (JWTH); ``cls+mean`` -> ``[cls, mean(P)]`` ``(B, 2D)``.

    Raises:
        ValueError: unknown ``embedding``.
    """
    if embedding == "cls":
        return cls
    if embedding == "jwth":
        from jwth.heads.attention_pool import class_attention_pool

        pooled, _ = class_attention_pool(cls, patches)
        return torch.cat([cls, pooled], dim=-1)
    if embedding == "cls+mean":
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)
    raise ValueError(f"Unknown embedding {embedding!r}; choose one of {EMBEDDINGS}.")


def find_slides(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand folders (their slide files, sorted), ``.txt``/``.csv`` lists and files.

    A ``.csv`` list must have a ``path`` column (relative paths are taken relative to
    the csv); a ``.txt`` list has one path per line.

    Raises:
        FileNotFoundError: an input does not exist, or a folder holds no slide files.
        ValueError: two slides share a file stem (their outputs would collide).
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"Slide input not found: {p}")
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"No slide files ({', '.join(SLIDE_SUFFIXES)}) in folder {p}")
            out += found
        elif p.suffix.lower() == ".csv":
            import pandas as pd

            df = pd.read_csv(p, dtype=str, keep_default_na=False)  # a path such as 001.svs stays text
            if "path" not in df.columns:
                raise ValueError(f"Slide list {p} needs a 'path' column, has {list(df.columns)}")
            out += [(p.parent / q) if not Path(q).is_absolute() else Path(q) for q in df["path"]]
        elif p.suffix.lower() == ".txt":
            out += [Path(line.strip()) for line in p.read_text().splitlines() if line.strip()]
        else:
            out.append(p)
    stems: dict[str, Path] = {}
    for p in out:
        if p.stem in stems and stems[p.stem] != p:
            raise ValueError(f"Two slides share the name {p.stem!r}: {stems[p.stem]} and {p}; rename one.")
        stems[p.stem] = p
    return out


def shard(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """The items of this process: ``items[RANK::WORLD_SIZE]`` (from env under torchrun)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    return items[rank::world_size]


class SlideTileDataset(torch.utils.data.Dataset):
    """Tiles of one slide for a DataLoader (each worker opens its own reader).

    Items are ``(image (3, H, W) float, index, ok, error)``; a tile that fails to
    decode gives ``ok=False``, a zero image and the error text (never garbage pixels).
    """

    def __init__(self, slide: str | Path, plan: TilingPlan, transform: Callable, backend: str = "auto"):
        self.slide = Path(slide)
        self.plan = dataclasses.replace(plan, mask=None, thumb=None)
        self.transform = transform
        self.backend = backend
        self._reader: SlideReader | None = None
        blank = Image.new("RGB", (plan.tile_size, plan.tile_size), (255, 255, 255))
        self._size = tuple(transform(blank).shape)

    def __len__(self) -> int:
        return self.plan.n_tiles

    def __getitem__(self, i: int):
        if self._reader is None:
            self._reader = open_slide(self.slide, backend=self.backend)  # geometry only: mpp is in the plan
        try:
            tile = read_tile(self._reader, self.plan, self.plan.coords[i])
        except SlideReadError as e:
            return torch.zeros(self._size), i, False, str(e)
        return self.transform(Image.fromarray(tile)), i, True, ""

    def __del__(self):
        if self._reader is not None:
            self._reader.close()


def _append(ds: h5py.Dataset, arr: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + len(arr), axis=0)
    ds[n:] = arr


def extract_slide(
    slide: str | Path,
    out_h5: str | Path,
    encoder,
    target_mpp: float | None = None,
    tile_size: int | None = None,
    embedding: Embedding = "cls",
    save_patch_tokens: bool = False,
    mpp: float | None = None,
    default_mpp: float | None = None,
    min_tissue: float = 0.25,
    tissue: str = "otsu",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    backend: str = "auto",
    preview: str | Path | None = None,
    on_tile_error: Callable[[str, int, int, int, str], None] | None = None,
    progress: Callable[[int], None] | None = None,
    head=None,
) -> dict:
    """Tile one slide, encode its tiles and write ``out_h5`` atomically.

    Args:
        slide: slide file.
        out_h5: final HDF5 path (written as ``<out_h5>.partial`` then renamed).
        encoder: a :class:`jwth.encoders.Encoder` in eval mode.
        target_mpp: tile resolution (um/px); default the encoder's ``mpp`` or 0.5.
        tile_size: tile edge (px) at ``target_mpp``; default the encoder's ``input_size``.
        embedding: ``cls``, ``jwth`` or ``cls+mean`` (see :func:`embed_tokens`).
        save_patch_tokens: also store ``patch_tokens`` (N, P, D) float16.
        mpp: level-0 mpp (um/px) overriding the metadata.
        default_mpp: level-0 mpp (um/px) used only when the metadata has none.
        min_tissue, tissue: tissue filter (see :func:`jwth.wsi.tiling.plan_tiles`).
        batch_size, num_workers: DataLoader settings (workers read tiles in parallel).
        device, precision: where and in which precision the encoder runs.
        preview: optional PNG path for the tiling preview.
        on_tile_error: called ``(slide_id, index, x, y, error)`` for each skipped tile.
        progress: called with the number of tiles done after each batch.
        head: optional trained :class:`jwth.heads.JWTHAttentionHead` (see
            :func:`jwth.heads.checkpoint.load_attention_head`) run on each batch's tokens;
            ``embedding`` is then ``jwth-head`` (module docstring).

    Returns:
        ``{"slide", "status" ("done" | "empty"), "reason", "n_tiles", "n_bad_tiles",
        "seconds", "h5"}``.

    Raises:
        MissingMppError: no mpp metadata and no ``mpp`` override (names ``--mpp``).
        SlideReadError: the slide cannot be opened.
    """
    from jwth.device import autocast

    t0 = time.perf_counter()
    slide, out_h5 = Path(slide), Path(out_h5)
    target_mpp = target_mpp or encoder.mpp or 0.5
    tile_size = tile_size or encoder.input_size
    with open_slide(slide, mpp=mpp, backend=backend, default_mpp=default_mpp) as reader:
        plan = plan_tiles(reader, target_mpp=target_mpp, tile_size=tile_size, tissue=tissue,
                          min_tissue=min_tissue)
    if preview:
        save_preview(plan, preview)
    out_h5.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_h5.with_name(out_h5.name + ".partial")
    D = int(encoder.embed_dim)
    if head is not None:
        embedding = "jwth-head"
        head = head.to(device).eval()
    E = D if embedding == "cls" else 2 * D
    if embedding not in EMBEDDINGS and head is None:
        raise ValueError(f"Unknown embedding {embedding!r}; choose one of {EMBEDDINGS}.")
    device = torch.device(device)
    n_bad = 0
    import jwth

    with h5py.File(tmp, "w") as f:
        coords_ds = f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype="int64", chunks=(4096, 2))
        feat_ds = f.create_dataset("features", shape=(0, E), maxshape=(None, E), dtype="float32",
                                   chunks=(max(1, min(1024, (1 << 20) // (4 * E))), E))
        patch_ds = head_ds = None
        attrs = plan.attrs()
        for k, v in attrs.items():
            coords_ds.attrs[k] = v
            f.attrs[k] = v
        f.attrs.update({"encoder": encoder.spec, "weights_hash": str(encoder.weights_hash),
                        "embedding": embedding, "embed_dim": D, "slide": str(slide),
                        "jwth_version": jwth.__version__, "status": plan.status, "reason": plan.reason})
        feat_ds.attrs.update({"encoder": encoder.spec, "embedding": embedding, "embed_dim": D})
        if plan.n_tiles:
            ds = SlideTileDataset(slide, plan, encoder.transform, backend=backend)
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                                 shuffle=False, pin_memory=device.type == "cuda")
            done = 0
            for x, idx, ok, err in loader:
                bad = (~ok).nonzero().flatten().tolist()
                for b in bad:
                    n_bad += 1
                    i = int(idx[b])
                    cx, cy = (int(v) for v in plan.coords[i])
                    if on_tile_error is not None:
                        on_tile_error(plan.slide_id, i, cx, cy, err[b])
                keep = ok.nonzero().flatten()
                done += len(idx)
                if len(keep):
                    xk = x[keep].to(device, non_blocking=True)
                    with torch.inference_mode(), autocast(device, precision):
                        tok = encoder(xk)
                        emb = embed_tokens(tok.cls, tok.patches, embedding) if head is None else None
                    if head is not None:
                        emb, att, prob = pool_with_head(head, tok.cls, tok.patches)
                        head_ds = head_ds or _head_datasets(f, att.shape[1:], prob.shape[1])
                        _append(head_ds[0], att.cpu().numpy().astype(np.float16))
                        _append(head_ds[1], prob.cpu().numpy())
                    _append(feat_ds, emb.float().cpu().numpy())
                    _append(coords_ds, plan.coords[idx[keep].numpy()])
                    if save_patch_tokens:
                        P = tok.patches.shape[1]
                        if patch_ds is None:
                            patch_ds = f.create_dataset("patch_tokens", shape=(0, P, D), maxshape=(None, P, D),
                                                        dtype="float16", chunks=(1, P, D))
                        _append(patch_ds, tok.patches.float().cpu().numpy().astype(np.float16))
                if progress is not None:
                    progress(done)
        f.attrs["n_tiles"] = int(coords_ds.shape[0])
        f.attrs["n_bad_tiles"] = int(n_bad)
        n_written = int(coords_ds.shape[0])
        f.flush()
        f.attrs[COMPLETE_ATTR] = True  # last: a file without it is never trusted as finished
    os.replace(tmp, out_h5)
    status = "done" if n_written else "empty"
    reason = plan.reason if plan.status != "ok" else ("every tile failed to decode" if not n_written else "")
    return {"slide": plan.slide_id, "status": status, "reason": reason, "n_tiles": n_written,
            "n_bad_tiles": n_bad, "seconds": round(time.perf_counter() - t0, 3), "h5": str(out_h5)}


def _head_datasets(f: h5py.File, attn_shape: tuple, num_classes: int) -> tuple[h5py.Dataset, h5py.Dataset]:
    """The ``attention`` (N, H, P) float16 and ``probs`` (N, C) datasets of ``jwth-head`` files."""
    att = f.create_dataset("attention", shape=(0, *attn_shape), maxshape=(None, *attn_shape), dtype="float16",
                           chunks=(max(1, 4096 // attn_shape[-1]), *attn_shape))
    probs = f.create_dataset("probs", shape=(0, num_classes), maxshape=(None, num_classes), dtype="float32",
                             chunks=(4096, num_classes))
    return att, probs


def _log_status(out_dir: Path, rec: dict, rank: int | None = None) -> None:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    rec = {**rec, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rank": rank}
    with open(out_dir / "status.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def _tile_error_logger(out_dir: Path) -> Callable[[str, int, int, int, str], None]:
    path = out_dir / "tile_errors.csv"

    def log(slide_id: str, index: int, x: int, y: int, error: str) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["slide", "index", "x", "y", "error"])
            w.writerow([slide_id, index, x, y, error.replace("\n", " ")])

    return log


def extract_slides(
    slides: list[Path],
    out_dir: str | Path,
    encoder,
    mpp: float | dict[str, float] | None = None,
    overwrite: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    on_slide: Callable[[dict], None] | None = None,
    **kwargs,
) -> list[dict]:
    """Extract many slides; a failing slide is logged and the batch goes on.

    Args:
        slides: slide files (see :func:`find_slides`).
        out_dir: output folder; features go to ``<out_dir>/features/<slide_id>.h5``,
            previews to ``<out_dir>/previews/``, logs to ``status.jsonl`` and
            ``tile_errors.csv``.
        encoder: the encoder.
        mpp: level-0 mpp override (um/px) for all slides, or ``{slide_id: mpp}``.
        overwrite: re-extract slides whose ``.h5`` exists (default: skip them).
        rank, world_size: shard of slides for this process (default from torchrun env).
        on_slide: callback with each slide's status record.
        **kwargs: passed to :func:`extract_slide`.

    Returns:
        One status record per slide of this rank (``status`` in done/skipped/empty/failed).
    """
    out_dir = Path(out_dir)
    (out_dir / "features").mkdir(parents=True, exist_ok=True)
    log_tile = _tile_error_logger(out_dir)
    records = []
    for slide in shard(list(slides), rank, world_size):
        slide = Path(slide)
        out_h5 = out_dir / "features" / f"{slide.stem}.h5"
        slide_mpp = mpp.get(slide.stem) if isinstance(mpp, dict) else mpp
        problem = feature_file_problem(out_h5, require_mark=True) if out_h5.exists() and not overwrite else None
        if out_h5.exists() and not overwrite and problem is None:
            rec = {"slide": slide.stem, "status": "skipped", "reason": "complete features file exists",
                   "h5": str(out_h5)}
        else:
            try:
                rec = extract_slide(slide, out_h5, encoder, mpp=slide_mpp, on_tile_error=log_tile,
                                    preview=out_dir / "previews" / f"{slide.stem}.png", **kwargs)
                if problem is not None:  # the old file was replaced only once the new one was complete
                    rec["reason"] = f"recomputed: the existing features file {problem}"
            except Exception as e:  # noqa: BLE001 - one slide must not stop the batch
                rec = {"slide": slide.stem, "status": "failed", "reason": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=3)}
                partial = out_h5.with_name(out_h5.name + ".partial")
                if partial.exists():
                    partial.unlink()
        _log_status(out_dir, rec, rank)
        records.append(rec)
        if on_slide is not None:
            on_slide(rec)
    return records


__all__ = ["EMBEDDINGS", "COMPLETE_ATTR", "FeatureFileError", "feature_file_problem", "embed_tokens", "find_slides", "shard", "SlideTileDataset", "extract_slide",
           "extract_slides"]
