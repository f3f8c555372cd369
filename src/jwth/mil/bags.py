"""Bags of instance embeddings for multiple-instance learning (MIL).

A bag is a set of tile embeddings with one label: a slide (from the per-slide HDF5
files of ``jwth extract-slides``) or a patient (all tiles of a patient in a tile
token cache made by ``jwth extract``, e.g. ``tcga_crc_msi``). Instance embeddings:

- ``cls``: the class token, ``(n, D)`` -- what a linear probe uses;
- ``jwth``: ``[class token, class-attention-pooled patch tokens]``, ``(n, 2D)``;
- ``cls+mean``: ``[class token, mean patch token]``, ``(n, 2D)`` (Virchow2).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from jwth.data.labels import read_table, validate_labels
from jwth.wsi.extract import EMBEDDINGS, FeatureFileError, embed_tokens, feature_file_problem

_TCGA_PATIENT = re.compile(r"(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)


def patient_from_barcode(name: str) -> str | None:
    """TCGA patient (case) barcode ``TCGA-XX-XXXX`` inside a slide id / file name, or None.

    ``TCGA-3L-AA1B-01Z-00-DX1`` and ``blk-ABC-TCGA-3L-AA1B-01Z-00-DX2.jpg`` both give
    ``TCGA-3L-AA1B``.
    """
    m = _TCGA_PATIENT.search(str(name))
    return m.group(1).upper() if m else None


@dataclass
class Bags:
    """A cohort of bags.

    Attributes:
        features: one ``(n_i, E)`` float32 array per bag.
        labels: ``(B,)`` int class index per bag.
        bag_ids: bag names (slide or patient ids).
        patients: ``(B,)`` patient of each bag (the unit of splitting and bootstrap).
        class_names: label names, index = class.
        embedding: instance embedding kind (``cls``, ``jwth``, ``cls+mean``).
        coords: optional ``(n_i, 2)`` level-0 coords per bag (slide bags), for heatmaps.
        skipped: ``{reason: count}`` of bags left out while building (never silent).
    """

    features: list[np.ndarray]
    labels: np.ndarray
    bag_ids: list[str]
    patients: np.ndarray
    class_names: list[str]
    embedding: str
    coords: list[np.ndarray] | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.features)
        if not (len(self.labels) == len(self.bag_ids) == len(self.patients) == n):
            raise ValueError("features, labels, bag_ids and patients must have one entry per bag")
        if n and len({f.shape[1] for f in self.features}) != 1:
            raise ValueError("all bags must have the same embedding width")
        if any(len(f) == 0 for f in self.features):
            raise ValueError("empty bag: drop bags without instances before building Bags")

    @property
    def n_bags(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features[0].shape[1])

    @property
    def sizes(self) -> np.ndarray:
        """``(B,)`` instances per bag."""
        return np.array([len(f) for f in self.features])

    def summary(self) -> dict:
        """Counts and bag-size medians per class (to see bag-size leakage)."""
        out = {"n_bags": self.n_bags, "n_patients": int(len(set(self.patients))), "dim": self.dim,
               "embedding": self.embedding, "skipped": dict(self.skipped), "classes": {}}
        for c, name in enumerate(self.class_names):
            s = self.sizes[self.labels == c]
            out["classes"][name] = {"bags": int(len(s)), "instances": int(s.sum()),
                                    "median_bag_size": float(np.median(s)) if len(s) else 0.0}
        return out


def _encode_labels(values: list, class_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    names = class_names or sorted({str(v) for v in values})
    idx = {n: i for i, n in enumerate(names)}
    missing = sorted({str(v) for v in values} - set(names))
    if missing:
        raise ValueError(f"labels {missing} not in class_names {names}")
    return np.array([idx[str(v)] for v in values], np.int64), names


def instance_embeddings_from_cache(cache, embedding: str, batch_size: int = 256) -> np.ndarray:
    """All tiles' instance embeddings from a :class:`jwth.cache.TokenCache`.

    Returns:
        ``(n_tiles, E)`` float32 in cache row order (``E = D`` or ``2D``).

    Raises:
        ValueError: unknown embedding, or a token cache without patch tokens for
            ``jwth`` / ``cls+mean``.
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"Unknown embedding {embedding!r}; choose one of {EMBEDDINGS}.")
    if embedding == "cls":
        return np.asarray(cache.read_cls(np.arange(cache.n_tiles)), np.float32)
    out = []
    for _, cls, patches in cache.iter_batches(batch_size):
        with torch.no_grad():
            e = embed_tokens(torch.as_tensor(cls, dtype=torch.float32),
                             torch.as_tensor(patches, dtype=torch.float32), embedding)
        out.append(e.numpy().astype(np.float32))
    return np.concatenate(out, 0)


