"""Labelled tile data sets.

Any folder with a ``labels.csv`` (columns ``path,label``, optional ``patient_id``
and ``site``/``tss``; names configurable) is a data set. ``path`` is relative to the
folder. Patient IDs are what every split groups by; when the column is absent the
patient is derived from a TCGA barcode in the path (``TCGA-XX-XXXX``) or, failing
that, each tile is its own patient (with a warning: splits are then tile-level).
"""

from __future__ import annotations

import posixpath
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFile

from jwth.data.labels import read_table, validate_labels

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated tile is an error, never silent garbage

TCGA_PATIENT = re.compile(r"(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
SITE_COLUMNS = ("site", "tss", "center", "centre")


class TileError(ValueError):
    """A tile that cannot be used; the message names the file and the fix."""


@dataclass
class TileTable:
    """A validated tile table.

    Attributes:
        root: data set folder; tile paths are relative to it.
        label_file: the labels file read.
        df: one row per tile with columns ``path``, ``label``, ``patient_id``,
            ``site`` (``site`` may be empty strings when unknown), in file order.
        classes: sorted class names; class index i is ``classes[i]``.
        notes: how columns were derived (e.g. patients from TCGA barcodes).
    """

    root: Path
    label_file: Path
    df: pd.DataFrame
    classes: list[str]
    notes: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.df)

    @property
    def y(self) -> np.ndarray:
        """Integer class index per tile, (n,)."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        return self.df["label"].map(lookup).to_numpy(dtype=np.int64)

    @property
    def name(self) -> str:
        return self.root.name

    def subset(self, mask: np.ndarray) -> "TileTable":
        return TileTable(self.root, self.label_file, self.df[mask].reset_index(drop=True), self.classes, dict(self.notes))


def read_labels(
    data_dir: str | Path,
    labels_file: str = "labels.csv",
    path_col: str = "path",
    label_col: str = "label",
    patient_col: str | None = "patient_id",
    site_col: str | None = None,
    classes: Sequence[str] | None = None,
    check_files: bool = True,
) -> TileTable:
    """Read and validate a tile data set's label file.

    Args:
        data_dir: the data set folder.
        labels_file: label file name inside ``data_dir`` (or an absolute path).
        path_col, label_col: column names of the tile path and the label.
        patient_col: patient column; ``None`` or absent -> derived (see module doc).
        site_col: site column; default: the first of site/tss/center/centre present,
            else the TCGA tissue-source site from the patient barcode, else unknown.
        classes: the allowed classes; a label outside them is an error.
        check_files: raise when a listed tile file does not exist (callers that skip bad
            tiles pass ``False``: :func:`check_tiles` then records missing files as skipped).

    Returns:
        A :class:`TileTable`.

    Raises:
        FileNotFoundError: missing folder, label file or tile files.
        ValueError: missing columns, empty file, a single class, unknown classes,
            empty labels, duplicate paths, or a patient with two labels.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} does not exist.")
    lf = Path(labels_file)
    lf = lf if lf.is_absolute() else root / lf
    if not lf.is_file():
        raise FileNotFoundError(
            f"{lf} not found. A tile data set is a folder with a labels.csv having columns "
            f"'{path_col},{label_col}' (optional patient_id, site); pass --labels to name another file."
        )
    raw = read_table(lf, (path_col, label_col), hint="Rename it or pass --path-col/--label-col.")
    if patient_col and patient_col != "patient_id" and patient_col not in raw.columns:
        raise ValueError(f"{lf} has no patient column {patient_col!r} (columns: {list(raw.columns)}); fix "
                         "--patient-col, or pass --patient-col none to derive patients from TCGA barcodes or per tile.")
    notes: dict = {}
    # one spelling per file: './images/a.jpg' and 'images//a.jpg' are 'images/a.jpg' (duplicates show)
    paths = raw[path_col].map(lambda p: posixpath.normpath(p) if p else p)
    df = pd.DataFrame({"path": paths, "label": raw[label_col]})

    # patients
    if patient_col and patient_col in raw.columns and (raw[patient_col] != "").all():
        df["patient_id"] = raw[patient_col]
        notes["patient_source"] = f"column {patient_col}"
        notes["patient_col"] = patient_col
    else:
        m = df["path"].str.extract(TCGA_PATIENT, expand=False)
        if m.notna().all():
            df["patient_id"] = m.str.upper()
            notes["patient_source"] = "TCGA barcode in path"
        else:
            df["patient_id"] = df["path"]
            notes["patient_source"] = "none (each tile its own patient)"
            if patient_col is None:
                why = "--patient-col none was given"
            elif patient_col in raw.columns:
                why = f"column {patient_col!r} has empty cells"
            else:
                why = f"there is no column {patient_col!r}"
            group_cols = [c for c in raw.columns if c.lower() in ("slide_id", "slide", "case_id", "case", "patient")]
            hint = f" or pass --patient-col {group_cols[0]} to group by that column" if group_cols else ""
            warnings.warn(
                f"{lf}: {why} and the paths hold no TCGA barcode, so each tile is its own patient: "
                "splits are tile-level and tiles of one patient or slide may leak across splits. "
                f"Add a patient_id column{hint}.",
                stacklevel=2,
            )
    cls_list = validate_labels(
        df, lf, "path", "label", group_col="patient_id", classes=classes,
        fix_group=", or if labels are tile properties (e.g. tissue type) drop the patient column "
        "and pass --patient-col none",
    )

    # sites
    if site_col and site_col not in raw.columns:
        raise ValueError(f"{lf} has no site column {site_col!r} (columns: {list(raw.columns)}); fix --site-col.")
    scol = site_col or next((c for c in SITE_COLUMNS if c in raw.columns), None)
    if scol:
        df["site"] = raw[scol]
        notes["site_source"] = f"column {scol}"
        notes["site_col"] = scol
    elif df["patient_id"].str.match(TCGA_PATIENT).all():
        df["site"] = df["patient_id"].str.slice(5, 7)
        notes["site_source"] = "TCGA tissue-source site from barcode"
    else:
        df["site"] = ""
        notes["site_source"] = "unknown"

    if check_files:
        is_missing = ~df["path"].map(lambda p: (root / p).is_file())
        missing = df["path"][is_missing].tolist()
        if missing:
            first = [f"line {i + 2}: {p}" for i, p in zip(df.index[is_missing][:3], missing[:3])]
            raise FileNotFoundError(
                f"{lf}: {len(missing)} listed tiles do not exist under {root} (e.g. {first}). "
                "Paths are relative to the data folder; fix the paths or remove those rows, or pass "
                "--skip-bad-tiles to leave them out (recorded in results.json)."
            )
    return TileTable(root=root, label_file=lf, df=df.reset_index(drop=True), classes=cls_list, notes=notes)


