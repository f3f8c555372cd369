"""Test-time stain shift: how a probe's heads hold up when the test tiles' colours move.

The system description names the failure signature of a stain-sensitive encoder: a
large gap between colour-normalised and unnormalised test sets. Our tiles are
colour-normalised upstream, so the gap is made here, in a controlled way:

1. the heads are trained on the unshifted tokens, as in every probe;
2. for each strength s > 0 every test tile is perturbed by
   :func:`jwth.augment.stain_augment` with all three perturbations on (LAB, HSV, HED;
   ``p_lab = p_hsv = p_hed = 1``) and every range multiplied by s, the encoder is run on
   the shifted tiles (a token cache of their own), and the trained heads predict them;
3. strength 0 *is* the unshifted evaluation (the same numbers, not a re-extraction);
4. the drop at each strength is a paired bootstrap over patients of
   BACC(shifted) - BACC(unshifted), the same predictions' tiles on both sides.

The random draw of each tile is seeded by ``(seed, key)`` with key = the tile path
(``per="tile"``), its patient (``per="patient"``) or its site (``per="site"``: one
colour change per centre, as a scanner or a lab's protocol would cause). The shift is
applied to the decoded tile before the encoder's resize and normalisation, so every
encoder sees the same shifted pixels, and the uniform variates do not depend on s: at
strength 2 a tile moves in the same direction as at strength 1, twice as far
(:func:`jwth.augment.draw_stain`). In a ``--split site`` run only the test sites'
tiles are shifted: "train on unshifted sites, test on shifted ones".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jwth.augment import StainAugmentConfig, apply_stain, draw_stain

PER_CHOICES = ("tile", "patient", "site")
_KEY_COLUMN = {"tile": "path", "patient": "patient_id", "site": "site"}


#: largest strength accepted: up to 5 every multiplicative factor of :func:`shift_config`
#: stays positive (saturation 1 +- 0.15 s is the first to cross 0, at s = 6.7) and a tile
#: moves in the same direction at every strength; beyond it "twice as far" no longer holds.
MAX_STRENGTH = 5.0


def strength_key(s: float) -> str:
    """The text form of a strength used in folder names and results.json keys (``"0.5"``, ``"1"``)."""
    return format(float(s), ".12g")


def parse_strengths(value: str | Sequence[float] | None) -> list[float]:
    """Strengths from ``"0,0.5,1,2"`` (or a list): sorted, unique, 0 first (added when missing).

    Returns ``[]`` for None (the option was not given: no stain-shift evaluation).

    Raises:
        ValueError: an empty list, a value that is not a finite number in
            [0, :data:`MAX_STRENGTH`] (named), or no strength above 0.
    """
    if value is None:
        return []
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    if not items:
        raise ValueError("--stain-shift is empty; give strengths such as 0,0.5,1,2 (or leave the option out).")
    out = set()
    for v in items:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"--stain-shift: {v!r} is not a number; give strengths such as 0,0.5,1,2.") from None
        if not math.isfinite(f) or f < 0 or f > MAX_STRENGTH:
            raise ValueError(f"--stain-shift: strength {v!r} must be a number in [0, {MAX_STRENGTH:g}] (0 = unshifted; "
                             f"above {MAX_STRENGTH:g} the saturation factor turns negative and the shift is no longer "
                             "a stronger version of the same change).")
        out.add(abs(f))  # -0.0 -> 0.0
    if max(out) == 0:
        raise ValueError("--stain-shift needs at least one strength above 0 (strength 0 is the unshifted evaluation).")
    return sorted(out | {0.0})


def check_shift_keys(df, per: str) -> None:
    """Refuse a per-patient / per-site shift when tiles have no patient / site.

    Args:
        df: tile table with ``path``, ``patient_id`` and ``site`` columns.

    Raises:
        ValueError: ``per`` is unknown, or some tiles have an empty key (they would all
            share one draw), naming the count and the option that fixes it.
    """
    if per not in PER_CHOICES:
        raise ValueError(f"--stain-shift-per {per!r}: choose one of {', '.join(PER_CHOICES)}.")
    col = _KEY_COLUMN[per]
    keys = df[col].astype(str).str.strip()
    empty = int((keys == "").sum() + df[col].isna().sum())
    if empty:
        fix = "--site-col" if per == "site" else "--patient-col"
        raise ValueError(f"--stain-shift-per {per}: {empty} of {len(df)} tiles have no {col} and would share one "
                         f"colour change; name the column with {fix}, or use --stain-shift-per tile.")


def check_shift_options(cfg) -> None:
    """Validate the stain-shift fields of a :class:`jwth.eval.probe.ProbeConfig` (normalising
    ``cfg.stain_shift`` with :func:`parse_strengths`), whether or not a shift is asked for.

    Raises:
        ValueError: bad strengths or an unknown ``stain_shift_per``.
    """
    if cfg.stain_shift_per not in PER_CHOICES:
        raise ValueError(f"--stain-shift-per {cfg.stain_shift_per!r}: choose one of {', '.join(PER_CHOICES)}.")
    if cfg.stain_shift:
        cfg.stain_shift = parse_strengths(cfg.stain_shift)


#: the figures of a stain-shift evaluation (removed when a run folder is reused without one)
FIGURES = ("stain_shift.png", "stain_shift_tiles.png")


def remove_stale_figures(out: Path) -> None:
    """Delete stain-shift figures left in ``out`` by an earlier run with ``--stain-shift``,
    so a folder never shows curves its results.json does not hold."""
    for f in FIGURES:
        (Path(out) / f).unlink(missing_ok=True)


def shift_config(strength: float) -> StainAugmentConfig:
    """The stain perturbation of a test-time shift: defaults of :class:`StainAugmentConfig`,
    every perturbation on (probabilities 1), ranges x ``strength``."""
    return StainAugmentConfig(strength=float(strength), p_lab=1.0, p_hsv=1.0, p_hed=1.0)


@dataclass(frozen=True)
class StainShift:
    """A deterministic stain shift of decoded tiles, keyed by tile, patient or site.

    Picklable (DataLoader workers) and stateless: the draw of a key never depends on
    which tiles were shifted before it or on the process.

    Attributes:
        strength: multiplier of the ranges of :func:`shift_config` (0 = identity).
        seed: seed mixed with each key.
        per: ``tile``, ``patient`` or ``site`` -- what shares one draw.
    """

    strength: float
    seed: int = 0
    per: str = "tile"

    def __post_init__(self) -> None:
        if self.per not in PER_CHOICES:
            raise ValueError(f"--stain-shift-per {self.per!r}: choose one of {', '.join(PER_CHOICES)}.")
        if not math.isfinite(self.strength) or not 0 <= self.strength <= MAX_STRENGTH:
            raise ValueError(f"stain shift strength {self.strength!r} must be a number in [0, {MAX_STRENGTH:g}].")

    def key_column(self) -> str:
        """The tile-table column whose value keys the draw (path, patient_id or site)."""
        return _KEY_COLUMN[self.per]

    def draw_seed(self, key: str) -> int:
        """63-bit seed of ``key``: SHA-256 of (seed, key), stable across processes and machines."""
        h = hashlib.sha256(f"jwth-stain-shift\0{self.seed}\0{key}".encode()).digest()
        return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)

    def draw(self, key: str):
        """The :class:`jwth.augment.StainDraw` (one row) of ``key`` at this strength."""
        g = torch.Generator().manual_seed(self.draw_seed(str(key)))
        return draw_stain(1, shift_config(self.strength), g)

    def apply(self, images: torch.Tensor, key: str) -> torch.Tensor:
        """Shift uint8 tiles (B, 3, H, W) that share ``key`` (one draw for all B)."""
        if self.strength == 0:
            return images
        d = self.draw(key)
        rows = images.shape[0]
        d = type(d)(**{k: v.expand(rows, *v.shape[1:]) for k, v in vars(d).items()})
        return apply_stain(images, d, shift_config(self.strength))

    def __call__(self, img: Image.Image, key: str) -> Image.Image:
        """Shift one decoded RGB tile; strength 0 returns it unchanged (the same object)."""
        if self.strength == 0:
            return img
        x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)[None]
        y = self.apply(x.contiguous(), key)
        return Image.fromarray(y[0].permute(1, 2, 0).numpy())

    def describe(self) -> dict:
        """What a token cache of shifted tiles records (part of its identity)."""
        return {"strength": float(self.strength), "seed": int(self.seed), "per": self.per,
                "config": shift_config(self.strength).to_dict()}


def delta_e(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIE76 colour difference per pixel between two uint8 RGB images (H, W, 3) (skimage LAB)."""
    from skimage.color import rgb2lab

    return np.linalg.norm(rgb2lab(a) - rgb2lab(b), axis=-1)