def bags_from_token_cache(
    cache_dir: str | Path,
    embedding: str = "cls",
    group_by: str = "patient_id",
    label_col: str = "label",
    class_names: list[str] | None = None,
    batch_size: int = 256,
) -> Bags:
    """Patient bags from a tile token cache (``jwth extract``).

    Args:
        cache_dir: folder of a :class:`jwth.cache.TokenCache`.
        embedding: ``cls``, ``jwth`` or ``cls+mean``.
        group_by: tile column naming the bag (``patient_id``; a missing/empty value is
            derived from a TCGA barcode in the tile path).
        label_col: tile column with the bag label (must be constant within a bag).
        class_names: label order (default: sorted).

    Raises:
        ValueError: a bag whose tiles carry different labels, or no patient id at all.
    """
    from jwth.cache import TokenCache

    cache = TokenCache.open(cache_dir)
    tiles = cache.tiles.reset_index(drop=True)
    feats = instance_embeddings_from_cache(cache, embedding, batch_size)
    return _group(feats, tiles, embedding, group_by, label_col, class_names, source=str(cache_dir))


def _group(feats, tiles: pd.DataFrame, embedding, group_by, label_col, class_names, source) -> Bags:
    if label_col not in tiles.columns:
        raise ValueError(f"{source}: no label column {label_col!r}; columns are {list(tiles.columns)}")
    if group_by in tiles.columns:
        groups = tiles[group_by].astype("string")
    else:
        groups = pd.Series([pd.NA] * len(tiles), dtype="string")
    need = groups.isna() | (groups.str.strip() == "")
    if need.any():
        src = tiles["path"] if "path" in tiles.columns else pd.Series([""] * len(tiles))
        derived = src[need].map(patient_from_barcode)
        if derived.isna().any():
            bad = src[need][derived.isna()].iloc[0]
            raise ValueError(f"{source}: no {group_by!r} for tile {bad!r} and no TCGA barcode in its path; "
                             f"add a {group_by} column to the labels")
        groups[need] = derived
    checked = pd.DataFrame({"id": tiles["path"] if "path" in tiles.columns else tiles.index.astype(str),
                            "label": tiles[label_col].astype(str), "group": groups.astype(str)})
    validate_labels(checked, source, "id", "label", group_col="group", classes=class_names, group_what="bag")
    labels_by_bag, bag_rows = {}, {}
    for i, (g, lab) in enumerate(zip(groups, tiles[label_col].astype(str))):  # one label per bag: checked above
        labels_by_bag[g] = lab
        bag_rows.setdefault(g, []).append(i)
    ids = sorted(bag_rows)
    y, names = _encode_labels([labels_by_bag[g] for g in ids], class_names)
    patients = np.array([patient_from_barcode(g) or g for g in ids]) if group_by != "patient_id" else np.array(ids)
    return Bags(features=[feats[bag_rows[g]] for g in ids], labels=y, bag_ids=ids, patients=patients,
                class_names=names, embedding=embedding)


