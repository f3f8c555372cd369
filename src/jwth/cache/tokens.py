"""The token cache: one HDF5 file per (data set, encoder, transform).

Layout of ``<cache_dir>/tokens.h5``:

- ``cls``       (T, D)    float16 -- class token per tile;
- ``registers`` (T, R, D) float16 -- register tokens (only when R > 0);
- ``patches``   (T, N, D) float16 -- patch tokens, chunked one tile per chunk row
  block so any tile subset is read without loading the file;
- ``done``      (T,)      uint8   -- 1 once a tile's tokens are written and flushed.

Beside it: ``manifest.json`` (encoder spec, weights hash, transform, dtype, token
grid, the tile list's hash, tile checks) and ``tiles.csv`` (the tile table in cache
row order). Rows are addressed by tile index, so an interrupted extraction resumes
without recomputing or duplicating tiles, and a cache is never reused for another
encoder, transform or tile list (:class:`CacheMismatchError`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pandas as pd

CACHE_FILE = "tokens.h5"
MANIFEST = "manifest.json"
TILES = "tiles.csv"
FORMAT_VERSION = 1
# Keys that must match for a cache to be reused.
IDENTITY_KEYS = ("format", "encoder_spec", "weights_hash", "transform", "dtype", "tiles_hash", "store_patches",
                 "image_shift")


class CacheMismatchError(RuntimeError):
    """A cache folder holds tokens of another encoder, transform or tile list."""


class CacheDamagedError(RuntimeError):
    """A cache folder whose files cannot be read (truncated, corrupt) or are locked by a writer."""


def tiles_hash(paths: list[str]) -> str:
    """SHA-256 (16 hex chars) of the ordered tile path list."""
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]


def tile_stats(root: str | Path, paths: list[str]) -> np.ndarray:
    """Size (bytes) and modification time (ns) of each listed tile, (T, 2) int64; -1 for a missing file.

    A stat per tile, no read: the fast path of :func:`tile_digests`. A row changes when a tile
    is re-exported, stain-normalised or replaced in place, but also when the data folder is
    merely copied anew (times not preserved), so a changed row alone proves nothing.
    """
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    root = Path(root)
    for i, p in enumerate(paths):
        try:
            st = (root / p).stat()
            out[i] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    return out


def tile_digests(root: str | Path, paths: list[str]) -> np.ndarray:
    """64-bit BLAKE2b digest of each listed tile's bytes, (T,) int64; 0 for a missing file.

    Decides whether a tile whose size or time changed (:func:`tile_stats`) has new content.
    Reads each file once (about 1 s for 5,000 JPEG tiles of 36 KB).
    """
    out = np.zeros(len(paths), dtype=np.int64)
    root = Path(root)
    for i, p in enumerate(paths):
        try:
            d = hashlib.blake2b((root / p).read_bytes(), digest_size=8).digest()
        except OSError:
            continue
        out[i] = int.from_bytes(d, "little", signed=True) or 1  # 0 is kept for "missing / unknown"
    return out


def manifest_for(encoder, paths: list[str], store_patches: bool = True, image_shift=None,
                 shift_keys: list[str] | None = None) -> dict:
    """The identity part of a manifest for ``encoder`` over ``paths`` (and the stain shift
    applied to the tiles, :class:`jwth.eval.stain_shift.StainShift`, if any, with a hash of
    the per-tile keys -- path, patient or site -- that seed its draws)."""
    ident = {
        "format": FORMAT_VERSION,
        "encoder_spec": encoder.spec,
        "weights_hash": encoder.weights_hash,
        "transform": encoder.transform_description(),
        "dtype": "float16",
        "tiles_hash": tiles_hash(paths),
        "store_patches": bool(store_patches),
    }
    if image_shift is not None:
        ident["image_shift"] = {**image_shift.describe(), "keys_hash": tiles_hash(list(shift_keys or paths))}
    return ident


class TokenCache:
    """Reader/writer of a token cache folder (see module docstring).

    Use :meth:`create_or_resume` to write, :meth:`open` to read. A complete cache is
    only ever opened read-only, so any number of processes can read it while another
    re-runs extraction on it (HDF5 file locking refuses a write-open beside readers).

    Raises:
        CacheDamagedError: unreadable manifest, tile list or HDF5 file, or an HDF5
            file locked by a writer in another process (the message says what to do).
    """

    def __init__(self, folder: Path, mode: str = "r") -> None:
        self.folder = Path(folder)
        self.path = self.folder / CACHE_FILE
        fix = "delete the folder (or choose another --cache) to recompute it"
        try:
            self.manifest: dict = json.loads((self.folder / MANIFEST).read_text())
            self.tiles: pd.DataFrame = pd.read_csv(self.folder / TILES, dtype=str, keep_default_na=False)
        except (ValueError, OSError) as e:  # JSONDecodeError and pandas' parser errors are ValueErrors
            raise CacheDamagedError(f"Token cache {self.folder}: {MANIFEST} or {TILES} is unreadable "
                                    f"({type(e).__name__}: {e}); {fix}.") from e
        try:
            self._h5 = h5py.File(self.path, mode)
        except BlockingIOError as e:
            raise CacheDamagedError(
                f"Token cache {self.path} is open for writing in another process (HDF5 lock: {e}); wait for "
                "that process to finish (a complete cache is opened read-only and can be shared).") from e
        except OSError as e:
            raise CacheDamagedError(f"Token cache {self.path} cannot be opened as HDF5 ({e}): it is truncated "
                                    f"or damaged; {fix}.") from e

    # ---------------------------------------------------------------- creation
    @classmethod
    def create_or_resume(
        cls,
        folder: str | Path,
        identity: dict,
        tiles: pd.DataFrame,
        embed_dim: int,
        num_registers: int,
        num_patches: int,
        grid: tuple[int, int],
        extra: dict | None = None,
    ) -> "TokenCache":
        """Open ``folder`` for writing: create it, or resume a matching partial cache.

        Args:
            folder: cache folder.
            identity: from :func:`manifest_for`.
            tiles: tile table (path, label, patient_id, site) in row order.
            embed_dim, num_registers, num_patches: D, R, N.
            grid: token grid (h, w).
            extra: more manifest entries (tile checks, data set name).

        Returns:
            The cache, opened for appending -- or read-only when it is already complete.

        Raises:
            CacheMismatchError: the folder holds a cache with another identity. The
                existing cache is left untouched.
            CacheDamagedError: the existing cache cannot be read.
        """
        folder = Path(folder)
        mpath = folder / MANIFEST
        if mpath.is_file() and (folder / CACHE_FILE).is_file():
            old = json.loads(mpath.read_text())
            diff = [k for k in IDENTITY_KEYS if old.get(k) != identity.get(k)]
            if diff:
                raise CacheMismatchError(
                    f"Cache {folder} was made with another {', '.join(diff)} "
                    f"(encoder {old.get('encoder_spec')!r}, weights {old.get('weights_hash')}). "
                    "It is left untouched: choose another --cache folder, or delete this one "
                    "to recompute."
                )
            reader = cls(folder, mode="r")
            if reader.complete:  # nothing to write: never write-open a finished cache
                return reader
            reader.close()
            return cls(folder, mode="a")
        folder.mkdir(parents=True, exist_ok=True)
        T = len(tiles)
        tmp = folder / (CACHE_FILE + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("cls", (T, embed_dim), dtype="f2", chunks=(min(T, 1024), embed_dim))
            if num_registers:
                f.create_dataset(
                    "registers", (T, num_registers, embed_dim), dtype="f2",
                    chunks=(min(T, 256), num_registers, embed_dim),
                )
            if identity.get("store_patches", True):
                f.create_dataset(
                    "patches", (T, num_patches, embed_dim), dtype="f2",
                    chunks=(1, num_patches, embed_dim),
                )
            f.create_dataset("done", (T,), dtype="u1", fillvalue=0)
        tiles.to_csv(folder / TILES, index=False)
        manifest = {
            **identity,
            "n_tiles": T,
            "embed_dim": embed_dim,
            "num_registers": num_registers,
            "num_patches": num_patches,
            "grid": list(grid),
            **(extra or {}),
        }
        mpath.write_text(json.dumps(manifest, indent=2))
        tmp.rename(folder / CACHE_FILE)
        return cls(folder, mode="a")

    @classmethod
    def open(cls, folder: str | Path, require_complete: bool = True) -> "TokenCache":
        """Open a cache for reading.

        Raises:
            FileNotFoundError: no cache in ``folder``.
            RuntimeError: the cache is incomplete and ``require_complete`` is set
                (the message says how to resume).
        """
        folder = Path(folder)
        if not (folder / CACHE_FILE).is_file() or not (folder / MANIFEST).is_file():
            raise FileNotFoundError(f"No token cache in {folder}; run `jwth extract` first.")
        c = cls(folder, mode="r")
        if require_complete and not c.complete:
            n = c.n_done
            c.close()
            raise RuntimeError(
                f"Token cache {folder} is incomplete ({n}/{c.n_tiles} tiles); rerun "
                "`jwth extract` with the same options to resume."
            )
        return c

    # ---------------------------------------------------------------- writing
    def write(self, idx: np.ndarray, cls_tok: np.ndarray, registers: np.ndarray | None, patches: np.ndarray | None) -> None:
        """Write tokens of tiles ``idx`` (sorted, unique) and mark them done.

        Data is flushed before the ``done`` flags are set, so an interruption
        leaves those tiles unmarked and they are recomputed on resume.

        Raises:
            ValueError: non-finite values after conversion to fp16 (overflow).
        """
        idx = np.asarray(idx)
        order = np.argsort(idx)
        idx = idx[order]
        c16 = cls_tok[order].astype(np.float16)
        arrays = [("cls", c16)]
        if registers is not None and "registers" in self._h5:
            arrays.append(("registers", registers[order].astype(np.float16)))
        if patches is not None and "patches" in self._h5:
            arrays.append(("patches", patches[order].astype(np.float16)))
        for name, a in arrays:
            if not np.isfinite(a).all():
                raise ValueError(
                    f"Non-finite {name} tokens for tiles {self.tiles['path'].iloc[idx[:3]].tolist()} "
                    "after fp16 conversion (values beyond +-65504 or NaN from the encoder)."
                )
        for name, a in arrays:
            self._h5[name][idx] = a
        self._h5.flush()
        self._h5["done"][idx] = 1
        self._h5.flush()

    # ---------------------------------------------------------------- reading
    @property
    def n_tiles(self) -> int:
        return int(self.manifest["n_tiles"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def num_registers(self) -> int:
        return int(self.manifest["num_registers"])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.manifest["grid"])  # type: ignore[return-value]

    @property
    def has_patches(self) -> bool:
        return "patches" in self._h5

    @property
    def done_mask(self) -> np.ndarray:
        return self._h5["done"][:].astype(bool)

    @property
    def n_done(self) -> int:
        return int(self.done_mask.sum())

    @property
    def complete(self) -> bool:
        return self.n_done == self.n_tiles

    def _read(self, name: str, idx, dtype=np.float32) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            shape = self._h5[name].shape[1:]
            return np.zeros((0, *shape), dtype=dtype)
        order = np.argsort(idx)
        sorted_idx = idx[order]
        uniq, inv = np.unique(sorted_idx, return_inverse=True)
        data = self._h5[name][uniq]
        out = np.empty((len(idx), *data.shape[1:]), dtype=dtype)
        out[order] = data[inv]
        return out

    def read_cls(self, idx) -> np.ndarray:
        """Class tokens of tiles ``idx`` as float32, (n, D), in the order given."""
        return self._read("cls", idx)

    def read_registers(self, idx) -> np.ndarray:
        """Register tokens (n, R, D) float32; (n, 0, D) when the encoder has none."""
        if "registers" not in self._h5:
            return np.zeros((len(idx), 0, self.embed_dim), dtype=np.float32)
        return self._read("registers", idx)

    def read_patches(self, idx) -> np.ndarray:
        """Patch tokens of tiles ``idx`` as float32, (n, N, D), in the order given.

        Raises:
            RuntimeError: the cache was made with ``--no-patches``.
        """
        if not self.has_patches:
            raise RuntimeError(f"Cache {self.folder} holds no patch tokens (made with --no-patches).")
        return self._read("patches", idx)

    def read_patches_f16(self, idx) -> np.ndarray:
        """Patch tokens (n, N, D) kept in float16 (half the memory of :meth:`read_patches`), in the order given."""
        return self._read("patches", idx, dtype=np.float16)

    def iter_batches(self, batch_size: int = 256, idx=None, patches: bool = True) -> Iterator[tuple]:
        """Yield ``(idx, cls (b, D), patches (b, N, D) or None)`` in row order, streaming."""
        idx = np.arange(self.n_tiles) if idx is None else np.sort(np.asarray(idx))
        for s in range(0, len(idx), batch_size):
            b = idx[s : s + batch_size]
            yield b, self.read_cls(b), (self.read_patches(b) if patches and self.has_patches else None)

    @property
    def nbytes_per_tile(self) -> int:
        """Bytes on disk per tile of token data (fp16)."""
        D, R, N = self.embed_dim, self.num_registers, int(self.manifest["num_patches"])
        return 2 * D * (1 + R + (N if self.has_patches else 0))

    def close(self) -> None:
        try:
            self._h5.close()
        except Exception:
            pass

    def __enter__(self) -> "TokenCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