def measure_delta_e(root: Path, paths: Sequence[str], keys: Sequence[str], shift: StainShift,
                    max_tiles: int = 32) -> dict:
    """Mean and 95th percentile CIE76 ΔE between tiles and their shifted versions.

    Over at most ``max_tiles`` tiles evenly spaced in ``paths``; what "strength s" means in
    colour units on these tiles. Returns ``{"mean": .., "p95": .., "n_tiles": ..}``.
    """
    from jwth.data.tiles import load_tile

    if not len(paths):
        return {"mean": float("nan"), "p95": float("nan"), "n_tiles": 0}
    pick = np.unique(np.linspace(0, len(paths) - 1, min(max_tiles, len(paths))).round().astype(int))
    vals = []
    for i in pick:
        img, _ = load_tile(Path(root) / paths[i])
        a = np.asarray(img.convert("RGB"))
        vals.append(delta_e(a, np.asarray(shift(img, keys[i]))).ravel())
    v = np.concatenate(vals)
    return {"mean": float(v.mean()), "p95": float(np.quantile(v, 0.95)), "n_tiles": len(pick)}


def token_displacement(base: np.ndarray, shifted: np.ndarray, seed: int = 0) -> dict:
    """How far the shift moves each tile's embedding, relative to how far apart tiles are.

    A label-free measure of stain invariance: ``relative`` = mean_i ||z'_i - z_i|| /
    mean_i ||z_i - z_pi(i)|| with pi a fixed random pairing of each tile with another one (0: the
    encoder ignores the shift; 1: the shift moves a tile as far as a typical other tile
    is). Scale-free, so encoders of any width compare. Also the mean cosine similarity
    of z'_i and z_i.

    Args:
        base, shifted: (n, D) embeddings of the same tiles without and with the shift.

    Returns:
        ``{"relative": float, "cosine": float, "n": int}`` (NaN with fewer than 2 tiles).
    """
    base = np.asarray(base, dtype=np.float64)
    shifted = np.asarray(shifted, dtype=np.float64)
    n = len(base)
    if n < 2:
        return {"relative": float("nan"), "cosine": float("nan"), "n": int(n)}
    perm = np.random.default_rng(seed).permutation(n)
    perm = np.where(perm == np.arange(n), (perm + 1) % n, perm)  # no tile paired with itself
    move = np.linalg.norm(shifted - base, axis=1).mean()
    spread = np.linalg.norm(base - base[perm], axis=1).mean()
    cos = (base * shifted).sum(1) / np.maximum(np.linalg.norm(base, axis=1) * np.linalg.norm(shifted, axis=1), 1e-12)
    return {"relative": float(move / spread) if spread > 0 else float("nan"), "cosine": float(cos.mean()), "n": int(n)}