def read_slide_features(h5_path: str | Path, embedding: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features, coords and attributes of one slide ``.h5`` (``jwth extract-slides`` / CLAM / TRIDENT).

    Args:
        h5_path: the file.
        embedding: wanted instance embedding. ``cls`` is sliced from a ``jwth`` or
            ``cls+mean`` file (its first ``embed_dim`` columns); None keeps the file's.

    Returns:
        ``(features (N, E) float32, coords (N, 2) int64, attrs dict)``.

    Raises:
        FeatureFileError: the file cannot be opened, lacks ``features``/``coords``, or is
            incomplete (see :func:`jwth.wsi.extract.feature_file_problem`); the message
            names the file and the fix.
        ValueError: the file cannot give ``embedding``.
    """
    problem = feature_file_problem(h5_path)
    if problem is not None:
        raise FeatureFileError(f"{h5_path} {problem}. Re-run `jwth extract-slides` on its slide (it recomputes "
                               "unfinished files), or remove it.")
    with h5py.File(h5_path, "r") as f:
        attrs = {**dict(f["coords"].attrs), **dict(f.attrs)}
        feats = f["features"][()].astype(np.float32)
        coords = f["coords"][()].astype(np.int64)
    have = str(attrs.get("embedding", "cls"))
    if embedding is not None and embedding != have:
        D = int(attrs.get("embed_dim", feats.shape[1]))
        if embedding == "cls" and have in ("jwth", "cls+mean"):
            feats = feats[:, :D]
        else:
            raise ValueError(f"{h5_path} holds {have!r} embeddings; cannot give {embedding!r}. "
                             f"Re-run jwth extract-slides --embedding {embedding}.")
    return feats, coords, attrs


def bags_from_slide_h5(
    features_dir: str | Path,
    labels_csv: str | Path,
    embedding: str | None = None,
    label_col: str = "label",
    slide_col: str = "slide_id",
    patient_col: str = "patient_id",
    group_by: str = "slide",
    class_names: list[str] | None = None,
) -> Bags:
    """Slide (or patient) bags from per-slide HDF5 files and a labels csv.

    Args:
        features_dir: folder of ``<slide_id>.h5`` (``<out>/features`` of extract-slides).
        labels_csv: csv with ``slide_col`` (slide id = file stem; a ``path`` column is
            used when ``slide_col`` is absent), ``label_col`` and optionally ``patient_col``
            (else the patient is derived from a TCGA barcode, else the slide id).
        embedding: see :func:`read_slide_features`.
        group_by: ``slide`` (one bag per slide) or ``patient`` (a patient's slides joined).

    Every column is read as text (slide ``001`` matches ``001.h5``) and the table is
    validated as the probe's (:func:`jwth.data.labels.validate_labels`: empty labels,
    near-duplicate labels, a slide listed twice, unknown classes, one class, a patient
    with two labels). Slides without a features file, with an unreadable or incomplete
    one (:func:`jwth.wsi.extract.feature_file_problem`) or with 0 tiles are skipped and
    counted in ``Bags.skipped`` (and a warning naming the files), never silently.

    Raises:
        ValueError: missing columns, a bad label table, no usable slide, or fewer than
            two classes among the usable slides.
    """
    features_dir, labels_csv = Path(features_dir), Path(labels_csv)
    df = read_table(labels_csv, (label_col,), hint="Pass --label-col to name the label column.")
    if slide_col not in df.columns:
        if "path" not in df.columns:
            raise ValueError(f"{labels_csv}: needs a {slide_col!r} or 'path' column, has {list(df.columns)}")
        df[slide_col] = df["path"].map(lambda p: Path(p).stem)
    derived = df[slide_col].map(lambda s: patient_from_barcode(s) or s)
    if patient_col not in df.columns:
        df[patient_col] = derived
    df[patient_col] = df[patient_col].where(df[patient_col] != "", derived)
    validate_labels(df, labels_csv, slide_col, label_col, group_col=patient_col, classes=class_names,
                    id_what="slide", fix_group=f" (or give each slide its own {patient_col})")
    skipped: dict[str, int] = {}
    unusable: list[str] = []
    rows = []
    for _, r in df.iterrows():
        h5 = features_dir / f"{r[slide_col]}.h5"
        if not h5.exists():
            skipped["no features file"] = skipped.get("no features file", 0) + 1
            continue
        try:
            feats, coords, _ = read_slide_features(h5, embedding)
        except FeatureFileError as e:
            skipped["unreadable or incomplete file"] = skipped.get("unreadable or incomplete file", 0) + 1
            unusable.append(str(e))
            continue
        if len(feats) == 0:
            skipped["0 tiles"] = skipped.get("0 tiles", 0) + 1
            continue
        rows.append((r[slide_col], r[patient_col], r[label_col], feats, coords))
    if unusable:
        warnings.warn(f"{len(unusable)} features file(s) left out: " + " | ".join(unusable[:5]), stacklevel=2)
    if skipped:
        warnings.warn(f"bags from {features_dir}: skipped {skipped}", stacklevel=2)
    if not rows:
        raise ValueError(f"No usable slide in {features_dir} for {labels_csv} (skipped: {skipped}); slide ids "
                         f"are matched to file names <{slide_col}>.h5, e.g. {df[slide_col].iloc[0]}.h5")
    left = sorted({r[2] for r in rows})
    if len(left) < 2:
        raise ValueError(f"Only class {left} is left among the usable slides of {labels_csv} (skipped: {skipped}); "
                         "a classifier needs two. Extract the missing slides first.")
    emb = embedding or "cls"
    if group_by == "slide":
        y, names = _encode_labels([r[2] for r in rows], class_names)
        return Bags([r[3] for r in rows], y, [r[0] for r in rows], np.array([r[1] for r in rows]), names, emb,
                    coords=[r[4] for r in rows], skipped=skipped)
    if group_by != "patient":
        raise ValueError(f"group_by must be 'slide' or 'patient', got {group_by!r}")
    by_patient: dict[str, list] = {}
    for r in rows:
        by_patient.setdefault(r[1], []).append(r)
    ids = sorted(by_patient)
    labs = []
    for p in ids:
        ls = {r[2] for r in by_patient[p]}
        if len(ls) > 1:
            raise ValueError(f"{labels_csv}: patient {p} has slides labelled {sorted(ls)}")
        labs.append(ls.pop())
    y, names = _encode_labels(labs, class_names)
    feats = [np.concatenate([r[3] for r in by_patient[p]]) for p in ids]
    return Bags(feats, y, ids, np.array(ids), names, emb, skipped=skipped)
