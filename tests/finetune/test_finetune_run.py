"""`jwth finetune` end to end: run folder, `jwth compare` against a probe run, resume, bad input."""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from jwth.cli import app
from jwth.eval.compare import compare_runs
from jwth_testutils import write_tiles

runner = CliRunner()
SPEC = "timm:vit_tiny_patch16_224?img_size=32"
FAST = ["--encoder", SPEC, "--folds", "2", "--n-boot", "50", "--batch-size", "4", "--epochs", "2"]


def _finetune(data, out, *extra):
    return runner.invoke(app, ["finetune", "--data", str(data), "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return write_tiles(tmp_path_factory.mktemp("ft") / "synth", n_patients=8, per_patient=3, size=32)


@pytest.fixture(scope="module")
def lora_run(tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    r = _finetune(tiles, out, "--method", "lora", "--lora-rank", "2", "--augment", "flip,stain")
    assert r.exit_code == 0, r.output
    return out, r.output


def test_run_folder_matches_the_probe_layout(lora_run):
    out, output = lora_run
    for f in ("results.json", "results.md", "config.yaml", "predictions.csv", "confusion.png", "roc.png",
              "curves.png", "attention.png", "folds/fold_0.json", "folds/fold_1.npz"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert set(res["heads"]) == {"attention"} and res["n_tiles"] == 24 and res["heads"]["attention"]["patient"]["n"] == 8
    ft = res["finetune"]
    assert ft["method"] == "lora" and ft["lora_rank"] == 2 and ft["augment"] == ["flip", "stain"]
    assert 0 < ft["trainable_params"] < ft["total_params"] and ft["wall_seconds"] > 0 and ft["train_tiles_per_s"] > 0
    assert ft["peak_memory_mib"] > 0 and set(ft["curves"]) == {"0", "1"}
    assert all({"val_bacc", "val_loss", "train_loss"} <= set(c[0]) for c in ft["curves"].values())
    folds = res["heads"]["attention"]["folds"]
    assert len(folds) == 2 and all(0 <= f["best_epoch"] < f["epochs_run"] <= 2 for f in folds)
    assert sum(f["n_test_tiles"] for f in folds) == 24
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["finetune"]["method"] == "lora" and cfg["encoder_info"]["random_init"] is True
    assert "cache" not in cfg and cfg["probe"]["train"] == {"seed": 0}
    assert "parameters trained" in output and "| attention | patient |" in output


def test_compare_finetune_against_frozen_probe(lora_run, tiles, tmp_path):
    out, _ = lora_run
    probe = tmp_path / "probe"
    r = runner.invoke(app, ["probe", "--data", str(tiles), "--out", str(probe), "--encoder", SPEC, "--folds", "2",
                            "--n-boot", "50", "--epochs", "2", "--num-workers", "0"])
    assert r.exit_code == 0, r.output
    cmp = compare_runs(out, probe, n_boot=50)
    assert set(cmp["heads"]) == {"attention"} and cmp["n_tiles"] == 24
    pred_ft = json.loads((out / "results.json").read_text())["heads"]["attention"]["folds"]
    pred_pr = json.loads((probe / "results.json").read_text())["heads"]["attention"]["folds"]
    # same outer splits: every fold tests the same patients
    assert [f["n_test_tiles"] for f in pred_ft] == [f["n_test_tiles"] for f in pred_pr]
    r = runner.invoke(app, ["compare", str(out), str(probe), "--n-boot", "50"])
    assert r.exit_code == 0 and "| attention | patient |" in r.output
    assert str(out) in r.output  # same encoder spec in both runs: the table names the run folders


def test_rerun_reuses_finished_folds_and_refuses_another_config(lora_run, tiles):
    out, _ = lora_run
    before = {p.name: p.read_bytes() for p in (out / "folds").glob("fold_*")}
    res0 = json.loads((out / "results.json").read_text())["heads"]["attention"]
    r = _finetune(tiles, out, "--method", "lora", "--lora-rank", "2", "--augment", "flip,stain")
    assert r.exit_code == 0 and r.output.count("finished earlier") == 2
    res1 = json.loads((out / "results.json").read_text())["heads"]["attention"]
    assert res1["tile"] == res0["tile"] and res1["patient"] == res0["patient"]
    r = _finetune(tiles, out, "--method", "full")
    assert r.exit_code == 2 and "another configuration" in r.output and "finetune" in r.output
    assert {p.name: p.read_bytes() for p in (out / "folds").glob("fold_*")} == before  # nothing destroyed


def test_last_blocks_linear_head_run(tiles, tmp_path):
    r = _finetune(tiles, tmp_path / "lb", "--method", "last-blocks", "--last-blocks", "1", "--head", "linear",
                  "--epochs", "1")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "lb" / "results.json").read_text())
    assert set(res["heads"]) == {"linear"} and res["finetune"]["last_blocks"] == 1
    assert not (tmp_path / "lb" / "attention.png").exists()


def test_a_finished_run_without_its_folds_is_moved_aside_not_overwritten(tiles, tmp_path):
    """folds/ deleted (nothing to refuse on), other settings: the finished run's files move whole."""
    import shutil

    out = tmp_path / "lb"
    r = _finetune(tiles, out, "--method", "last-blocks", "--last-blocks", "1", "--head", "linear", "--epochs", "1")
    assert r.exit_code == 0, r.output
    finished = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    shutil.rmtree(out / "folds")
    r = _finetune(tiles, out, "--method", "last-blocks", "--last-blocks", "2", "--head", "linear", "--epochs", "1")
    assert r.exit_code == 0, r.output
    moved = list(out.glob("replaced-*"))
    assert len(moved) == 1 and "held a finished run with other settings" in r.output
    assert {f.name: f.read_bytes() for f in moved[0].iterdir()} == finished
    assert yaml.safe_load((out / "config.yaml").read_text())["finetune"]["last_blocks"] == 2


def _error(cmd, data, tmp_path, *extra):
    r = runner.invoke(app, [cmd, "--data", str(data), "--out", str(tmp_path / cmd), "--encoder", SPEC,
                            "--folds", "2", *extra])
    assert r.exit_code == 2, r.output
    return r.output.replace(str(tmp_path / cmd), "OUT")


@pytest.mark.parametrize(
    "case",
    ["missing_folder", "one_class", "missing_tile", "mixed_patient", "bad_split", "too_many_folds"],
)
def test_bad_input_same_errors_as_probe(case, tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=4, per_patient=2, size=32)
    labels = data / "labels.csv"
    df = labels.read_text().splitlines()
    extra = []
    if case == "missing_folder":
        data = tmp_path / "nope"
    elif case == "one_class":
        labels.write_text("\n".join([df[0]] + [r.replace(",B,", ",A,") for r in df[1:]]) + "\n")
    elif case == "missing_tile":
        (data / "p0_t0.png").unlink()
    elif case == "mixed_patient":
        labels.write_text("\n".join(df[:2] + [df[2].replace(",A,", ",B,")] + df[3:]) + "\n")
    elif case == "bad_split":
        extra = ["--split", "site", "--test-sites", "ZZ"]
    elif case == "too_many_folds":
        extra = ["--folds", "5"]
    e_probe = _error("probe", data, tmp_path, *extra)
    e_ft = _error("finetune", data, tmp_path, *extra)
    assert e_probe.startswith("error:") and e_ft == e_probe


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--method", "partial"], "Unknown fine-tuning method"),
        (["--head", "mean"], "cannot be fine-tuned"),
        (["--lora-targets", "query,value"], "match no linear layer"),
        (["--augment", "blur"], "Unknown augmentation"),
        (["--epochs", "0"], "epochs=0"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--precision", "fp8"], "CUDA is not available|fp8"),
    ],
)
def test_bad_finetune_options_fail_before_training(tiles, tmp_path, extra, msg):
    r = _finetune(tiles, tmp_path / "o", *extra)
    assert r.exit_code == 2 and re.search(msg, r.output), r.output
    assert not (tmp_path / "o" / "folds").exists()


def test_real_tiles(real_mini, tmp_path):
    """48 real TCGA tiles (12 patients): runs, and every patient is tested exactly once."""
    # 6 patients per class: a tie, so name the positive class (no tie-breaking rule assumed)
    r = _finetune(real_mini, tmp_path / "real", "--method", "lora", "--epochs", "1", "--lora-rank", "2",
                  "--positive", "MSIMUT")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "real" / "results.json").read_text())
    assert res["n_tiles"] == 48 and res["n_patients"] == 12 and res["positive_class"] == "MSIMUT"
    assert res["tile_checks"]["resized"]["count"] == 48
    pred = (tmp_path / "real" / "predictions.csv").read_text().splitlines()
    assert len(pred) == 49 and np.isfinite([float(x.split(",")[-1]) for x in pred[1:]]).all()