@dataclass
class ShiftedFeatures:
    """Tokens of stain-shifted tiles for one strength.

    Attributes:
        strength: the shift strength.
        feats: :class:`jwth.eval.train.Features` of the shifted tiles (their own rows).
        rows: (T,) for each row of the unshifted cache, its row in ``feats`` (-1: not shifted).
        colour: (T, 72) ``baseline:colour`` features of the shifted tiles aligned with the
            unshifted cache rows (unshifted values where not shifted), or None.
        delta_e: :func:`measure_delta_e` of this strength.
        token_shift: :func:`token_displacement` of the class tokens.
    """

    strength: float
    feats: object
    rows: np.ndarray
    colour: np.ndarray | None = None
    delta_e: dict | None = None
    token_shift: dict | None = None

    def index(self, idx: np.ndarray) -> np.ndarray:
        """Rows of ``feats`` for unshifted-cache rows ``idx``.

        Raises:
            RuntimeError: a tile of ``idx`` was not shifted (an internal error).
        """
        r = self.rows[idx]
        if (r < 0).any():
            raise RuntimeError(f"{int((r < 0).sum())} test tiles have no shifted tokens at strength {self.strength}.")
        return r


class ShiftedTokens:
    """Extracts (resumably) and loads the shifted tokens a probe or benchmark needs.

    One token cache per strength under ``root`` (``s<strength>-<per>-seed<k>-<tiles hash>``),
    so reruns reuse them and another tile subset never collides with them.

    Args:
        encoder: the probe's frozen encoder.
        table: the :class:`jwth.data.tiles.TileTable` of the unshifted cache.
        cache: the unshifted :class:`jwth.cache.TokenCache` (its row order is the reference).
        root: folder of the shifted caches.
        strengths: from :func:`parse_strengths` (0 is skipped: it is the unshifted cache).
        per, seed: see :class:`StainShift`.
        kinds: patch-token kinds the heads read (``raw`` / ``normalized``).
        colour: also compute the ``baseline:colour`` features of the shifted tiles.
    """

    def __init__(self, encoder, table, cache, root: Path, strengths: Sequence[float], per: str = "tile",
                 seed: int = 0, kinds: set | None = None, colour: bool = False, batch_size: int = 32,
                 num_workers: int = 1, precision: str = "auto", quiet: bool = False) -> None:
        self.encoder, self.table, self.cache, self.root = encoder, table, cache, Path(root)
        self.strengths = [float(s) for s in strengths if s > 0]
        self.per, self.seed, self.kinds, self.colour = per, int(seed), set(kinds or ()), colour
        self.batch_size, self.num_workers, self.precision, self.quiet = batch_size, num_workers, precision, quiet
        StainShift(1.0, seed, per)  # validates per
        self._loaded: tuple[frozenset, list[ShiftedFeatures]] | None = None
        self.extract_seconds = 0.0  # wall time spent extracting and loading shifted tokens

    def get(self, rows: np.ndarray, colour_base: np.ndarray | None = None) -> list[ShiftedFeatures]:
        """Shifted features covering unshifted-cache ``rows`` (extracted on first need).

        Args:
            rows: rows of the unshifted cache to shift (the test tiles).
            colour_base: (T, 72) unshifted colour features, the fill for unshifted rows.
        """
        import time

        need = frozenset(int(r) for r in np.asarray(rows))
        if self._loaded is not None and need <= self._loaded[0]:
            return self._loaded[1]
        t0 = time.time()
        out = [self._load(s, np.array(sorted(need)), colour_base) for s in self.strengths]
        self.extract_seconds += time.time() - t0
        self._loaded = (need, out)
        return out

    def _load(self, strength: float, rows: np.ndarray, colour_base) -> ShiftedFeatures:
        from jwth.cache.extract import extract_tokens
        from jwth.cache.tokens import tiles_hash
        from jwth.eval.probe import load_features

        paths = self.cache.tiles["path"].to_numpy()[rows]
        sub = self.table.subset(self.table.df["path"].isin(set(paths)).to_numpy())
        shift = StainShift(strength, self.seed, self.per)
        keys = sub.df[shift.key_column()].astype(str).tolist()
        ident = tiles_hash(sub.df["path"].tolist() + ["\0"] + keys)[:8]
        tag = f"s{strength_key(strength)}-{self.per}-seed{self.seed}-{ident}"
        if not self.quiet:
            print(f"stain shift {strength:g} (per {self.per}): {len(sub)} test tiles")
        shifted = extract_tokens(self.encoder, sub, self.root / tag, batch_size=self.batch_size,
                                 num_workers=self.num_workers, precision=self._precision(),
                                 store_patches=bool(self.kinds), quiet=self.quiet, image_shift=shift,
                                 tile_checks=self.cache.manifest.get("tile_checks", {}))
        try:
            feats = load_features(shifted, self.kinds)
            pos = {p: i for i, p in enumerate(shifted.tiles["path"])}
            row_of = np.array([pos.get(p, -1) for p in self.cache.tiles["path"]], dtype=np.int64)
        finally:
            shifted.close()
        colour = None
        if self.colour and colour_base is not None:
            colour = self._colour(sub, shift, tag, colour_base)
        de = measure_delta_e(sub.root, sub.df["path"].tolist(), keys, shift)
        have = np.flatnonzero(row_of >= 0)
        moved = token_displacement(self.cache.read_cls(have), feats.cls[torch.as_tensor(row_of[have])].numpy())
        return ShiftedFeatures(strength, feats, row_of, colour, de, moved)

    def _precision(self) -> str:
        """The unshifted cache's autocast precision when ours is ``auto``: shifted and
        unshifted tokens of one curve are never computed at different precisions."""
        from jwth.cache.extract import recorded_precision

        if self.precision != "auto":
            return self.precision
        return recorded_precision(self.cache.folder, next(self.encoder.parameters()).device) or "auto"

    def _colour(self, sub, shift: StainShift, tag: str, colour_base: np.ndarray) -> np.ndarray:
        from jwth.cache.extract import extract_tokens
        from jwth.encoders import load_encoder
        from jwth.eval.baselines import COLOUR_SPEC

        c = extract_tokens(load_encoder(COLOUR_SPEC), sub, self.root / f"{tag}-colour", batch_size=max(self.batch_size, 64),
                           num_workers=self.num_workers, precision="fp32", store_patches=False, quiet=self.quiet,
                           image_shift=shift, tile_checks=self.cache.manifest.get("tile_checks", {}))
        try:
            out = np.array(colour_base, dtype=np.float32, copy=True)
            pos = {p: i for i, p in enumerate(self.cache.tiles["path"])}
            rows = np.array([pos[p] for p in c.tiles["path"]])
            out[rows] = c.read_cls(np.arange(c.n_tiles))
            return out
        finally:
            c.close()