def to_uint8(arr: np.ndarray, source: str | Path = "tile") -> tuple[np.ndarray, str]:
    """Scale samples of any integer or float type to 8 bits by their actual range.

    - ``uint8``: unchanged (kind ``""``);
    - ``uint16``: divided by 257 (the container's 16-bit range; kind ``uint16``);
    - other integer types (``int16/32/64``, ``uint32/64``, PIL mode ``I``) hold no declared
      range: values within 0-255 are taken as 8-bit (kind e.g. ``int32 0-255``), within
      0-65535 as 16-bit and divided by 257 (``int32 0-65535``);
    - floats: values within 0-1 are multiplied by 255 (``float32 0-1``), within 0-255 kept
      (``float32 0-255``);
    - ``bool``: 0 / 255 (``bool``).

    Args:
        arr: samples, any shape.
        source: the file, for messages.

    Returns:
        ``(uint8 array of the same shape, kind)``.

    Raises:
        TileError: negative values, NaN or infinity, values beyond 65535 (integers) or
            255 (floats), or a non-numeric type -- no range can be assumed; the message
            names the file, the type and the range found.
    """
    dt = arr.dtype
    if dt == np.uint8:
        return arr, ""
    if dt == np.bool_:
        return arr.astype(np.uint8) * 255, "bool"
    numeric = np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)
    if not numeric or arr.size == 0:
        raise TileError(f"Tile {source} has samples of type {dt}, which cannot be shown as 8-bit RGB; "
                        "convert it to 8-bit RGB.")
    if np.issubdtype(dt, np.floating) and not np.isfinite(arr).all():
        raise TileError(f"Tile {source} has {dt.name} samples with NaN or infinity; re-export it as 8-bit RGB.")
    lo, hi = float(arr.min()), float(arr.max())
    fix = "re-export it as 8-bit (or 16-bit) RGB, or remove it from the label file"
    if lo < 0:
        raise TileError(f"Tile {source} has negative {dt.name} samples (range {lo:g} to {hi:g}); no colour "
                        f"range can be assumed: {fix}.")
    if dt == np.uint16:
        return (arr.astype(np.float32) / 257.0).round().astype(np.uint8), "uint16"
    if np.issubdtype(dt, np.integer):
        if hi <= 255:
            return arr.astype(np.uint8), f"{dt.name} 0-255"
        if hi <= 65535:
            return (arr.astype(np.float32) / 257.0).round().astype(np.uint8), f"{dt.name} 0-65535"
        raise TileError(f"Tile {source} has {dt.name} samples up to {hi:g}, beyond 16 bits; no colour range can "
                        f"be assumed: {fix}.")
    if hi <= 1.0:
        return (arr.astype(np.float64) * 255.0).round().astype(np.uint8), f"{dt.name} 0-1"
    if hi <= 255.0:
        return arr.astype(np.float64).round().astype(np.uint8), f"{dt.name} 0-255"
    raise TileError(f"Tile {source} has {dt.name} samples up to {hi:g}, beyond 0-1 and 0-255; no colour range "
                    f"can be assumed: {fix}.")


