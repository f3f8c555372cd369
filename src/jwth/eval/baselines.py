"""Trivial predictors scored on the same splits as the heads, so every table shows the floor.

- ``majority``: predicts the training split's class frequencies (tiles) for every test
  tile; its argmax is the majority class, so balanced accuracy is 1 / C and AUROC 0.5
  whenever the majority class is the same in every fold.
- ``colour``: the linear probe (same training protocol as the heads) on the colour
  statistics of :mod:`jwth.encoders.baselines` (``baseline:colour``).
- ``tile-count``: patient level only; a class-balanced logistic regression on
  log(number of tiles of the patient), fitted on the training patients. On TCGA CRC
  tiles (Kather et al. 2019) MSI patients have more tiles each (median 27 vs 7), so
  bag size alone predicts the label -- any patient- or slide-level number must be read
  against it (see docs/benchmark.md).
"""

from __future__ import annotations

import numpy as np

BASELINES = ("majority", "colour", "tile-count")


def parse_baselines(names: str | list[str] | None) -> list[str]:
    """Split and check a baseline list; ``"none"`` or empty -> [].

    Raises:
        ValueError: an unknown baseline name.
    """
    if names is None:
        return list(BASELINES)
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if items in (["none"], []):
        return []
    unknown = [n for n in items if n not in BASELINES]
    if unknown:
        raise ValueError(f"Unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)} (or none).")
    return list(dict.fromkeys(items))


def majority_prob(y: np.ndarray, train_idx: np.ndarray, n_test: int, num_classes: int) -> np.ndarray:
    """Training class frequencies (tiles) repeated for ``n_test`` rows: (n_test, C)."""
    freq = np.bincount(y[train_idx], minlength=num_classes).astype(np.float64)
    return np.tile(freq / freq.sum(), (n_test, 1))