def summarize_shift(y: np.ndarray, patients: np.ndarray, base: dict, shifted: dict, delta_e: dict,
                    n_boot: int, seed: int, shift_info: dict, token_shift: dict | None = None) -> dict:
    """The stain-shift curve of every head (and the colour baseline) with CIs and drops.

    Args:
        y: class index per tested tile (n,); patients: (n,).
        base: ``{name: (n, C) probabilities}`` on unshifted tiles (strength 0).
        shifted: ``{strength: {name: (n, C) probabilities}}`` on shifted tiles.
        delta_e: ``{strength: {"mean", "p95", "n_tiles"}}``.
        shift_info: per, seed, config recorded with the curve.
        token_shift: ``{strength: token_displacement(...)}`` of the class tokens.

    Returns:
        ``{"strengths", "per", "seed", "config", "delta_e", "class_token_shift", "curves":
        {name: [{"strength", "tile": summary, "patient": summary, "drop": {"tile": paired,
        "patient": paired}}]}}`` where summaries are as in :func:`jwth.eval.probe.summarize`,
        ``drop`` is the paired bootstrap of shifted minus unshifted balanced accuracy (0 at
        strength 0; its ``p_le_0`` is the share of resamples where the shift did not raise
        it), and ``delta_e`` / ``class_token_shift`` are keyed by :func:`strength_key`.
    """
    from jwth.eval.metrics import aggregate_by_patient, paired_bootstrap
    from jwth.eval.probe import summarize

    strengths = [0.0] + sorted(shifted)
    curves: dict = {}
    for name, p0 in base.items():
        pp0, yp, _ = aggregate_by_patient(p0, y, patients)
        s0 = summarize(y, p0, patients, n_boot, seed)
        zero = {"diff": 0.0, "ci": [0.0, 0.0], "p_le_0": 1.0, "n_boot": n_boot}
        rows = [{"strength": 0.0, **s0, "drop": {"tile": zero, "patient": zero}}]
        for s in strengths[1:]:
            ps = shifted[s][name]
            pps, _, _ = aggregate_by_patient(ps, y, patients)
            rows.append({
                "strength": s, **summarize(y, ps, patients, n_boot, seed),
                "drop": {"tile": paired_bootstrap(y, ps, p0, patients, "bacc", n_boot, seed),
                         "patient": paired_bootstrap(yp, pps, pp0, None, "bacc", n_boot, seed)},
            })
        curves[name] = rows
    token_shift = token_shift or {}
    n = len(y)
    return {"strengths": strengths, **shift_info,
            "delta_e": {strength_key(s): delta_e.get(s, {"mean": 0.0, "p95": 0.0, "n_tiles": 0}) for s in strengths},
            "class_token_shift": {strength_key(s): token_shift.get(s, {"relative": 0.0, "cosine": 1.0, "n": n})
                                  for s in strengths},
            "curves": curves}


