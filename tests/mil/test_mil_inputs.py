"""MIL over slide feature files: IDs as text, the probe's label checks, damaged files skipped and counted."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from jwth.mil.bags import bags_from_slide_h5, read_slide_features
from jwth.wsi.extract import FeatureFileError, feature_file_problem


def _slide(path, n, rows=None, seed=0, **attrs):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f["features"] = rng.normal(size=(n if rows is None else rows, 4)).astype(np.float32)
        f["coords"] = np.arange(2 * n).reshape(n, 2)
        f.attrs.update({"embedding": "cls", "embed_dim": 4, **attrs})


@pytest.fixture
def numbered(tmp_path):
    """Slides 001 ... 012 (the example: numeric-looking ids) with a labels csv."""
    d = tmp_path / "features"
    d.mkdir()
    for i in range(1, 13):
        _slide(d / f"{i:03d}.h5", 3 + i, seed=i)
    lines = ["slide_id,label"] + [f"{i:03d},{'MSS' if i % 2 else 'MSIMUT'}" for i in range(1, 13)]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return d, tmp_path / "labels.csv"


def test_numeric_looking_slide_ids_keep_leading_zeros(numbered):
    bags = bags_from_slide_h5(*numbered)
    assert bags.n_bags == 12 and bags.bag_ids[0] == "001" and set(bags.patients) >= {"001", "012"}


def test_mil_labels_checked_as_the_probe(numbered):
    d, labels = numbered
    text = labels.read_text().splitlines()
    cases = {
        "empty label": (text[:3] + ["003,"] + text[4:], r"empty label .*lines \[4\]"),
        "case": (text[:3] + ["003,mss"] + text[4:], r"'MSS' \(lines \[[\d, ]+\]\) / 'mss' \(lines \[4\]\)"),
        "duplicate": (text + ["001,MSIMUT"], r"'001' on lines \[2, 14\], with different labels"),
        "one class": ([text[0]] + [f"{i:03d},MSS" for i in range(1, 13)], "only one class"),
    }
    for name, (lines, match) in cases.items():
        labels.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=match):
            bags_from_slide_h5(d, labels)
    labels.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"\['MSIMUT'\] are not among"):
        bags_from_slide_h5(d, labels, class_names=["MSS", "MSI"])
    labels.write_text("slide_id,label,patient_id\n" + "\n".join(f"{r},P1" if i < 2 else f"{r},P{i}"
                                                                for i, r in enumerate(text[1:])) + "\n")
    with pytest.raises(ValueError, match="patients have rows with different labels"):
        bags_from_slide_h5(d, labels)


def test_short_and_truncated_files_are_skipped_and_counted(numbered):
    d, labels = numbered
    _slide(d / "001.h5", 10, rows=6)  # fewer features rows than coords rows
    raw = (d / "002.h5").read_bytes()
    (d / "002.h5").write_bytes(raw[: len(raw) // 2])  # half its bytes
    _slide(d / "003.h5", 5, n_tiles=9)  # n_tiles says more than is there
    _slide(d / "004.h5", 5, jwth_version="0.1")  # jwth file without completion mark
    assert "6 features rows but 10 coords rows" in feature_file_problem(d / "001.h5")
    assert "cannot be opened" in feature_file_problem(d / "002.h5")
    with pytest.raises(FeatureFileError, match="002.h5 cannot be opened.*extract-slides"):
        read_slide_features(d / "002.h5")
    with pytest.warns(UserWarning, match="4 features file.*001.h5 has 6 features rows"):
        bags = bags_from_slide_h5(d, labels)
    assert bags.skipped == {"unreadable or incomplete file": 4} and bags.n_bags == 8
    assert not {"001", "002", "003", "004"} & set(bags.bag_ids)
