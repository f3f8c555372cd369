"""Task files: parser errors name the task and value; label joins; cohort splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from jwth.eval.benchmark import CellSkip, cell_splits
from jwth.eval.tasks import (
    Evaluation,
    TaskFileError,
    load_task_file,
    read_patient_table,
    resolve_task,
    task_file_path,
    tile_cohorts,
)

PATIENTS = """patient_id,cimp,hm,cms,project
007,CIMP-H,1.0,CMS1,A
008,Non-CIMP,0.0,CMS2,A
009,CRC CIMP-L,0.0,,B
010,CIMP-H,1.0,CMS1,B
011,Non-CIMP,,CMS2,A
012,Non-CIMP,0.0,CMS3,A
"""


def _write(tmp_path, tasks, **top):
    (tmp_path / "patients.csv").write_text(PATIENTS)
    doc = {"patients": "patients.csv", "cohort": "project", "tasks": tasks, **top}
    p = tmp_path / "tasks.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _tiles(ids=("007", "007", "008", "009", "010", "010", "011", "099")):
    """labels.csv columns of 8 tiles; patient 099 is not in the patient table, 012 has no tiles."""
    return pd.DataFrame({"path": [f"t{i}.png" for i in range(len(ids))], "label": ["x"] * len(ids),
                         "patient_id": list(ids)})


def _resolve(tmp_path, task, **top):
    tf = load_task_file(_write(tmp_path, [task], **top))
    tiles = _tiles()
    pat = read_patient_table(tmp_path, tf)
    return resolve_task(tf.tasks[0], tf, tiles, pat, tiles["patient_id"]), tf, tiles, pat


@pytest.mark.parametrize(
    "task,msg",
    [
        ({"name": "T1", "column": "cimpp", "classes": ["CIMP-H", "Non-CIMP"]}, "task 'T1': unknown column 'cimpp'"),
        ({"name": "T2", "column": "cimp", "classes": {"H": ["CIMP-HH"], "rest": "*"}},
         "task 'T2': class 'H' lists value 'CIMP-HH', which never occurs"),
        # CMS3 occurs only for patient 012, who has no tiles: empty class after the join
        ({"name": "T3", "column": "cms", "classes": ["CMS1", "CMS3"]}, "task 'T3': class 'CMS3'"),
    ],
)
def test_task_errors_name_task_and_value(tmp_path, task, msg):
    with pytest.raises(TaskFileError, match=None) as e:
        _resolve(tmp_path, task)
    assert msg in str(e.value) and "tasks.yaml" in str(e.value)


@pytest.mark.parametrize(
    "task,msg",
    [
        ({"name": "A", "column": "cimp"}, "task 'A': missing 'classes'"),
        ({"name": "B", "column": "cimp", "classes": ["CIMP-H"]}, "task 'B': needs at least two classes"),
        ({"name": "C", "column": "cimp", "classes": {"x": ["CIMP-H"], "y": ["CIMP-H"]}}, "value 'CIMP-H' is in classes"),
        ({"name": "D", "column": "cimp", "classes": ["CIMP-H", "Non-CIMP"], "positive": "MSI"}, "positive class 'MSI'"),
        ({"name": "E", "column": "cimp", "classes": ["CIMP-H", "Non-CIMP"], "colum": 1}, "unknown key(s) ['colum']"),
    ],
)
def test_task_file_structure_errors(tmp_path, task, msg):
    with pytest.raises(TaskFileError) as e:
        load_task_file(_write(tmp_path, [task]))
    assert msg in str(e.value)


def test_unknown_cohort_value_is_named(tmp_path):
    tf = load_task_file(_write(tmp_path, [{"name": "T", "column": "cimp", "classes": ["CIMP-H", "Non-CIMP"]}],
                               evaluations=[{"name": "in C", "within": "C"}]))
    tiles = _tiles()
    with pytest.raises(TaskFileError, match=r"evaluation 'in C': cohort 'C' is not a value of column 'project'"):
        tile_cohorts(tf, tiles, read_patient_table(tmp_path, tf), tiles["patient_id"])


def test_join_keeps_leading_zeros_and_counts_left_out(tmp_path):
    tl, *_ = _resolve(tmp_path, {"name": "CIMP-H", "column": "cimp", "classes": {"rest": "*", "CIMP-H": ["CIMP-H"]}})
    # 007 stays "007" (not 7): its two tiles are labelled
    assert list(tl.label) == ["CIMP-H", "CIMP-H", "rest", "rest", "CIMP-H", "CIMP-H", "rest", None]
    assert tl.counts["patients"] == {"rest": 3, "CIMP-H": 2}
    assert tl.counts["left_out_patients"]["not_in_patient_table"] == 1  # 099
    assert tl.counts["table_patients_without_tiles"] == 1  # 012: counted, not an error
    assert tl.positive == "CIMP-H"


def test_numeric_values_and_missing_cells(tmp_path):
    tl, *_ = _resolve(tmp_path, {"name": "HM", "column": "hm", "classes": {"no": [0], "yes": [1]}})
    # YAML 0 / 1 match the table's 0.0 / 1.0; 011 has an empty cell -> left out of this task only
    assert list(tl.label) == ["yes", "yes", "no", "no", "yes", "yes", None, None]
    assert tl.counts["left_out_patients"]["missing_value"] == 1
    # a list of classes keeps only those values: CRC CIMP-L (patient 009) is counted as another value
    tl2, *_ = _resolve(tmp_path, {"name": "C2", "column": "cimp", "classes": ["CIMP-H", "Non-CIMP"]})
    assert tl2.counts["left_out_patients"]["other_values"] == {"CRC CIMP-L": 1}


def test_duplicate_patient_in_table_is_an_error(tmp_path):
    p = _write(tmp_path, [{"name": "T", "column": "cimp", "classes": ["CIMP-H", "Non-CIMP"]}])
    (tmp_path / "patients.csv").write_text(PATIENTS + "007,Non-CIMP,0.0,CMS2,A\n")
    with pytest.raises(TaskFileError, match="patient '007' is listed more than once"):
        read_patient_table(tmp_path, load_task_file(p))


def _cohort_data(n_per=6, seed=0):
    """Two cohorts A/B, 2 classes, n_per patients per class and cohort, 3 tiles each."""
    rows = []
    for coh in "AB":
        for c in (0, 1):
            for p in range(n_per):
                rows += [(f"{coh}{c}{p}", c, coh, f"S{coh}{p % 3}")] * 3
    pid, y, coh, site = map(np.array, zip(*rows))
    return y.astype(np.int64), pid, site, coh.astype(object)


def test_cross_cohort_split_has_no_patient_on_both_sides():
    y, pid, site, coh = _cohort_data()
    (tr, te, fit, val), = cell_splits(Evaluation("A→B", "cross", train="A", test="B"), y, pid, site, coh,
                                       ["n", "p"], 5, 0)[0]
    assert set(coh[tr]) == {"A"} and set(coh[te]) == {"B"}
    assert not set(pid[tr]) & set(pid[te]) and not set(pid[fit]) & set(pid[val])
    assert set(fit) | set(val) == set(tr)


def test_within_cohort_lowers_folds_and_skips_with_reason():
    y, pid, site, coh = _cohort_data()
    y[np.isin(pid, ["B10", "B11", "B12"])] = -1  # cohort B keeps 3 positive patients
    splits, info = cell_splits(Evaluation("B", "within", cohort="B"), y, pid, site, coh, ["n", "p"], 5, 0)
    assert info["folds"] == 3 and "3-fold instead of 5-fold" in info["note"]
    for tr, te, *_ in splits:
        assert set(coh[np.r_[tr, te]]) == {"B"} and (y[np.r_[tr, te]] >= 0).all()
    y[pid == "B14"] = -1  # two positive patients left: too few to train, tune and test
    with pytest.raises(CellSkip, match="needs >= 3 patients of each class"):
        cell_splits(Evaluation("B", "within", cohort="B"), y, pid, site, coh, ["n", "p"], 5, 0)


def test_shipped_task_file_parses():
    tf = load_task_file(task_file_path("tcga_crc"))
    assert [t.name for t in tf.tasks] == ["MSI", "CIMP-H", "hypermutated", "CMS"]
    assert {e.kind for e in tf.evaluations} == {"within", "pooled", "cross", "sites"}
    assert list(tf.tasks[3].classes) == ["CMS1", "CMS2", "CMS3", "CMS4"]
