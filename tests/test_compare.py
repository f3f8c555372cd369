"""`jwth compare`: paired bootstrap of two probe runs on the same tiles."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jwth.cli import app
from jwth.eval.compare import compare_runs

CLASSES = ["MSIMUT", "MSS"]


def _run(folder, p_msi, labels, patients, spec="enc", heads=("linear", "attention")):
    folder.mkdir(parents=True)
    df = pd.DataFrame({"path": [f"t{i:03d}.jpg" for i in range(len(labels))], "label": labels,
                       "patient_id": patients, "site": "AA"})
    for h in heads:
        df[f"prob_{h}_MSIMUT"] = p_msi
        df[f"prob_{h}_MSS"] = 1 - np.asarray(p_msi)
    # shuffled rows: the comparison must align tiles by path, not by row order
    df.sample(frac=1.0, random_state=1).to_csv(folder / "predictions.csv", index=False)
    (folder / "results.json").write_text(json.dumps({"classes": CLASSES, "encoder": {"spec": spec}}))
    return folder


@pytest.fixture
def cohort():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i:02d}" for i in range(20)], 3)
    labels = np.where(np.repeat(np.arange(20) < 8, 3), "MSIMUT", "MSS")
    truth = (labels == "MSIMUT").astype(float)
    return labels, patients, truth, rng


def test_perfect_vs_wrong_on_some_patients(cohort, tmp_path):
    labels, patients, truth, rng = cohort
    good = _run(tmp_path / "a", 0.1 + 0.8 * truth, labels, patients, "good")
    # B calls the first 4 MSI patients (12 tiles) MSS: patient BACC = (4/8 + 12/12) / 2 = 0.75
    p_b = 0.1 + 0.8 * truth
    p_b[:12] = 0.2
    bad = _run(tmp_path / "b", p_b, labels, patients, "bad")
    cmp = compare_runs(good, bad, n_boot=300)
    assert cmp["n_tiles"] == 60 and cmp["n_patients"] == 20 and set(cmp["heads"]) == {"linear", "attention"}
    pat = cmp["heads"]["linear"]["patient"]
    assert pat["a"] == pytest.approx(1.0) and pat["b"] == pytest.approx(0.75)
    assert pat["diff"] == pytest.approx(0.25)
    assert 0 <= pat["ci"][0] <= 0.25 <= pat["ci"][1] and pat["p_le_0"] < 0.05
    tile = cmp["heads"]["attention"]["tile"]
    assert tile["diff"] == pytest.approx(0.25)  # same tiles per patient: tile BACC agrees here
    # reversed order gives the negated difference
    rev = compare_runs(bad, good, n_boot=300)["heads"]["linear"]["patient"]
    assert rev["diff"] == pytest.approx(-0.25) and rev["p_le_0"] > 0.95


def test_identical_runs_give_zero_difference(cohort, tmp_path):
    labels, patients, truth, rng = cohort
    p = rng.uniform(size=len(labels))
    a = _run(tmp_path / "a", p, labels, patients)
    b = _run(tmp_path / "b", p, labels, patients)
    r = compare_runs(a, b, heads=["linear"], n_boot=100)["heads"]["linear"]["patient"]
    assert r["diff"] == 0 and r["ci"] == [0, 0] and r["p_le_0"] == 1.0


def test_mismatched_runs_are_refused(cohort, tmp_path):
    labels, patients, truth, rng = cohort
    a = _run(tmp_path / "a", truth, labels, patients)
    fewer = _run(tmp_path / "b", truth[:-3], labels[:-3], patients[:-3])
    with pytest.raises(ValueError, match="different tiles"):
        compare_runs(a, fewer)
    flipped = labels.copy()
    flipped[0] = "MSS"
    other = _run(tmp_path / "c", truth, flipped, patients)
    with pytest.raises(ValueError, match="disagree on label"):
        compare_runs(a, other)
    only_mean = _run(tmp_path / "d", truth, labels, patients, heads=("mean",))
    with pytest.raises(ValueError, match="share no head"):
        compare_runs(a, only_mean)
    with pytest.raises(ValueError, match="not in both runs"):
        compare_runs(a, _run(tmp_path / "e", truth, labels, patients), heads=["mean"])
    with pytest.raises(FileNotFoundError, match="not a finished probe run"):
        compare_runs(a, tmp_path / "missing")
    with pytest.raises(ValueError, match="same folder"):
        compare_runs(a, a)
    with pytest.raises(ValueError, match="at least 10 resamples"):
        compare_runs(a, only_mean, n_boot=0)


def test_damaged_run_files_are_named(cohort, tmp_path):
    labels, patients, truth, rng = cohort
    a = _run(tmp_path / "a", truth, labels, patients)
    b = _run(tmp_path / "b", truth, labels, patients)
    df = pd.read_csv(b / "predictions.csv").drop(columns=["prob_linear_MSS"])
    df.to_csv(b / "predictions.csv", index=False)
    # a head with a class column missing is not comparable; the other head still is
    assert set(compare_runs(a, b, n_boot=20)["heads"]) == {"attention"}
    (b / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="results.json.*classes"):
        compare_runs(a, b)
    (b / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="results.json"):
        compare_runs(a, b)
    (b / "predictions.csv").write_text("")
    with pytest.raises(ValueError, match="predictions.csv cannot be read"):
        compare_runs(a, b)


def test_cli_writes_json_and_markdown(cohort, tmp_path):
    labels, patients, truth, rng = cohort
    a = _run(tmp_path / "a", 0.1 + 0.8 * truth, labels, patients, "good")
    b = _run(tmp_path / "b", rng.uniform(size=len(labels)), labels, patients, "random")
    r = CliRunner().invoke(app, ["compare", str(a), str(b), "--n-boot", "200", "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    assert "| linear | patient | 1.000 |" in r.output and "A = good, B = random" in r.output
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["heads"]["attention"]["patient"]["a"] == pytest.approx(1.0)
    bad = CliRunner().invoke(app, ["compare", str(a), str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "not a finished probe run" in bad.output


def test_numeric_looking_ids_and_labels_stay_text(tmp_path):
    """Patients 001 ... and labels 0 / 1 written by a probe must read back as the same text."""
    import json

    import pandas as pd

    from jwth.eval.compare import read_predictions

    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"path": ["a.png", "b.png"], "label": ["0", "1"], "patient_id": ["001", "NA"], "site": ["", ""],
                  "prob_linear_0": [0.7, 0.2], "prob_linear_1": [0.3, 0.8]}).to_csv(run / "predictions.csv", index=False)
    (run / "results.json").write_text(json.dumps({"classes": ["0", "1"]}))
    df, _, classes = read_predictions(run)
    assert df["patient_id"].tolist() == ["001", "NA"] and df["label"].tolist() == classes
    assert df["prob_linear_1"].dtype.kind == "f"
