"""`jwth benchmark` end to end on 48 real tiles with two tasks."""

from __future__ import annotations

import json

import pandas as pd
import yaml
from typer.testing import CliRunner

from jwth.cli import app
from jwth_testutils import TINY

runner = CliRunner()


def test_benchmark_two_tasks_on_real_tiles(root, real_mini, tmp_path):
    pats = pd.read_csv(root / "tcga_crc_msi" / "patients.csv", dtype=str, keep_default_na=False)
    ids = set(pd.read_csv(real_mini / "labels.csv")["patient_id"])
    pats[pats.patient_id.isin(ids)].to_csv(real_mini / "patients.csv", index=False)
    tasks = {
        "patients": "patients.csv",
        "cohort": "tcga_project",
        "evaluations": [{"name": "pooled", "pooled": True}, {"name": "A6 held out", "test_sites": ["A6"]}],
        "tasks": [
            {"name": "MSI", "from": "labels", "column": "label", "classes": {"MSS": ["MSS"], "MSI": ["MSIMUT"]}},
            {"name": "hypermutated", "column": "clin_hypermutated", "classes": {"no": [0], "yes": [1]}},
        ],
    }
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tasks))
    out = tmp_path / "bench"
    r = runner.invoke(app, ["benchmark", "--data", str(real_mini), "--tasks", str(tmp_path / "t.yaml"),
                            "--encoder", TINY, "--out", str(out), "--folds", "3", "--n-boot", "50",
                            "--epochs", "2", "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    # one token cache for both tasks: the encoder's tokens are extracted once
    assert r.output.count("extracted 48 tiles") == 2  # encoder + colour baseline, once each
    for f in ("results.json", "results.md", "config.yaml", "delta_heatmap.png", "forest_MSI.png",
              "forest_hypermutated.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    cells = {(c["task"], c["evaluation"]): c for c in res["cells"]}
    assert len(cells) == 4
    msi = cells[("MSI", "pooled")]
    assert msi["status"] == "ok" and msi["n_patients"] == 12 and msi["heads"]["linear"]["tile"]["n"] == 48
    assert set(msi["baselines"]) == {"majority", "colour", "tile-count"}
    assert msi["baselines"]["majority"]["patient"]["bacc"] == 0.5
    assert msi["baselines"]["tile-count"]["patient"]["n"] == 12 and "tile" not in msi["baselines"]["tile-count"]
    assert len(msi["comparisons"]["attention-minus-linear"]["patient"]["ci"]) == 2
    # a patient without a hypermutation call is left out of that task only, and counted
    hm = res["tasks"]["hypermutated"]
    assert hm["left_out_patients"]["missing_value"] == 1
    assert cells[("hypermutated", "pooled")]["n_patients"] == 11
    # A6 held out leaves one MSI patient to train on: skipped with the reason, the run goes on
    sk = cells[("MSI", "A6 held out")]
    assert sk["status"] == "skipped" and "training patients per class" in sk["reason"]
    md = (out / "results.md").read_text()
    for s in ("baseline: colour statistics (linear)", "baseline: tile count", "baseline: majority class",
              "attention-minus-linear", "skipped (a)", "(a) skipped: Too few training patients"):
        assert s in md, s
    assert "|" in r.output and "cells evaluated" in r.output


def test_tables_say_why_a_value_or_ci_is_missing():
    from jwth.eval.report import results_table

    nan = float("nan")
    block = {"bacc": 0.4, "bacc_ci": [nan, nan], "auroc": nan, "auroc_ci": [nan, nan], "f1_macro": 0.3, "n": 9}
    res = {"heads": {"linear": {"tile": block, "patient": block}}, "classes": ["a", "b", "c"],
           "baselines": {"tile-count": {"patient": block}}, "warnings": ["split 0: class(es) ['c'] have no training tiles"]}
    md = results_table(res)
    assert "| linear | tile | 0.400 [—]† | —‡ |" in md and "n/a" not in md
    assert "‡ undefined: a class has no test tiles" in md and "† no CI: fewer than 10" in md
    assert "| baseline: tile count | patient |" in md and "| baseline: tile count | tile |" not in md
    assert "macro average of the 3 one-vs-rest AUROCs" in md and "WARNING: split 0" in md


def test_multiclass_roc_titles_carry_the_table_auroc(tmp_path, monkeypatch):
    import numpy as np

    from jwth.eval import report
    from jwth.eval.metrics import metric

    titles = []
    plt = report._plt()
    monkeypatch.setattr(plt.Axes, "set", lambda self, **kw: titles.append(kw.get("title")), raising=True)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 5)
    prob = rng.dirichlet(np.ones(4), size=20)
    report.plot_roc(tmp_path / "roc.png", y, {"linear": prob}, np.arange(20).astype(str), list("ABCD"), 3)
    assert (tmp_path / "roc.png").is_file()
    assert f"linear — tile: macro one-vs-rest AUROC {metric('auroc', y, prob):.3f}" in titles


def test_a_rerun_never_loses_a_finished_benchmark(tmp_path, monkeypatch):
    """Interrupted: the finished run's files stay as they were; other settings: moved aside whole."""
    import jwth.eval.benchmark as jb
    from jwth_testutils import write_tiles

    data = write_tiles(tmp_path / "d", n_patients=12, per_patient=2)
    tasks = {"evaluations": [{"name": "pooled", "pooled": True}],
             "tasks": [{"name": "label", "from": "labels", "column": "label", "classes": {"A": ["A"], "B": ["B"]}}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tasks))
    out = tmp_path / "bench"
    base = ["benchmark", "--data", str(data), "--tasks", str(tmp_path / "t.yaml"), "--encoder", "baseline:colour",
            "--out", str(out), "--folds", "2", "--n-boot", "20", "--num-workers", "0", "--heads", "linear"]
    r = runner.invoke(app, base + ["--epochs", "2"])
    assert r.exit_code == 0, r.output
    finished = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    assert {"config.yaml", "results.json", "forest_label.png"} <= set(finished)

    def interrupted(*a, **k):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as m:
        m.setattr(jb, "run_cells", interrupted)
        r = runner.invoke(app, base + ["--epochs", "3"])
    assert r.exit_code != 0
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == finished

    r = runner.invoke(app, base + ["--epochs", "3"])
    assert r.exit_code == 0, r.output
    moved = list(out.glob("replaced-*"))
    assert len(moved) == 1 and "held a finished benchmark with other settings" in r.output
    assert {f.name: f.read_bytes() for f in moved[0].iterdir()} == finished
    assert yaml.safe_load((out / "config.yaml").read_text())["probe"]["train"]["epochs"] == 3
