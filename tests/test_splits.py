import numpy as np
import pandas as pd
import pytest

from jwth.data.tiles import read_labels
from jwth.eval.splits import LeakError, assert_no_leak, inner_split, patient_folds, site_split


def test_real_patient_folds_never_leak(root):
    t = read_labels(root / "tcga_crc_msi", check_files=False)
    y, pats = t.y, t.df["patient_id"].to_numpy()
    folds = patient_folds(y, pats, 5, seed=0)
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(len(y)))  # every tile tested exactly once
    for tr, te in folds:
        assert not set(pats[tr]) & set(pats[te])
        # stratified by patient: every test fold holds MSI patients
        assert len(set(pats[te][y[te] == 0])) >= 5
        fit, val = inner_split(y, pats, tr, seed=0)
        assert not set(pats[fit]) & set(pats[val])
        assert set(fit) | set(val) == set(tr)


def test_hand_made_leaking_split_is_refused():
    pats = np.array(["a", "a", "b", "c"])
    with pytest.raises(LeakError, match="both sides"):
        assert_no_leak(pats, np.array([0, 2]), np.array([1, 3]))


def test_too_few_patients_for_folds():
    y = np.array([0, 0, 1, 1, 1, 1])
    pats = np.array(["a", "b", "c", "d", "e", "f"])
    with pytest.raises(ValueError, match="Too few patients per class"):
        patient_folds(y, pats, 5)


def test_site_split(root):
    t = read_labels(root / "tcga_crc_msi", check_files=False)
    y, pats, sites = t.y, t.df["patient_id"].to_numpy(), t.df["site"].to_numpy()
    (tr, te), = site_split(y, pats, sites, ["AA", "CM"])
    assert set(sites[te]) == {"AA", "CM"} and not {"AA", "CM"} & set(sites[tr])
    with pytest.raises(ValueError, match="not in the data"):
        site_split(y, pats, sites, ["ZZ"])


def test_patient_derived_from_tcga_barcode_when_no_column(tmp_path):
    # two slides (DX1, DX2) of one patient, no patient column
    rows = [
        ("blk-A-TCGA-3L-AA1B-01Z-00-DX1.jpg", "MSS"),
        ("blk-B-TCGA-3L-AA1B-01Z-00-DX2.jpg", "MSS"),
        ("blk-C-TCGA-AA-3516-01Z-00-DX1.jpg", "MSIMUT"),
    ]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "labels.csv", index=False)
    t = read_labels(tmp_path, patient_col=None, check_files=False)
    assert t.df["patient_id"].tolist() == ["TCGA-3L-AA1B", "TCGA-3L-AA1B", "TCGA-AA-3516"]
    assert t.df["site"].tolist() == ["3L", "3L", "AA"]


def test_inner_split_needs_two_patients_per_class():
    y = np.array([0, 0, 1, 1, 1])
    pats = np.array(["a", "a", "b", "c", "d"])
    with pytest.raises(ValueError, match="Too few training patients per class"):
        inner_split(y, pats, np.arange(5))
