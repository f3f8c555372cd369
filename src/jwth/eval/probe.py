"""The frozen-encoder probe protocol on a token cache.

For each outer split (patient-level stratified k-fold, or train-sites/test-sites):
choose lr / weight decay (and with early stopping the epoch count) of each head on
an inner patient split of the training tiles, refit on all training tiles, predict
the test tiles. Out-of-fold predictions
of all folds are pooled and scored at tile level and at patient level (mean tile
probability per patient), with 95 % bootstrap CIs over patients and a paired
bootstrap of each head minus the linear probe.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from jwth.cache import TokenCache
from jwth.eval.metrics import (
    METRICS,
    aggregate_by_patient,
    bootstrap_cis,
    classification_metrics,
    paired_bootstrap,
)
from jwth.eval.splits import inner_split, missing_training_classes, patient_folds, site_split
from jwth.eval.train import Features, HeadTrainConfig, predict, resolve_token_dtype, select_and_fit
from jwth.heads import build_head, normalize_tokens, parse_heads, token_input
from jwth.progress import progress_bar


@dataclass
class ProbeConfig:
    """Everything that defines a probe run (written to config.yaml)."""

    heads: list[str] = field(default_factory=lambda: ["linear", "attention"])
    split: str = "patient"  # "patient" (k-fold) or "site"
    folds: int = 5
    test_sites: list[str] = field(default_factory=list)
    n_boot: int = 1000
    positive_class: str | None = None
    baselines: list[str] = field(default_factory=lambda: ["majority", "colour", "tile-count"])
    stain_shift: list[float] = field(default_factory=list)  # test-time shift strengths, [] = off
    stain_shift_per: str = "tile"  # tile, patient or site: what shares one shift draw
    stain_shift_seed: int = 0
    train: HeadTrainConfig = field(default_factory=HeadTrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProbeOutput:
    results: dict
    oof_prob: dict[str, np.ndarray]
    attention: dict[str, np.ndarray]
    test_mask: np.ndarray
    splits: list = field(default_factory=list)


def load_features(
    cache: TokenCache, kinds: set[str], fp32_budget_bytes: float = 6e9, chunk: int = 512,
    normalized_dtype: torch.dtype = torch.float32,
) -> Features:
    """Read a cache into memory for head training.

    Class tokens as float32; patch tokens of each requested kind (``raw``,
    ``normalized`` = :func:`jwth.heads.normalize_tokens`, computed once here) as
    float32 when all of them fit in ``fp32_budget_bytes``, else float16. With
    ``normalized_dtype=torch.bfloat16`` (bf16 token products in the attention heads,
    :attr:`jwth.eval.train.HeadTrainConfig.token_precision`) the normalised tokens are
    kept in bfloat16, half the memory.
    """
    idx = np.arange(cache.n_tiles)
    feats = Features(cls=torch.from_numpy(cache.read_cls(idx)), normalized_dtype=normalized_dtype)
    kinds = {k for k in kinds if k}
    if not kinds:
        return feats
    N, D = int(cache.manifest["num_patches"]), cache.embed_dim
    dtype = torch.float32 if len(kinds) * cache.n_tiles * N * D * 4 <= fp32_budget_bytes else torch.float16
    raw = torch.empty((cache.n_tiles, N, D), dtype=dtype) if "raw" in kinds else None
    ndtype = torch.bfloat16 if normalized_dtype == torch.bfloat16 else dtype
    normed = torch.empty((cache.n_tiles, N, D), dtype=ndtype) if "normalized" in kinds else None
    for s in range(0, cache.n_tiles, chunk):
        p = torch.from_numpy(cache.read_patches_f16(idx[s : s + chunk])).float()
        if raw is not None:
            raw[s : s + chunk] = p
        if normed is not None:
            normed[s : s + chunk] = normalize_tokens(p)
    feats.patches, feats.patches_normalized = raw, normed
    return feats


def summarize(y: np.ndarray, prob: np.ndarray, patients: np.ndarray, n_boot: int, seed: int) -> dict:
    """Tile- and patient-level metrics with 95 % bootstrap CIs over patients.

    Args:
        y: class index per tile (T,); prob: class probabilities (T, C); patients: (T,).

    Returns:
        ``{"tile": {...}, "patient": {...}}`` as in docs/results-schema.md.
    """
    out = {}
    tile = classification_metrics(y, prob)
    for m, ci in bootstrap_cis(y, prob, patients, METRICS, n_boot, seed).items():
        tile[f"{m}_ci"] = list(ci)
    tile["n"] = int(len(y))
    pp, yp, _ = aggregate_by_patient(prob, y, patients)
    pat = classification_metrics(yp, pp)
    for m, ci in bootstrap_cis(yp, pp, None, METRICS, n_boot, seed).items():
        pat[f"{m}_ci"] = list(ci)
    pat["n"] = int(len(yp))
    out["tile"], out["patient"] = tile, pat
    return out


def make_splits(y: np.ndarray, patients: np.ndarray, sites: np.ndarray, cfg: ProbeConfig, classes: list[str]):
    """The outer splits of ``cfg`` and each one's inner (fit, validation) split.

    Cheap: ``jwth probe`` calls it before extraction so that an impossible split fails
    before any token is computed.

    Returns:
        list of (train_idx, test_idx, fit_idx, val_idx).

    Raises:
        ValueError: unknown split kind, missing/unknown test sites, too few patients.
    """
    if cfg.split == "patient":
        outer = patient_folds(y, patients, cfg.folds, cfg.train.seed, class_names=classes)
    elif cfg.split == "site":
        if not cfg.test_sites:
            raise ValueError("--split site needs --test-sites (comma-separated site codes).")
        outer = site_split(y, patients, sites, cfg.test_sites)
    else:
        raise ValueError(f"Unknown split {cfg.split!r}; choose patient or site.")
    out = []
    for k, (tr, te) in enumerate(outer):
        fit, val = inner_split(y, patients, tr, seed=cfg.train.seed + k, class_names=classes)
        out.append((tr, te, fit, val))
    return out


def _shift_curves(cfg: ProbeConfig, y, patients, splits, tested, oof, oof_shift, colour_shift, shift_feats) -> dict:
    """The stain-shift curves of the heads (and of the colour baseline when it ran on shifted tiles)."""
    from jwth.eval.stain_shift import shift_config, summarize_shift

    base = {h: p[tested] for h, p in oof.items()}
    shifted = {s: {h: p[tested] for h, p in per.items()} for s, per in oof_shift.items()}
    if colour_shift:
        # the colour baseline's probabilities come in the order of the concatenated test indices
        order = np.concatenate([sp[1] for sp in splits])
        pos = np.empty(int(order.max()) + 1, dtype=np.int64)
        pos[order] = np.arange(len(order))
        base["colour"] = colour_shift[0.0][pos[tested]]
        for s, per in shifted.items():
            per["colour"] = colour_shift[s][pos[tested]]
    return summarize_shift(y[tested], patients[tested], base, shifted,
                           {sf.strength: sf.delta_e for sf in shift_feats}, cfg.n_boot, cfg.train.seed,
                           {"per": cfg.stain_shift_per, "seed": cfg.stain_shift_seed,
                            "config": shift_config(1.0).to_dict()},
                           {sf.strength: sf.token_shift for sf in shift_feats})


def run_probe(
    cache: TokenCache, cfg: ProbeConfig, quiet: bool = False, tiles=None, classes=None,
    feats: Features | None = None, splits: list | None = None, colour_cls: np.ndarray | None = None,
    shifted=None,
) -> ProbeOutput:
    """Run the protocol on a complete token cache.

    Labels, patients and sites come from ``tiles`` (a table aligned with the cache rows,
    from the current label file and column options) when given, else from the table
    stored with the cache. ``jwth benchmark`` passes features loaded once (``feats``)
    and its own ``splits`` (tile indices into the cache rows; tiles outside them may
    have no label). ``colour_cls`` (T, 72), the ``baseline:colour`` features of the
    same rows, feeds the colour baseline (:mod:`jwth.eval.baselines`). ``shifted``, a
    :class:`jwth.eval.stain_shift.ShiftedTokens`, adds the test-time stain-shift curve
    (``results["stain_shift"]``): every trained head also predicts the shifted test tiles.

    Returns:
        :class:`ProbeOutput` with the results dict (schema in docs/results-schema.md),
        out-of-fold probabilities per head (T, C) (NaN rows for tiles never tested),
        head-averaged attention (T, N) for attention heads, and the tested-tile mask.

    Raises:
        ValueError: unknown heads, a split impossible for these labels, or a cache
            without patch tokens for heads that need them.
    """
    heads = parse_heads(cfg.heads)
    tiles = cache.tiles if tiles is None else tiles
    if classes is None:
        classes = list(cache.manifest.get("classes") or sorted(tiles["label"].unique()))
    lookup = {c: i for i, c in enumerate(classes)}
    y = tiles["label"].map(lookup).fillna(-1).to_numpy(np.int64)  # -1: outside the given splits
    patients = tiles["patient_id"].to_numpy()
    sites = tiles["site"].to_numpy()
    C = len(classes)
    kinds = {token_input(h) for h in heads} - {None}
    need_patches = bool(kinds)
    if need_patches and not cache.has_patches:
        raise ValueError(f"Heads {heads} need patch tokens but cache {cache.folder} has none; re-extract without --no-patches.")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.time()
    token_dtype = resolve_token_dtype(cfg.train.token_precision) if "normalized" in kinds else torch.float32
    if feats is None:
        feats = load_features(cache, kinds, normalized_dtype=token_dtype)
    feats.normalized_dtype = token_dtype
    load_s = time.time() - t0

    splits = make_splits(y, patients, sites, cfg, classes) if splits is None else splits
    split_warnings = missing_training_classes(y, splits, classes)
    shift_feats = []
    if shifted is not None:
        shift_feats = shifted.get(np.unique(np.concatenate([sp[1] for sp in splits])), colour_cls)
        for sf in shift_feats:
            sf.feats.normalized_dtype = token_dtype
    oof_shift = {sf.strength: {h: np.full((cache.n_tiles, len(classes)), np.nan) for h in heads} for sf in shift_feats}

    T, N = cache.n_tiles, int(cache.manifest.get("num_patches", 0))
    oof = {h: np.full((T, C), np.nan) for h in heads}
    attn = {h: np.full((T, N), np.nan, dtype=np.float32) for h in heads if h in ("attention", "learned-query")}
    per_fold: dict[str, list] = {h: [] for h in heads}
    train_seconds = {h: 0.0 for h in heads}
    test_mask = np.zeros(T, dtype=bool)
    D = cache.embed_dim
    with progress_bar("train heads", total=len(splits) * len(heads), unit="heads", disable=quiet) as bar:
        for k, (tr, te, fit_idx, val_idx) in enumerate(splits):
            test_mask[te] = True
            for h in heads:
                t1 = time.time()

                def make(h=h):
                    torch.manual_seed(cfg.train.seed)
                    return build_head(h, D, C, cfg.train.num_heads, cfg.train.dropout)

                model, info = select_and_fit(make, feats, y, fit_idx, val_idx, tr, cfg.train, C)
                train_seconds[h] += time.time() - t1
                p, a = predict(model, feats, te, keep_attention=h in attn)
                oof[h][te] = p
                for sf in shift_feats:
                    oof_shift[sf.strength][h][te] = predict(model, sf.feats, sf.index(te))[0]
                if a is not None:
                    attn[h][te] = a
                fm = classification_metrics(y[te], p)
                pp, yp, _ = aggregate_by_patient(p, y[te], patients[te])
                per_fold[h].append(
                    {
                        "fold": k,
                        "n_test_tiles": int(len(te)),
                        "n_test_patients": int(len(set(patients[te]))),
                        "tile_bacc": fm["bacc"],
                        "tile_auroc": fm["auroc"],
                        "patient_bacc": classification_metrics(yp, pp)["bacc"],
                        "lr": info["lr"],
                        "weight_decay": info["weight_decay"],
                        "epochs": info["epochs"],
                    }
                )
                bar.advance(1)

    tested = np.flatnonzero(test_mask)
    yt, pt = y[tested], patients[tested]
    results: dict = {"heads": {}, "comparisons": {}}
    seed = cfg.train.seed
    for h in heads:
        s = summarize(yt, oof[h][tested], pt, cfg.n_boot, seed)
        folds_bacc = [f["tile_bacc"] for f in per_fold[h]]
        s["folds"] = per_fold[h]
        s["fold_tile_bacc_mean"] = float(np.mean(folds_bacc))
        s["fold_tile_bacc_sd"] = float(np.std(folds_bacc))
        s["train_seconds"] = round(train_seconds[h], 2)
        results["heads"][h] = s
    if "linear" in heads:
        pp_lin, yp, _ = aggregate_by_patient(oof["linear"][tested], yt, pt)
        for h in heads:
            if h == "linear":
                continue
            pp_h, _, _ = aggregate_by_patient(oof[h][tested], yt, pt)
            results["comparisons"][f"{h}-minus-linear"] = {
                "metric": "bacc",
                "tile": paired_bootstrap(yt, oof[h][tested], oof["linear"][tested], pt, "bacc", cfg.n_boot, seed),
                "patient": paired_bootstrap(yp, pp_h, pp_lin, None, "bacc", cfg.n_boot, seed),
            }
    colour_shift: dict = {}
    if cfg.baselines:
        from jwth.eval.baselines import run_baselines

        shifted_colour = {sf.strength: sf.colour for sf in shift_feats if sf.colour is not None}
        results["baselines"] = run_baselines(cfg, y, patients, splits, classes, colour_cls, quiet=quiet,
                                             colour_shifted=shifted_colour, shift_out=colour_shift)
    if shift_feats:
        results["stain_shift"] = _shift_curves(cfg, y, patients, splits, tested, oof, oof_shift, colour_shift,
                                               shift_feats)
    results["warnings"] = split_warnings
    results["classes"] = classes
    results["n_tiles"] = int(len(tested))
    results["n_patients"] = int(len(set(pt)))
    results["n_sites"] = int(len(set(sites[tested])))
    results["split"] = {"kind": cfg.split, "folds": len(splits), "test_sites": cfg.test_sites}
    results["head_token_dtype"] = str(token_dtype).removeprefix("torch.")
    results["timing_seconds"] = {"load_cache": round(load_s, 2), "total": round(time.time() - t0, 2)}
    return ProbeOutput(results=results, oof_prob=oof, attention=attn, test_mask=test_mask, splits=splits)
