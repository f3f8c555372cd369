"""Fill a token cache from a tile data set with a frozen encoder (``jwth extract``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from jwth.cache.tokens import TokenCache, manifest_for
from jwth.data.tiles import TileDataset, TileTable, check_tiles
from jwth.device import autocast, dtype_name, resolve_precision
from jwth.encoders import Encoder
from jwth.progress import progress_bar


def extract_tokens(
    encoder: Encoder,
    table: TileTable,
    cache_dir: str | Path,
    batch_size: int = 32,
    num_workers: int = 1,
    precision: str = "auto",
    store_patches: bool = True,
    skip_bad_tiles: bool = False,
    on_batch: Callable[[int], None] | None = None,
    quiet: bool = False,
    image_shift=None,
    tile_checks: dict | None = None,
    label: str | None = None,
) -> TokenCache:
    """Extract class, register and patch tokens of every tile into ``cache_dir``.

    Tiles already marked done in a matching cache are skipped (resume). Tiles are
    decoded once up front (:func:`jwth.data.tiles.check_tiles`) unless the cache
    already holds the same tile list.

    Args:
        encoder: a frozen :class:`jwth.encoders.Encoder`.
        table: the tile table.
        cache_dir: cache folder (created if missing).
        batch_size: tiles per forward pass.
        num_workers: DataLoader worker processes decoding tiles.
        precision: autocast precision (``auto`` = bf16 where faster, see jwth.device).
        store_patches: also store patch tokens (needed by attention pooling).
        skip_bad_tiles: leave undecodable tiles out (recorded in the manifest).
        on_batch: called with the number of tiles done after each written batch.
        quiet: no progress bar.
        image_shift: a :class:`jwth.eval.stain_shift.StainShift` applied to each decoded
            tile before the encoder's transform (recorded in the cache identity, so a
            shifted cache is never mistaken for an unshifted one, nor for a shift keyed
            by other patients or sites), or None.
        label: the progress bar's label (default ``extract <data set>``).
        tile_checks: the report of a decode check already made on exactly these tiles
            (e.g. the unshifted cache's): the tiles are not decoded again up front.

    With ``precision="auto"`` a partial cache is resumed at the autocast precision it was
    started with (recorded in its manifest), so one cache never mixes bf16 and fp32 tokens.

    Returns:
        The :class:`TokenCache`, opened for reading.

    Raises:
        jwth.data.tiles.TileError: an undecodable tile (without ``skip_bad_tiles``).
        jwth.cache.CacheMismatchError: ``cache_dir`` holds another encoder's tokens.
    """
    cache_dir = Path(cache_dir)
    device = next(encoder.parameters()).device
    if tile_checks is not None:
        report = tile_checks
    else:
        table, report = _checked_table(encoder, table, cache_dir, skip_bad_tiles, quiet)
    keys = table.df[image_shift.key_column()].astype(str).tolist() if image_shift is not None else None
    identity = manifest_for(encoder, table.df["path"].tolist(), store_patches, image_shift, keys)
    h, w = encoder.grid_for(encoder.input_size, encoder.input_size)
    if precision == "auto":  # a resumed cache keeps the precision it was started with
        precision = recorded_precision(cache_dir, device) or precision
    dtype = resolve_precision(device, precision)  # type: ignore[arg-type]
    cache = TokenCache.create_or_resume(
        cache_dir,
        identity,
        table.df[["path", "label", "patient_id", "site"]],
        embed_dim=encoder.embed_dim,
        num_registers=encoder.num_registers,
        num_patches=h * w,
        grid=(h, w),
        extra={
            "dataset": str(table.root.name),
            "classes": table.classes,
            "encoder": encoder.describe(),
            "autocast": dtype_name(dtype),
            "tile_checks": report,
        },
    )
    if cache.manifest.get("tile_checks") != report:
        _update_manifest(cache_dir, {"tile_checks": report})  # this run's checks, e.g. newly skipped tiles
    _check_tiles_unchanged(cache, cache_dir, table)
    todo = np.flatnonzero(~cache.done_mask)
    if len(todo):
        ds = TileDataset(table.root, table.df["path"].tolist(), encoder.transform, image_shift, keys)
        sub = torch.utils.data.Subset(ds, todo.tolist())
        loader = torch.utils.data.DataLoader(
            sub, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            persistent_workers=False, pin_memory=device.type == "cuda",
        )
        t0 = time.time()
        done = 0
        try:
            with progress_bar(label or f"extract {table.root.name}", total=len(todo), unit="tiles", disable=quiet) as bar:
                for x, idx in loader:
                    x = x.to(device, non_blocking=True)
                    with torch.inference_mode(), autocast(device, precision):  # type: ignore[arg-type]
                        tok = encoder(x)
                    cache.write(
                        idx.numpy(),
                        tok.cls.float().cpu().numpy(),
                        tok.registers.float().cpu().numpy() if encoder.num_registers else None,
                        tok.patches.float().cpu().numpy() if store_patches else None,
                    )
                    done += len(idx)
                    bar.advance(len(idx))
                    if on_batch is not None:
                        on_batch(done)
        finally:
            cache.close()
        if not quiet:
            dt = time.time() - t0
            name = getattr(encoder, "spec", None) or type(encoder).__name__
            print(f"extracted {done} tiles with {name} in {dt:.1f} s ({done / max(dt, 1e-9):.1f} tiles/s, "
                  f"{str(dtype).replace('torch.', '')})")
    else:
        cache.close()
    return TokenCache.open(cache_dir)


#: per tile: size, modification time and content digest of the tiles a cache was made from
#: (jwth.cache.tokens.tile_stats / tile_digests), (T, 3) int64
TILE_STATS = "tile_stats.npy"


def _check_tiles_unchanged(cache, cache_dir: Path, table: TileTable) -> None:
    """Refuse a cache whose already extracted tiles have new content since, naming them;
    then record the current fingerprints.

    Size and modification time are the fast path; where they differ (a re-export, or the
    same data copied anew without its times) the content digest decides, so a copied data
    folder keeps its caches and an in-place re-export does not. Tiles not extracted yet may
    change freely (e.g. a broken tile fixed before a resume). Caches made before the
    fingerprints existed are accepted and get them; those made with size and time only
    (no digest) are refused where size or time differ, as their content cannot be checked.

    Raises:
        ValueError: extracted tiles changed; the cache is left untouched.
    """
    import os

    from jwth.cache.tokens import tile_digests, tile_stats

    paths = table.df["path"].tolist()
    stats = tile_stats(table.root, paths)
    f = cache_dir / TILE_STATS
    old = None
    if f.is_file():
        try:
            old = np.load(f)
        except (OSError, ValueError):
            old = None
        if old is not None and (old.ndim != 2 or old.shape[0] != len(paths) or old.shape[1] not in (2, 3)):
            old = None
    digests = np.zeros(len(paths), dtype=np.int64)
    if old is not None:
        same = (old[:, :2] == stats).all(axis=1)
        if old.shape[1] == 3:
            digests[same] = old[same, 2]
        moved = np.flatnonzero(~same)
        digests[moved] = tile_digests(table.root, [paths[i] for i in moved])
        known = old[:, 2] if old.shape[1] == 3 else np.zeros(len(paths), dtype=np.int64)
        changed = np.flatnonzero(cache.done_mask & ~same & ((known == 0) | (known != digests)))
        if len(changed):
            cache.close()
            shown = ", ".join(paths[i] for i in changed[:3]) + (" ..." if len(changed) > 3 else "")
            raise ValueError(
                f"Token cache {cache_dir} holds tokens of {len(changed)} tile(s) that have changed on disk since "
                f"they were extracted (new content, missing, or size / time changed in a cache without content "
                f"digests; e.g. {shown} in {table.label_file}): re-exported or stain-normalised in place, or the "
                "same paths in another data folder. It is left untouched: delete it or choose another --cache "
                "to recompute."
            )
        if old.shape[1] == 3 and same.all():
            return
    missing = np.flatnonzero(digests == 0)
    digests[missing] = tile_digests(table.root, [paths[i] for i in missing])
    tmp = f.with_suffix(".tmp.npy")
    np.save(tmp, np.column_stack([stats, digests]))
    os.replace(tmp, f)


_PRECISION_OF = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def recorded_precision(cache_dir: str | Path, device: torch.device | None = None) -> str | None:
    """The autocast precision (``bf16`` / ``fp32`` / ``fp16``) a cache in ``cache_dir`` was
    extracted with, or None (no cache, not recorded, or fp16 on a device without it)."""
    import json

    from jwth.cache.tokens import MANIFEST

    try:
        rec = json.loads((Path(cache_dir) / MANIFEST).read_text()).get("autocast")
    except (OSError, ValueError):
        return None
    prec = _PRECISION_OF.get(str(rec))
    if prec == "fp16" and (device is None or device.type != "cuda"):
        return None
    return prec


def _update_manifest(cache_dir: Path, entries: dict) -> None:
    """Replace non-identity manifest entries atomically (readers see the old or the new file)."""
    import json
    import os

    from jwth.cache.tokens import IDENTITY_KEYS, MANIFEST

    assert not set(entries) & set(IDENTITY_KEYS)
    path = cache_dir / MANIFEST
    m = json.loads(path.read_text())
    m.update(entries)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(m, indent=2))
    os.replace(tmp, path)


def _checked_table(encoder, table: TileTable, cache_dir: Path, skip_bad: bool, quiet: bool):
    """Decode-check the tiles unless the cache already covers exactly this tile list."""
    import json

    from jwth.cache.tokens import MANIFEST, CacheDamagedError, tiles_hash

    mpath = cache_dir / MANIFEST
    if mpath.is_file():
        try:
            old = json.loads(mpath.read_text())
        except ValueError as e:
            raise CacheDamagedError(f"Token cache {cache_dir}: {MANIFEST} is unreadable ({e}); delete the folder "
                                    "(or choose another --cache) to recompute it.") from e
        report = old.get("tile_checks", {})
        skipped = {s["path"] for s in report.get("skipped", [])}
        if skipped:
            keep = ~table.df["path"].isin(skipped).to_numpy()
            cand = table.subset(keep)
        else:
            cand = table
        if old.get("tiles_hash") == tiles_hash(cand.df["path"].tolist()):
            return cand, report
    with progress_bar("check tiles", total=len(table), unit="tiles", disable=quiet) as bar:
        return check_tiles(table, encoder.input_size, skip_bad=skip_bad, progress=bar.advance)