def shift_table(ss: dict) -> str:
    """Markdown table of a stain-shift curve: balanced accuracy [CI] and drop [CI] per strength."""
    from jwth.eval.report import BASELINE_LABELS, _ci, value_ci

    de = ss.get("delta_e", {})
    moved = ss.get("class_token_shift", {})
    lines = [
        (f"Stain shift (per {ss['per']}, seed {ss['seed']}): heads trained on unshifted tiles, test tiles "
         "shifted; drop = paired bootstrap over patients of shifted minus unshifted balanced accuracy."),
        "",
        "| strength | mean ΔE (CIE76) | class-token displacement / inter-tile distance | class-token cosine |",
        "| --- | --- | --- | --- |",
        *[f"| {s:g} | {de.get(strength_key(s), {}).get('mean', float('nan')):.1f} | "
          f"{moved.get(strength_key(s), {}).get('relative', float('nan')):.3f} | "
          f"{moved.get(strength_key(s), {}).get('cosine', float('nan')):.3f} |" for s in ss["strengths"]],
        "",
        "| head | strength | mean ΔE | tile BACC [95% CI] | drop | patient BACC [95% CI] | drop |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rows in ss["curves"].items():
        label = f"baseline: {BASELINE_LABELS.get(name, name)}" if name in BASELINE_LABELS else name
        for r in rows:
            d = de.get(strength_key(r["strength"]), {}).get("mean", float("nan"))
            drops = [f"{r['drop'][lv]['diff']:+.3f} {_ci(r['drop'][lv]['ci'])}" if r["strength"] else "—"
                     for lv in ("tile", "patient")]
            lines.append(f"| {label} | {r['strength']:g} | {d:.1f} | {value_ci(r['tile'], 'bacc')} | {drops[0]} | "
                         f"{value_ci(r['patient'], 'bacc')} | {drops[1]} |")
    return "\n".join(lines)


def plot_shift_curves(path: Path, curves: dict[str, dict], chance: float | None = None) -> None:
    """Balanced accuracy against strength (tile, patient level) and the class-token displacement.

    Args:
        path: PNG to write.
        curves: ``{run label: stain_shift dict}``; one line per head and run (baselines
            dashed, drawn once: they do not depend on the encoder).
        chance: drawn as a dotted line (1 / number of classes).
    """
    from jwth.eval.report import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    markers = "osD^v<>"
    for ax, level in zip(axes[:2], ("tile", "patient")):
        k = 0
        for i, (run, ss) in enumerate(curves.items()):
            for name, rows in ss["curves"].items():
                base = name in ("colour", "majority", "tile-count")
                if base and i > 0:
                    continue
                x = np.array([r["strength"] for r in rows])
                m = np.array([r[level]["bacc"] for r in rows])
                ci = np.array([r[level]["bacc_ci"] for r in rows], dtype=float)
                err = np.abs(np.vstack([m - ci[:, 0], ci[:, 1] - m]))
                label = name if (len(curves) == 1 or base) else f"{run}: {name}"
                ax.errorbar(x + 0.015 * k, m, yerr=np.nan_to_num(err), marker=markers[k % len(markers)],
                            linestyle="--" if base else "-", capsize=3, label=label if level == "tile" else None,
                            alpha=0.6 if base else 1.0, color=f"C{k}")
                k += 1
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance" if level == "tile" else None)
        ax.set_xlabel("stain shift strength")
        ax.set_title(f"{level} level")
        ax.set_ylabel("balanced accuracy (95% CI)")
        ax.grid(alpha=0.3)
    for i, (run, ss) in enumerate(curves.items()):
        moved = ss.get("class_token_shift", {})
        x = [s for s in ss["strengths"]]
        y = [moved.get(strength_key(s), {}).get("relative", np.nan) for s in x]
        axes[2].plot(x, y, marker=markers[i % len(markers)], label=run or "encoder", color="k" if len(curves) == 1 else f"C{i}")
    axes[2].set_title("class-token displacement")
    axes[2].set_ylabel("mean ||z' - z|| / mean inter-tile distance")
    axes[2].set_xlabel("stain shift strength")
    axes[2].grid(alpha=0.3)
    top = np.nanmax([v for line in axes[2].get_lines() for v in line.get_ydata()] + [0.1])
    axes[2].set_ylim(0, top * (1.35 if len(curves) > 1 else 1.1))  # room for the legend above the lines
    if len(curves) > 1:
        axes[2].legend(fontsize=7, loc="upper left")
    first = next(iter(curves.values()))
    de = first.get("delta_e", {})
    ticks = list(first["strengths"])
    for ax in axes:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{s:g}\nΔE {de.get(strength_key(s), {}).get('mean', float('nan')):.0f}" for s in ticks])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=7, frameon=False)
    fig.suptitle(f"stain shift per {first['per']}: heads trained on unshifted tiles, test tiles shifted", fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if len(curves) > 1 else 0.07, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a long legend widens the image instead of being cut
    plt.close(fig)


def run_label(run: str | Path, res: dict, width: int = 40) -> str:
    """A short legend name for a probe run: its encoder spec when that is a registry name
    (``timm:vit_small_patch16_224``), else the run folder's name (a checkpoint folder's path
    says little and may be long), cut to ``width`` characters."""
    spec = str((res.get("encoder") or {}).get("spec", "") or "")
    local = not spec or Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~"))
    name = Path(run).resolve().name if local else spec
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_compared_shift(path: Path, runs: dict[str, Path]) -> tuple[bool, str]:
    """Overlay the stain-shift curves of several probe runs (one line per run and head).

    Only runs whose shifts are the same (strengths, per, seed) are comparable: then the
    figure is written.

    Args:
        runs: ``{label: run folder}``.

    Returns:
        (written, message): the message says what was drawn or why nothing was (empty when
        no run has a curve).
    """
    import json

    curves, chance, missing = {}, None, []
    for label, run in runs.items():
        try:
            res = json.loads((Path(run) / "results.json").read_text())
        except (OSError, ValueError):
            res = {}
        if not res.get("stain_shift"):
            missing.append(label)
            continue
        curves[f"{label}: {run_label(run, res)}"] = res["stain_shift"]
        chance = 1 / len(res["classes"]) if res.get("classes") else chance
    if not curves:
        return False, ""
    if missing:
        return False, f"no stain-shift figure: run(s) {', '.join(missing)} have no stain-shift curve"
    settings = {(tuple(c["strengths"]), c["per"], c["seed"]) for c in curves.values()}
    if len(settings) > 1:
        desc = "; ".join(f"{k}: strengths {list(c['strengths'])}, per {c['per']}, seed {c['seed']}" for k, c in curves.items())
        return False, f"no stain-shift figure: the runs used different shifts ({desc}); rerun with the same --stain-shift options"
    plot_shift_curves(path, curves, chance)
    return True, f"wrote {path} (the runs' stain-shift curves)"


def plot_shift_examples(path: Path, root: Path, tiles, strengths: Sequence[float], per: str = "tile",
                        seed: int = 0, n_tiles: int = 4) -> None:
    """A grid of test tiles (rows) at each shift strength (columns), as the encoder saw them.

    Args:
        tiles: table with ``path`` (and the ``per`` key column) of the shifted tiles.
    """
    from jwth.data.tiles import load_tile
    from jwth.eval.report import _plt

    plt = _plt()
    if len(tiles) == 0:
        return
    pick = np.unique(np.linspace(0, len(tiles) - 1, min(n_tiles, len(tiles))).round().astype(int))
    col = _KEY_COLUMN[per]
    fig, axes = plt.subplots(len(pick), len(strengths), figsize=(1.9 * len(strengths), 1.9 * len(pick)), squeeze=False)
    for r, i in enumerate(pick):
        img, _ = load_tile(Path(root) / tiles["path"].iloc[i])
        key = str(tiles[col].iloc[i])
        for c, s in enumerate(strengths):
            axes[r, c].imshow(np.asarray(StainShift(s, seed, per)(img, key)))
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(f"strength {s:g}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = [
    "PER_CHOICES",
    "ShiftedFeatures",
    "ShiftedTokens",
    "StainShift",
    "delta_e",
    "measure_delta_e",
    "parse_strengths",
    "plot_compared_shift",
    "plot_shift_curves",
    "plot_shift_examples",
    "run_label",
    "shift_config",
    "shift_table",
    "summarize_shift",
    "token_displacement",
]
