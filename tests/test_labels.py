"""Label tables: the one validation shared by the probe and MIL (jwth.data.labels)."""

from __future__ import annotations

import pandas as pd
import pytest

from jwth.data.labels import describe_classes, read_table, validate_labels
from jwth.data.tiles import read_labels


def _write(folder, text):
    (folder / "labels.csv").write_text(text)
    return folder / "labels.csv"


def test_ids_stay_text(tmp_path):
    f = _write(tmp_path, "slide_id,label,patient_id\n001,A,007\n002,B,NA\n")
    df = read_table(f)
    assert df["slide_id"].tolist() == ["001", "002"] and df["patient_id"].tolist() == ["007", "NA"]


@pytest.mark.parametrize("labels, match", [
    (["MSIMUT", "msimut ", "MSS"], r"'MSIMUT' \(lines \[2\]\) / 'msimut' \(lines \[3\]\)"),       # case and a trailing space
    (["MSI MUT", "MSIMUT", "MSS"], r"'MSI MUT' \(lines \[2\]\) / 'MSIMUT' \(lines \[3\]\)"),      # inner space
    (["MSS", "", "MSIMUT"], r"empty label .*lines \[3\]"),        # missing label, named by file line
])
def test_bad_labels_name_the_rows(tmp_path, labels, match):
    rows = "\n".join(f"t{i}.png,{lab},P{i}" for i, lab in enumerate(labels))
    f = _write(tmp_path, "path,label,patient_id\n" + rows + "\n")
    with pytest.raises(ValueError, match=match):
        read_labels(tmp_path, check_files=False)


def test_duplicate_rows_agree_or_conflict(tmp_path):
    df = pd.DataFrame({"slide": ["001", "002", "001", "003"], "label": ["A", "B", "A", "B"]})
    with pytest.raises(ValueError, match=r"'001' on lines \[2, 4\], with the same label"):
        validate_labels(df, "x.csv", "slide")
    df.loc[2, "label"] = "B"
    with pytest.raises(ValueError, match=r"different labels \['A', 'B'\]"):
        validate_labels(df, "x.csv", "slide")


def test_groups_classes_and_counts():
    df = pd.DataFrame({"id": list("abcd"), "label": ["A", "B", "A", "B"], "p": ["1", "1", "2", "3"]})
    with pytest.raises(ValueError, match=r"patients have rows with different labels \(e.g. 1: \['A', 'B'\] on lines \[2, 3\]"):
        validate_labels(df, "x.csv", "id", group_col="p")
    assert validate_labels(df, "x.csv", "id") == ["A", "B"]
    with pytest.raises(ValueError, match="only one class"):
        validate_labels(df[df.label == "A"], "x.csv", "id")
    with pytest.raises(ValueError, match=r"\['B'\] are not among"):
        validate_labels(df, "x.csv", "id", classes=["A", "C"])
    text = describe_classes(["A", "A", "B"], ["1", "2", "2"], ["A", "B"])
    assert text == "2 classes: A (2 tiles, 2 patients), B (1 tiles, 1 patients)"


def test_resolved_columns_and_patient_none(tmp_path):
    _write(tmp_path, "path,label,tss\na.png,X,AA\nb.png,Y,CM\n")
    with pytest.warns(UserWarning, match="--patient-col none was given") as rec:
        t = read_labels(tmp_path, patient_col=None, check_files=False)
    assert "None" not in str(rec[0].message)
    assert t.notes["site_col"] == "tss" and "patient_col" not in t.notes
    with pytest.raises(ValueError, match="no site column 'hospital'"), pytest.warns(UserWarning):
        read_labels(tmp_path, patient_col=None, site_col="hospital", check_files=False)


def _tiles_folder(tmp_path, text: str, encoding: str = "utf-8"):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "images" / f"t{i}.png")
    (tmp_path / "labels.csv").write_bytes(text.encode(encoding))
    return tmp_path


def test_utf16_label_file_is_named_with_the_fix(tmp_path):
    from jwth.data.tiles import read_labels

    d = _tiles_folder(tmp_path, "path,label,patient_id\nimages/t0.png,a,p0\nimages/t1.png,b,p1\n", "utf-16")
    with pytest.raises(ValueError, match=r"labels.csv is not UTF-8 text.*save it as CSV in UTF-8"):
        read_labels(d)


def test_header_spaces_are_ignored_and_semicolons_get_a_hint(tmp_path):
    from jwth.data.tiles import read_labels

    d = _tiles_folder(tmp_path, "path, label , patient_id\nimages/t0.png,a,p0\nimages/t1.png,b,p1\n")
    assert list(read_labels(d).df["label"]) == ["a", "b"]
    (d / "labels.csv").write_text("path;label;patient_id\nimages/t0.png;a;p0\nimages/t1.png;b;p1\n")
    with pytest.raises(ValueError, match="';'-separated: write it comma-separated"):
        read_labels(d)


def test_misspelt_patient_column_is_an_error_not_a_silent_fallback(tmp_path):
    from jwth.data.tiles import read_labels

    d = _tiles_folder(tmp_path, "path,label,patient_id\nimages/t0.png,a,p0\nimages/t1.png,b,p1\n")
    with pytest.raises(ValueError, match="no patient column 'patientid'.*--patient-col"):
        read_labels(d, patient_col="patientid")
    assert set(read_labels(d).df["patient_id"]) == {"p0", "p1"}


def test_a_tile_written_two_ways_is_a_duplicate(tmp_path):
    from jwth.data.tiles import read_labels

    d = _tiles_folder(tmp_path, "path,label,patient_id\nimages/t0.png,a,p0\nimages/t1.png,b,p1\n"
                                "./images/t0.png,b,p2\n")
    with pytest.raises(ValueError, match="listed twice.*'images/t0.png'"):
        read_labels(d)