def _kind(*parts: str) -> str:
    return "+".join(p for p in parts if p) or "ok"


def _array_to_rgb(arr: np.ndarray, source: Path) -> tuple[Image.Image, str]:
    """A decoded sample array (H, W[, C]) of any type -> 8-bit RGB and the conversions made."""
    arr, depth = to_uint8(arr, source)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(np.stack([arr] * 3, -1)), _kind(depth, "gray")
    if arr.ndim == 3 and arr.shape[-1] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * a + 255.0 * (1 - a)).round().astype(np.uint8)
        return Image.fromarray(arr), _kind(depth, "alpha")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise TileError(f"Tile {source} has an unsupported array shape {arr.shape}; expected (H, W), (H, W, 3) "
                        "or (H, W, 4).")
    return Image.fromarray(arr), _kind(depth)


def _tiff_wider_than_8_bits(im: Image.Image) -> bool:
    bits = im.tag_v2.get(258, (8,))  # BitsPerSample
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8 or im.tag_v2.get(339, 1) not in (1, (1,))  # SampleFormat: 1 = unsigned integer


def load_tile(path: str | Path) -> tuple[Image.Image, str]:
    """Open one tile as 8-bit RGB.

    Conversions are reported by name, joined with ``+`` (e.g. ``int32 0-65535+gray``), so
    callers can count them: the sample type when it is not 8-bit (see :func:`to_uint8`),
    ``gray`` (one channel replicated to RGB), ``alpha`` (RGBA/LA/P with transparency
    composited on white), ``palette``, ``cmyk``; ``ok`` when nothing was converted.

    Raises:
        TileError: missing, unreadable, truncated or corrupt file, or samples without a
            known range (names the file and the fix).
    """
    p = Path(path)
    if not p.is_file():
        raise TileError(f"Tile {p} does not exist.")
    try:
        with Image.open(p) as im:
            if im.format == "TIFF" and _tiff_wider_than_8_bits(im):
                raise TileError("decoded with tifffile")  # Pillow would narrow the samples itself
            im.load()
            img = im.copy()
    except Exception as e:
        if p.suffix.lower() in (".tif", ".tiff"):
            try:
                import tifffile

                arr = tifffile.imread(p)
            except Exception:
                arr = None
            if arr is not None:
                return _array_to_rgb(arr, p)
        raise TileError(
            f"Tile {p} cannot be decoded ({type(e).__name__}: {e}). It is corrupt or truncated: "
            "re-export it, or remove it from the label file (or pass --skip-bad-tiles to leave it "
            "out and record it)."
        ) from e
    mode = img.mode
    if mode == "RGB":
        return img, "ok"
    if mode.startswith("I") or mode == "F":
        return _array_to_rgb(np.asarray(img), p)
    if mode == "L" or mode == "1":
        return img.convert("RGB"), "gray"
    if mode == "P":
        if "transparency" in img.info:
            img = img.convert("RGBA")
            mode = "RGBA"
        else:
            return img.convert("RGB"), "palette"
    if mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), "alpha"
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    return img.convert("RGB"), mode.lower()