def bag_sizes(patients: np.ndarray) -> dict:
    """Tiles per patient: ``{patient_id: count}``."""
    ids, counts = np.unique(np.asarray(patients), return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


def tile_count_prob(
    y: np.ndarray, patients: np.ndarray, sizes: dict, train_idx: np.ndarray, test_idx: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bag-size predictor of one split, at patient level.

    Fits ``LogisticRegression(class_weight="balanced")`` on log(tiles per patient) of the
    training patients (one row per patient) and predicts the test patients.

    Args:
        y: class index per tile (T,); one label per patient.
        patients: patient ID per tile (T,).
        sizes: tiles per patient (:func:`bag_sizes`), counted over the whole data set.
        train_idx, test_idx: tile indices of the split.

    Returns:
        (prob (P_test, C), y (P_test,), patient IDs (P_test,)), patients sorted.
    """
    from sklearn.linear_model import LogisticRegression

    def per_patient(idx):
        ids, first = np.unique(patients[idx], return_index=True)
        x = np.log([[sizes[p]] for p in ids])
        return x, y[idx][first], ids

    xtr, ytr, _ = per_patient(train_idx)
    xte, yte, ids = per_patient(test_idx)
    clf = LogisticRegression(class_weight="balanced").fit(xtr, ytr)
    prob = np.zeros((len(ids), num_classes))
    prob[:, clf.classes_] = clf.predict_proba(xte)
    return prob, yte, ids


def _patient_summary(yp: np.ndarray, pp: np.ndarray, n_boot: int, seed: int) -> dict:
    from jwth.eval.metrics import METRICS, bootstrap_ci, classification_metrics

    out = classification_metrics(yp, pp)
    for m in METRICS:
        out[f"{m}_ci"] = list(bootstrap_ci(yp, pp, None, m, n_boot, seed))
    out["n"] = int(len(yp))
    return out


def run_baselines(cfg, y: np.ndarray, patients: np.ndarray, splits: list, classes: list[str],
                  colour_cls: np.ndarray | None = None, quiet: bool = True,
                  colour_shifted: dict | None = None, shift_out: dict | None = None) -> dict:
    """Score the baselines of ``cfg.baselines`` on the probe's own splits.

    Args:
        cfg: the :class:`jwth.eval.probe.ProbeConfig` (baselines, n_boot, head training).
        y: class index per tile (T,), -1 outside the splits.
        patients: patient ID per tile (T,); bag sizes are counted over all T rows.
        splits: (train_idx, test_idx, fit_idx, val_idx) tuples.
        colour_cls: (T, 72) colour statistics for the ``colour`` baseline, or None.
        colour_shifted: ``{strength: (T, 72)}`` colour statistics of stain-shifted tiles
            (:mod:`jwth.eval.stain_shift`); the colour heads trained on ``colour_cls`` also
            predict these, and ``shift_out[strength]`` receives the (n_tested, C)
            probabilities in the order of the concatenated test indices (``shift_out[0.0]``:
            the unshifted ones).

    Returns:
        ``{name: {"tile": summary, "patient": summary}}`` with the summaries of
        ``results.json`` heads (``tile-count`` has ``patient`` only); a baseline that
        could not run is ``{"skipped": reason}``.
    """
    import torch

    from jwth.eval.probe import summarize
    from jwth.eval.train import Features, predict, select_and_fit
    from jwth.heads import build_head

    C, seed = len(classes), cfg.train.seed
    tested = np.concatenate([sp[1] for sp in splits])
    yt, pt = y[tested], patients[tested]
    out: dict = {}
    for name in cfg.baselines:
        if name == "majority":
            prob = np.concatenate([majority_prob(y, sp[0], len(sp[1]), C) for sp in splits])
            out[name] = summarize(yt, prob, pt, cfg.n_boot, seed)
        elif name == "colour":
            if colour_cls is None:
                out[name] = {"skipped": "no colour features were given"}
                continue
            feats = Features(cls=torch.as_tensor(np.asarray(colour_cls, dtype=np.float32)))
            D = feats.cls.shape[1]
            probs = []
            shifted = {s: [] for s in (colour_shifted or {})}
            for tr, te, fit_idx, val_idx in splits:
                def make():
                    torch.manual_seed(seed)
                    return build_head("linear", D, C)

                model, _ = select_and_fit(make, feats, y, fit_idx, val_idx, tr, cfg.train, C)
                probs.append(predict(model, feats, te)[0])
                for s, cs in (colour_shifted or {}).items():
                    shifted[s].append(predict(model, Features(cls=torch.as_tensor(cs, dtype=torch.float32)), te)[0])
            out[name] = summarize(yt, np.concatenate(probs), pt, cfg.n_boot, seed)
            if shift_out is not None and colour_shifted:
                shift_out[0.0] = np.concatenate(probs)
                shift_out.update({s: np.concatenate(v) for s, v in shifted.items()})
        elif name == "tile-count":
            sizes = bag_sizes(patients)
            parts = [tile_count_prob(y, patients, sizes, sp[0], sp[1], C) for sp in splits]
            pp = np.concatenate([p[0] for p in parts])
            yp = np.concatenate([p[1] for p in parts])
            out[name] = {"patient": _patient_summary(yp, pp, cfg.n_boot, seed)}
    return out


COLOUR_SPEC = "baseline:colour"


def colour_features(table, cache, cache_dir, batch_size: int = 64, num_workers: int = 1, quiet: bool = False) -> np.ndarray:
    """``baseline:colour`` class tokens (T, 72) aligned with the rows of ``cache``.

    When ``cache`` is itself a colour cache its class tokens are returned; otherwise the
    colour statistics are extracted (once, resumable) into ``cache_dir`` for the tiles of
    ``cache`` (tiles it skipped stay skipped) and read back in ``cache``'s row order.

    Args:
        table: the :class:`jwth.data.tiles.TileTable` the cache was built from.
        cache: the encoder's complete :class:`jwth.cache.TokenCache`.
        cache_dir: folder of the colour cache.

    Raises:
        whatever :func:`jwth.cache.extract.extract_tokens` raises for bad tiles.
    """
    from jwth.cache.extract import extract_tokens
    from jwth.encoders import load_encoder

    rows = np.arange(cache.n_tiles)
    if cache.manifest.get("encoder_spec", "").startswith(COLOUR_SPEC):
        return cache.read_cls(rows)
    paths = cache.tiles["path"]
    sub = table.subset(table.df["path"].isin(set(paths)).to_numpy())
    colour = extract_tokens(load_encoder(COLOUR_SPEC), sub, cache_dir, batch_size=batch_size,
                            num_workers=num_workers, precision="fp32", store_patches=False, quiet=quiet,
                            label=f"colour statistics {table.root.name}")
    try:
        pos = {p: i for i, p in enumerate(colour.tiles["path"])}
        return colour.read_cls(np.array([pos[p] for p in paths]))
    finally:
        colour.close()
