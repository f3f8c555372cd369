"""Whole-slide image reader with one interface over three backends.

Order tried by ``backend="auto"``:

1. **OpenSlide** (``openslide-python`` + ``openslide-bin``): Aperio SVS (incl. JPEG
   2000), Hamamatsu, MIRAX, Philips, generic tiled TIFF, DICOM ...
2. **tiffslide** (pure Python, ``tifffile`` + ``imagecodecs``): TIFF variants
   OpenSlide refuses (strip TIFFs, some OME-TIFFs).
3. **image** (Pillow, ``tifffile`` for TIFF): single-level images such as PNG or a
   plain strip TIFF. The whole image is decoded into memory, so this is meant for
   small images; such files rarely carry a resolution, so pass ``mpp``.

Whatever the backend, :meth:`SlideReader.read_region` returns an RGB ``uint8`` array
and fills pixels outside the slide with white, so edge tiles are identical across
backends. A tile that cannot be decoded raises :class:`SlideReadError` naming the
slide and the tile's level-0 coordinates; the reader stays usable afterwards (an
OpenSlide handle, whose errors are sticky, is reopened).

Corrupt tiles that decode without an error. OpenSlide and tiffslide decode a JPEG
tile whose stream was cut short (and zero-filled, its byte count unchanged) to
garbage or grey without raising. For TIFF-based slides (SVS, generic tiled TIFF) the
compressed stream of every tile of a level is therefore checked once, cheaply (a few
bytes at each end, no decoding), before that level is read: a JPEG (TIFF compression
7) or JPEG 2000 (33003/33004/33005/34712) tile must end, after trailing zero padding,
with the end-of-image / end-of-codestream marker ``FF D9`` (and a JPEG tile must start
with ``FF D8``). A region touching such a tile raises :class:`SlideReadError` naming
the tile. What still passes: damage inside a stream that keeps both markers, and
formats other than TIFF (NDPI, MRXS, DICOM ...).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

Backend = Literal["auto", "openslide", "tiffslide", "image"]

#: Plausible range of level-0 resolutions (um/px). Resolution tags outside it
#: (e.g. the TIFF default of 1 px/inch = 25,400 um/px) are treated as missing.
MPP_RANGE = (0.05, 50.0)

BACKGROUND = 255

#: TIFF compressions whose tile streams end with the marker FF D9 (JPEG EOI, JPEG 2000 EOC).
_MARKED_STREAMS = {7: "JPEG", 33003: "JPEG 2000", 33004: "JPEG 2000", 33005: "JPEG 2000", 34712: "JPEG 2000"}


def tiff_bad_tile_streams(path: str | Path, size: tuple[int, int]) -> tuple[tuple[int, int], dict] | None:
    """Tiles of a TIFF page whose compressed stream lacks its end (or start) marker.

    Args:
        path: a TIFF-based slide file.
        size: ``(width, height)`` px of the pyramid level to check (the page is found by size).

    Returns:
        ``((tile_width, tile_height), {(column, row): reason})`` for a tiled JPEG / JPEG 2000
        page of that size, or None when the file is not a TIFF or the page is not checkable.
        Costs two small reads per tile; nothing is decoded.
    """
    try:
        import tifffile

        tf = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - not a TIFF: nothing to check
        return None
    with tf:
        page = next((pg for pg in tf.pages if pg.is_tiled and (pg.imagewidth, pg.imagelength) == tuple(size)
                     and int(pg.compression) in _MARKED_STREAMS and pg.planarconfig == 1), None)
        if page is None:
            return None
        kind = _MARKED_STREAMS[int(page.compression)]
        ncols = -(-page.imagewidth // page.tilewidth)
        fh = tf.filehandle
        bad = {}
        for i, (off, n) in enumerate(zip(page.dataoffsets, page.databytecounts)):
            if not n:
                continue  # a sparse (absent) tile: the reader fills it, nothing is decoded
            fh.seek(off)
            head = fh.read(2)
            fh.seek(off + max(n - 64, 0))
            tail = fh.read(min(n, 64)).rstrip(b"\x00")
            if kind == "JPEG" and head != b"\xff\xd8":
                bad[(i % ncols, i // ncols)] = f"{kind} stream has no start-of-image marker"
            elif not tail.endswith(b"\xff\xd9"):
                bad[(i % ncols, i // ncols)] = (f"{kind} stream has no end marker (cut short"
                                                f"{' and zero-filled' if len(tail) < min(n, 64) else ''})")
    return (page.tilewidth, page.tilelength), bad


class MissingMppError(ValueError):
    """The slide has no usable microns-per-pixel metadata and no override was given."""


class SlideReadError(RuntimeError):
    """A slide (or one tile of it) could not be opened or decoded."""


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def mpp_from_tiff_tags(x_resolution, unit) -> float | None:
    """Level-0 mpp (um/px) from TIFF ``XResolution`` (px per unit) and ``ResolutionUnit``.

    ``unit`` may be the TIFF code (2 = inch, 3 = centimeter) or its name. Unit
    ``none`` (1) or a missing/zero resolution returns None.
    """
    res = _float(x_resolution)
    if res is None:
        return None
    u = str(unit).strip().lower()
    if u in ("3", "centimeter", "cm", "resunit.centimeter"):
        return 1e4 / res
    if u in ("2", "inch", "resunit.inch"):
        return 25400.0 / res
    return None


def mpp_from_aperio_description(description: str | None) -> float | None:
    """``MPP = 0.499`` field of an Aperio ImageDescription, or None."""
    if not description:
        return None
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
    return _float(m.group(1)) if m else None


class SlideReader:
    """One whole-slide image, read lazily region by region.

    Attributes:
        path: the slide file.
        backend: ``"openslide"``, ``"tiffslide"`` or ``"image"``.
        level_dimensions: ``[(width, height), ...]`` in px of each pyramid level.
        level_downsamples: level-0 px per level-k px, per level.
        mpp: level-0 microns per pixel (um/px) or None when unknown.
        mpp_source: where ``mpp`` came from (``override``, ``metadata``, ``tiff-tags``,
            ``aperio-description``, ``default``) or None.
        bounds: ``(x, y, width, height)`` in level-0 px of the scanned region
            (OpenSlide ``bounds-*`` properties), else the full level 0.

    Args:
        path: slide file.
        mpp: level-0 um/px that overrides any metadata (``--mpp``).
        backend: ``auto`` (OpenSlide, then tiffslide, then image) or one of them.
        default_mpp: level-0 um/px used only when the metadata has none (``--default-mpp``).

    Raises:
        FileNotFoundError: the path does not exist.
        SlideReadError: no backend can open the file (message lists each backend's error).
        ValueError: ``mpp`` / ``default_mpp`` is not a positive number.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, backend: Backend = "auto",
                 default_mpp: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"Slide not found: {self.path}")
        for name, v in (("--mpp", mpp), ("--default-mpp", default_mpp)):
            if v is not None and not _float(v):
                raise ValueError(f"{name} must be a positive number of um/px, got {v!r} for {self.path}")
        self._mpp_override = float(mpp) if mpp is not None else None
        self._stream_checks: dict[int, tuple | None] = {}
        self._default_mpp = float(default_mpp) if default_mpp is not None else None
        self._handle = None
        self._image: np.ndarray | None = None
        self.backend = self._open(backend)
        self._init_geometry()

    # ------------------------------------------------------------------ opening
    def _open(self, backend: Backend) -> str:
        order = ["openslide", "tiffslide", "image"] if backend == "auto" else [backend]
        errors = []
        for name in order:
            try:
                if name == "openslide":
                    import openslide

                    self._handle = openslide.OpenSlide(str(self.path))
                elif name == "tiffslide":
                    import tiffslide

                    self._handle = tiffslide.TiffSlide(str(self.path))
                    _ = self._handle.level_dimensions  # force parsing
                elif name == "image":
                    self._image = _load_single_level(self.path)
                else:
                    raise ValueError(f"unknown backend {name!r}; choose auto, openslide, tiffslide or image")
                return name
            except Exception as e:  # noqa: BLE001 - try the next backend
                errors.append(f"{name}: {type(e).__name__}: {e}")
                self._handle = None
        raise SlideReadError(f"Cannot open slide {self.path} with any reader backend:\n  " + "\n  ".join(errors))

    def _init_geometry(self) -> None:
        if self.backend == "image":
            h, w = self._image.shape[:2]
            self.level_dimensions = [(int(w), int(h))]
            self.level_downsamples = [1.0]
            self.properties: dict[str, str] = {}
        else:
            self.level_dimensions = [tuple(int(v) for v in d) for d in self._handle.level_dimensions]
            self.level_downsamples = [float(d) for d in self._handle.level_downsamples]
            self.properties = {k: str(v) for k, v in dict(self._handle.properties).items() if v is not None}
        self.mpp, self.mpp_source = self._find_mpp()
        w0, h0 = self.level_dimensions[0]
        p = self.properties
        bx = _float(p.get("openslide.bounds-x")) or 0
        by = _float(p.get("openslide.bounds-y")) or 0
        bw = _float(p.get("openslide.bounds-width")) or (w0 - bx)
        bh = _float(p.get("openslide.bounds-height")) or (h0 - by)
        self.bounds = (int(bx), int(by), int(min(bw, w0 - bx)), int(min(bh, h0 - by)))

    def _find_mpp(self) -> tuple[float | None, str | None]:
        if self._mpp_override is not None:
            return self._mpp_override, "override"
        p = self.properties
        cands: list[tuple[float | None, str]] = [
            (_float(p.get("openslide.mpp-x")), "metadata"),
            (_float(p.get("tiffslide.mpp-x")), "metadata"),
            (mpp_from_aperio_description(p.get("openslide.comment") or p.get("tiffslide.comment")),
             "aperio-description"),
            (mpp_from_tiff_tags(p.get("tiff.XResolution"), p.get("tiff.ResolutionUnit")), "tiff-tags"),
        ]
        if self.backend != "openslide":
            cands.append((self._mpp_from_file(), "tiff-tags"))
        for value, source in cands:
            if value is None:
                continue
            if _plausible(value):
                return value, source
            warnings.warn(
                f"{self.path.name}: ignoring implausible resolution {value:g} um/px ({source}); "
                f"pass --mpp to set it", stacklevel=3)
        if self._default_mpp is not None:
            return self._default_mpp, "default"
        return None, None

    def _mpp_from_file(self) -> float | None:
        try:
            import tifffile

            with tifffile.TiffFile(self.path) as tf:
                page = tf.pages[0]
                aperio = mpp_from_aperio_description(page.description)
                if aperio:
                    return aperio
                xr = page.tags.get("XResolution")
                ru = page.tags.get("ResolutionUnit")
                if xr is None:
                    return None
                num, den = xr.value
                return mpp_from_tiff_tags(num / den if den else None, int(ru.value) if ru is not None else 2)
        except Exception:  # noqa: BLE001 - not a TIFF
            pass
        try:
            with Image.open(self.path) as im:
                dpi = im.info.get("dpi")
            if dpi and _float(dpi[0]):
                return 25400.0 / float(dpi[0])
        except Exception:  # noqa: BLE001
            pass
        return None

    # ------------------------------------------------------------------ public
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)`` in px."""
        return self.level_dimensions[0]

    def require_mpp(self) -> float:
        """Return level-0 mpp (um/px).

        Raises:
            MissingMppError: the slide has no usable resolution metadata; the message
                names the slide and the ``--mpp`` override.
        """
        if self.mpp is None:
            raise MissingMppError(
                f"Slide {self.path} has no microns-per-pixel (mpp) metadata (no openslide.mpp-x, "
                f"Aperio MPP or TIFF resolution tags). Pass its level-0 resolution with "
                f"--mpp <um/px> (e.g. --mpp 0.5 for a 20x scan; 40x scanners are ~0.25), or "
                f"--default-mpp <um/px> to apply it only to slides without metadata."
            )
        return self.mpp

    def level_mpp(self, level: int) -> float:
        """mpp (um/px) of pyramid ``level``; raises MissingMppError when unknown."""
        return self.require_mpp() * self.level_downsamples[level]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read a region as RGB.

        Args:
            location: ``(x, y)`` top-left corner in **level-0** px (may lie outside).
            level: pyramid level to read from.
            size: ``(width, height)`` in px **at ``level``**.

        Returns:
            ``uint8`` array of shape ``(height, width, 3)``; pixels outside the slide are
            white (255) on every backend.

        Raises:
            SlideReadError: decoding failed (e.g. a corrupt JPEG tile). The message names
                the slide and the level-0 coordinates; the reader stays usable.
            ValueError: bad level or size.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range for {self.path.name} ({self.level_count} levels)")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        x, y = int(location[0]), int(location[1])
        self._check_streams(x, y, level, w, h)
        try:
            if self.backend == "image":
                out = _crop_padded(self._image, x, y, w, h)
            else:
                region = np.asarray(self._handle.read_region((x, y), level, (w, h)))
                out = _to_rgb_white(region)
        except Exception as e:  # noqa: BLE001
            if self.backend == "openslide":
                self._reopen()
            raise SlideReadError(
                f"{self.path.name}: cannot decode region at level-0 (x={x}, y={y}), level {level}, "
                f"size {w}x{h}: {type(e).__name__}: {e}") from e
        return self._whiten_outside(out, x, y, level)

    def _check_streams(self, x: int, y: int, level: int, w: int, h: int) -> None:
        """Raise SlideReadError when the region touches a tile with a damaged stream
        (:func:`tiff_bad_tile_streams`, computed once per level)."""
        if self.backend == "image":
            return
        if level not in self._stream_checks:
            self._stream_checks[level] = tiff_bad_tile_streams(self.path, self.level_dimensions[level])
        check = self._stream_checks[level]
        if not check or not check[1]:
            return
        (tw, th), bad = check
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        for row in range(max(ly, 0) // th, max(ly + h - 1, 0) // th + 1):
            for col in range(max(lx, 0) // tw, max(lx + w - 1, 0) // tw + 1):
                if (col, row) in bad:
                    raise SlideReadError(
                        f"{self.path.name}: region at level-0 (x={x}, y={y}), level {level}, size {w}x{h} "
                        f"touches TIFF tile (column {col}, row {row}) of that level whose {bad[(col, row)]}; "
                        "its pixels would be garbage, so the region is not used")

    def _whiten_outside(self, arr: np.ndarray, x: int, y: int, level: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        wk, hk = self.level_dimensions[level]
        lx, ly = int(math.floor(x / ds)), int(math.floor(y / ds))
        h, w = arr.shape[:2]
        if lx >= 0 and ly >= 0 and lx + w <= wk and ly + h <= hk:
            return arr
        arr = arr.copy()
        cols = np.arange(lx, lx + w)
        rows = np.arange(ly, ly + h)
        arr[:, (cols < 0) | (cols >= wk)] = BACKGROUND
        arr[(rows < 0) | (rows >= hk), :] = BACKGROUND
        return arr

    def _reopen(self) -> None:
        import openslide

        try:
            self._handle.close()
        except Exception:  # noqa: BLE001
            pass
        self._handle = openslide.OpenSlide(str(self.path))

    def get_thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, tuple[float, float]]:
        """Thumbnail of the whole level 0, at most ``max_size`` px on its long side.

        Returns:
            ``(thumb, (sx, sy))``: RGB ``uint8`` array ``(h, w, 3)`` and the scale in
            level-0 px per thumbnail px along x and y.
        """
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_size
        if scale < 1:
            scale = 1.0
        if self.backend == "image":
            im = Image.fromarray(self._image)
            im.thumbnail((max_size, max_size), Image.Resampling.BOX)
        else:
            try:
                im = self._handle.get_thumbnail((max_size, max_size))
            except Exception as e:  # noqa: BLE001 - a corrupt tile in the level used
                if self.backend == "openslide":
                    self._reopen()
                im = self._thumbnail_blockwise(max_size, e)
        thumb = _to_rgb_white(np.asarray(im))
        th, tw = thumb.shape[:2]
        return thumb, (w0 / tw, h0 / th)

    def _thumbnail_blockwise(self, max_size: int, cause: Exception, block: int = 512) -> Image.Image:
        """Thumbnail from the coarsest level read block by block; undecodable blocks are
        left white (with a warning) so one corrupt tile cannot stop tissue detection."""
        level = self.level_count - 1
        wk, hk = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        canvas = np.full((hk, wk, 3), BACKGROUND, np.uint8)
        bad = 0
        for y in range(0, hk, block):
            for x in range(0, wk, block):
                w, h = min(block, wk - x), min(block, hk - y)
                try:
                    canvas[y:y + h, x:x + w] = self.read_region((int(x * ds), int(y * ds)), level, (w, h))
                except SlideReadError:
                    bad += 1
        warnings.warn(f"{self.path.name}: thumbnail built block-wise from level {level} after "
                      f"{type(cause).__name__}: {cause}; {bad} undecodable block(s) left white", stacklevel=3)
        im = Image.fromarray(canvas)
        im.thumbnail((max_size, max_size), Image.Resampling.BOX)
        return im

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._image = None

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SlideReader({self.path.name!r}, backend={self.backend}, levels={self.level_dimensions}, "
                f"mpp={self.mpp})")


def open_slide(path: str | Path, mpp: float | None = None, backend: Backend = "auto",
               default_mpp: float | None = None) -> SlideReader:
    """Open a slide; see :class:`SlideReader`. ``mpp`` (um/px) overrides metadata;
    ``default_mpp`` is used only where the metadata has none."""
    return SlideReader(path, mpp=mpp, backend=backend, default_mpp=default_mpp)


# ---------------------------------------------------------------------- helpers
def _to_rgb_white(arr: np.ndarray) -> np.ndarray:
    """RGB/RGBA/grey array -> RGB uint8, transparent pixels composited onto white."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * a + BACKGROUND * (1.0 - a)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8, copy=False)


def _crop_padded(img: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    H, W = img.shape[:2]
    out = np.full((h, w, 3), BACKGROUND, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = img[y0:y1, x0:x1]
    return out


def _load_single_level(path: Path) -> np.ndarray:
    """Decode a single-level image (PNG/JPEG/strip TIFF) to RGB uint8."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
        if arr.dtype != np.uint8:
            from jwth.data.tiles import TileError, to_uint8

            try:
                arr, _ = to_uint8(arr, path)  # scaled by the samples' actual range, or refused
            except TileError as e:
                raise SlideReadError(str(e)) from e
        return _to_rgb_white(arr)
    with Image.open(path) as im:
        im.load()
        return _to_rgb_white(np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")))