def check_tiles(
    table: TileTable,
    input_size: int,
    skip_bad: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[TileTable, dict]:
    """Decode every tile once and report what needs handling.

    Args:
        table: the tile table.
        input_size: the encoder's tile side (px); other sizes are counted as resized.
        skip_bad: drop undecodable tiles (recorded in the report) instead of raising.
        progress: optional callback called with 1 after each tile.

    Returns:
        (table, report) -- the table without skipped tiles, and a report with
        ``conversions`` (counts per kind), ``resized`` (count and example sizes),
        ``skipped`` (list of {path, error}).

    Raises:
        TileError: an undecodable tile when ``skip_bad`` is false; the message lists
            the first bad files and the fix.
    """
    conv: Counter = Counter()
    sizes: Counter = Counter()
    bad: list[dict] = []
    keep = np.ones(len(table), dtype=bool)
    for i, rel in enumerate(table.df["path"]):
        try:
            img, kind = load_tile(table.root / rel)
            conv[kind] += 1
            sizes[img.size] += 1
        except TileError as e:
            bad.append({"path": rel, "error": str(e)})
            keep[i] = False
        if progress:
            progress(1)
    if bad and not skip_bad:
        listing = "\n  ".join(b["error"] for b in bad[:5])
        raise TileError(
            f"{len(bad)} tiles in {table.label_file} cannot be used:\n  {listing}\n"
            "Fix or remove them, or pass --skip-bad-tiles to leave them out (they are then "
            "listed in results.json under tile_checks.skipped)."
        )
    off = {f"{w}x{h}": n for (w, h), n in sizes.items() if (w, h) != (input_size, input_size)}
    report = {
        "conversions": {k: v for k, v in conv.items() if k != "ok"},
        "resized": {"count": int(sum(off.values())), "sizes": off, "to": input_size},
        "skipped": bad,
    }
    if off:
        warnings.warn(
            f"{sum(off.values())} tiles are not {input_size}x{input_size} px ({off}); they are "
            "resized (bicubic) and centre-cropped, which changes their µm/px.",
            stacklevel=2,
        )
    out = table.subset(keep) if bad else table
    if bad and len(set(out.df["label"])) < 2:
        raise ValueError(f"After leaving out bad tiles, {table.label_file} has fewer than two classes.")
    return out, report


class TileDataset(torch.utils.data.Dataset):
    """Tiles as normalised tensors, for extraction.

    Args:
        root: data set folder.
        paths: tile paths relative to ``root``.
        transform: PIL RGB -> tensor (3, H, W).
        image_shift: optional ``(PIL RGB, key) -> PIL RGB`` applied before ``transform``
            (:class:`jwth.eval.stain_shift.StainShift`), with ``keys[i]`` for tile i.

    ``__getitem__`` returns ``(image (3, H, W), index)``.
    """

    def __init__(self, root: Path, paths: Sequence[str], transform: Callable,
                 image_shift: Callable | None = None, keys: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.transform = transform
        self.image_shift = image_shift
        self.keys = list(keys) if keys is not None else list(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img, _ = load_tile(self.root / self.paths[i])
        if self.image_shift is not None:
            img = self.image_shift(img, self.keys[i])
        return self.transform(img), i
