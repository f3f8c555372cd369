"""Bags from slide HDF5 files and from tile token caches; patients from TCGA barcodes."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from jwth.eval.splits import LeakError, assert_no_leak, patient_folds
from jwth.mil.bags import bags_from_slide_h5, bags_from_token_cache, patient_from_barcode, read_slide_features


def test_patient_from_barcode():
    assert patient_from_barcode("TCGA-3L-AA1B-01Z-00-DX1") == "TCGA-3L-AA1B"
    assert patient_from_barcode("TCGA-3L-AA1B-01Z-00-DX2.svs") == "TCGA-3L-AA1B"
    assert patient_from_barcode("blk-AAAYQHFFEQKF-TCGA-NH-A6GC-06Z-00-DX1.jpg") == "TCGA-NH-A6GC"
    assert patient_from_barcode("tcga-cm-4746-01z") == "TCGA-CM-4746"
    assert patient_from_barcode("CMU-1-Small-Region") is None


def _write_slide(path, n, D=4, embedding="jwth", seed=0):
    rng = np.random.default_rng(seed)
    E = D if embedding == "cls" else 2 * D
    with h5py.File(path, "w") as f:
        f["features"] = rng.normal(size=(n, E)).astype(np.float32)
        c = f.create_dataset("coords", data=np.arange(2 * n).reshape(n, 2) * 224)
        c.attrs["patch_size_level0"] = 224
        f.attrs.update({"embedding": embedding, "embed_dim": D, "n_tiles": n})


@pytest.fixture
def slide_cohort(tmp_path):
    """Two DX slides of one patient, 0-tile and missing slides, 12 single-slide patients."""
    feats = tmp_path / "features"
    feats.mkdir()
    rows = [("TCGA-3L-AA1B-01Z-00-DX1", "MSIMUT", 5), ("TCGA-3L-AA1B-01Z-00-DX2", "MSIMUT", 3),
            ("TCGA-AA-0000-01Z-00-DX1", "MSS", 0)]
    rows += [(f"TCGA-A{i % 2}-{i:04d}-01Z-00-DX1", "MSIMUT" if i % 2 else "MSS", 1 + i) for i in range(1, 13)]
    for k, (sid, _, n) in enumerate(rows):
        _write_slide(feats / f"{sid}.h5", n, seed=k)
    rows.append(("TCGA-ZZ-9999-01Z-00-DX1", "MSS", None))  # no features file
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": [r[0] for r in rows], "label": [r[1] for r in rows]}).to_csv(labels, index=False)
    return feats, labels


def test_slide_bags_patients_and_skips(slide_cohort):
    feats, labels = slide_cohort
    with pytest.warns(UserWarning, match="skipped"):
        bags = bags_from_slide_h5(feats, labels, embedding="jwth")
    assert bags.skipped == {"0 tiles": 1, "no features file": 1}
    assert bags.n_bags == 14 and bags.dim == 8 and bags.class_names == ["MSIMUT", "MSS"]
    i1, i2 = bags.bag_ids.index("TCGA-3L-AA1B-01Z-00-DX1"), bags.bag_ids.index("TCGA-3L-AA1B-01Z-00-DX2")
    assert bags.patients[i1] == bags.patients[i2] == "TCGA-3L-AA1B"  # derived from the barcode
    for tr, te in patient_folds(bags.labels, bags.patients, n_splits=3):
        assert ({i1, i2} <= set(tr)) or ({i1, i2} <= set(te))  # the two DX slides stay together
    with pytest.raises(LeakError):  # a hand-made split with DX1 in train and DX2 in test is refused
        assert_no_leak(bags.patients, np.array([i1]), np.array([i2]))
    assert bags.coords[i1].shape == (5, 2)

    with pytest.warns(UserWarning):
        pat = bags_from_slide_h5(feats, labels, embedding="cls", group_by="patient")
    j = pat.bag_ids.index("TCGA-3L-AA1B")
    assert pat.n_bags == 13 and pat.sizes[j] == 8 and pat.dim == 4
    np.testing.assert_array_equal(pat.features[j][:5], bags.features[i1][:, :4])  # cls = first D columns


def test_slide_features_embedding_checks(tmp_path):
    _write_slide(tmp_path / "a.h5", 3, embedding="cls")
    f, c, a = read_slide_features(tmp_path / "a.h5")
    assert f.shape == (3, 4) and c.shape == (3, 2) and a["embedding"] == "cls"
    with pytest.raises(ValueError, match="--embedding jwth"):
        read_slide_features(tmp_path / "a.h5", "jwth")
    with h5py.File(tmp_path / "b.h5", "w") as g:
        g["feats"] = np.zeros((2, 2))
    with pytest.raises(ValueError, match="CLAM/TRIDENT"):
        read_slide_features(tmp_path / "b.h5")


def test_conflicting_labels_in_a_patient_are_refused(tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    for s in ("TCGA-AB-0001-01Z-00-DX1", "TCGA-AB-0001-01Z-00-DX2"):
        _write_slide(feats / f"{s}.h5", 2)
    lab = tmp_path / "l.csv"
    lab.write_text("slide_id,label\nTCGA-AB-0001-01Z-00-DX1,MSS\nTCGA-AB-0001-01Z-00-DX2,MSIMUT\n")
    with pytest.raises(ValueError, match="TCGA-AB-0001"):
        bags_from_slide_h5(feats, lab, group_by="patient")


@pytest.fixture
def token_cache(tmp_path):
    """A 10-tile token cache (D = 8, 4 patch tokens) over 4 patients, one with a single tile."""
    from jwth.cache.tokens import IDENTITY_KEYS, TokenCache

    tiles = pd.DataFrame({
        "path": [f"img/blk-{i}-TCGA-CM-000{p}-01Z-00-DX1.jpg" for i, p in enumerate([1, 1, 1, 2, 2, 3, 3, 3, 3, 4])],
        "label": ["MSS"] * 3 + ["MSIMUT"] * 2 + ["MSS"] * 4 + ["MSIMUT"],
        "patient_id": ["TCGA-CM-0001"] * 3 + ["TCGA-CM-0002"] * 2 + ["TCGA-CM-0003"] * 4 + [""],
        "site": ["CM"] * 10,
    })
    identity = {k: "test" for k in IDENTITY_KEYS}
    identity["store_patches"] = True
    rng = np.random.default_rng(0)
    c = TokenCache.create_or_resume(tmp_path / "cache", identity, tiles, 8, 0, 4, (2, 2))
    c.write(np.arange(10), rng.normal(size=(10, 8)), None, rng.normal(size=(10, 4, 8)))
    c.close()
    return tmp_path / "cache"


def test_patient_bags_from_token_cache(token_cache):
    from jwth.cache.tokens import TokenCache
    from jwth.heads.attention_pool import class_attention_pool

    cls_b = bags_from_token_cache(token_cache, "cls")
    jw_b = bags_from_token_cache(token_cache, "jwth", batch_size=3)
    cm_b = bags_from_token_cache(token_cache, "cls+mean")
    # the empty patient_id of the last tile is derived from the TCGA barcode in its path
    assert cls_b.bag_ids == ["TCGA-CM-0001", "TCGA-CM-0002", "TCGA-CM-0003", "TCGA-CM-0004"]
    assert list(cls_b.sizes) == [3, 2, 4, 1] and cls_b.class_names == ["MSIMUT", "MSS"]
    assert list(cls_b.labels) == [1, 0, 1, 0]
    assert cls_b.dim == 8 and jw_b.dim == cm_b.dim == 16
    with TokenCache.open(token_cache) as c:
        cls, P = c.read_cls(np.arange(10)), c.read_patches(np.arange(10))
    pooled, _ = class_attention_pool(torch.tensor(cls), torch.tensor(P))
    np.testing.assert_allclose(jw_b.features[0], np.concatenate([cls[:3], pooled[:3].numpy()], 1), atol=1e-5)
    np.testing.assert_allclose(cm_b.features[3], np.concatenate([cls[9:], P[9:].mean(1)], 1), atol=1e-5)
    with pytest.raises(ValueError, match="Unknown embedding"):
        bags_from_token_cache(token_cache, "max")
