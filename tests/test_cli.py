import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from jwth_testutils import TINY, write_tiles
from jwth.cli import app

runner = CliRunner()


def test_probe_end_to_end_on_real_tiles(real_mini, tmp_path):
    out = tmp_path / "run"
    args = ["probe", "--data", str(real_mini), "--encoder", TINY, "--out", str(out), "--folds", "3",
            "--n-boot", "100", "--epochs", "3", "--num-workers", "0"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "RANDOMLY INITIALISED" in r.output and "| attention | patient |" in r.output
    # classes with their counts are printed before extraction; chance level after the table
    assert "2 classes: MSIMUT (24 tiles, 6 patients), MSS (24 tiles, 6 patients)" in r.output
    assert r.output.index("2 classes:") < r.output.index("extracted")
    assert "chance level: balanced accuracy 0.500 (2 classes)" in r.output
    for f in ("results.json", "results.md", "config.yaml", "predictions.csv", "confusion.png", "roc.png", "attention.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    for h in ("linear", "attention"):
        for level in ("tile", "patient"):
            m = res["heads"][h][level]
            assert 0 <= m["bacc"] <= 1 and len(m["bacc_ci"]) == 2 and "auroc" in m
        assert res["heads"][h]["patient"]["n"] == 12
    cmp = res["comparisons"]["attention-minus-linear"]
    assert set(cmp) == {"metric", "tile", "patient"} and len(cmp["patient"]["ci"]) == 2
    assert res["n_tiles"] == 48 and res["positive_class"] == "MSIMUT"
    assert res["tile_checks"]["resized"]["count"] == 48  # 224 px tiles into a 64 px encoder, counted
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["encoder"] == TINY and cfg["probe"]["heads"] == ["linear", "attention"]
    assert cfg["encoder_info"]["random_init"] is True and cfg["device"] == "cpu"
    assert cfg["site_col"] == "tss" and cfg["patient_col"] == "patient_id"  # resolved, not the option's None
    assert cfg["classes"] == ["MSIMUT", "MSS"]
    # a second run reuses the cache (no re-extraction) and gives the same numbers
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0 and "extracted" not in r2.output
    again = json.loads((out / "results.json").read_text())["heads"]
    for h in ("linear", "attention"):
        assert again[h]["tile"] == res["heads"][h]["tile"] and again[h]["patient"] == res["heads"][h]["patient"]


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--heads", "linear,attn"], "Unknown head"),
        (["--split", "site", "--test-sites", "ZZ"], "not in the data"),
        (["--split", "diagonal"], "Unknown split"),
    ],
)
def test_probe_bad_options(synth, tmp_path, extra, msg):
    r = runner.invoke(app, ["probe", "--data", str(synth), "--encoder", TINY, "--out", str(tmp_path / "o"),
                            "--folds", "2", "--num-workers", "0", *extra])
    assert r.exit_code == 2 and msg in r.output


def test_probe_missing_data(tmp_path):
    r = runner.invoke(app, ["probe", "--data", str(tmp_path / "nope"), "--encoder", TINY, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_encoders_listing():
    r = runner.invoke(app, ["encoders"])
    assert r.exit_code == 0 and "uni2-h" in r.output and "registers=8" in r.output


def test_reused_cache_follows_the_current_patient_column(tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=12, per_patient=2)
    base = ["probe", "--data", str(data), "--encoder", TINY, "--cache", str(tmp_path / "cache"), "--folds", "2",
            "--n-boot", "20", "--epochs", "1", "--num-workers", "0", "--heads", "linear"]
    r1 = runner.invoke(app, base + ["--out", str(tmp_path / "a"), "--patient-col", "none"])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, base + ["--out", str(tmp_path / "b"), "--patient-col", "patient_id"])
    assert r2.exit_code == 0, r2.output
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["n_patients"] == 24 and b["n_patients"] == 12  # same cache, grouping from the current options


def test_impossible_split_fails_before_any_extraction(synth, tmp_path):
    r = runner.invoke(app, ["probe", "--data", str(synth), "--encoder", TINY, "--out", str(tmp_path / "o"),
                            "--folds", "5", "--num-workers", "0"])
    assert r.exit_code == 2 and "Too few patients per class" in r.output and "'A': 3" in r.output
    assert "labels.csv:" in r.output  # the label file the classes came from
    assert not (tmp_path / "o" / "cache").exists()


def test_missing_tile_is_an_error_unless_skipped(tmp_path):
    """A deleted tile stops the run naming the file; --skip-bad-tiles leaves it out and records it."""
    data = write_tiles(tmp_path / "d", n_patients=8, per_patient=2)
    (data / "p0_t1.png").unlink()
    base = ["probe", "--data", str(data), "--encoder", TINY, "--folds", "2", "--n-boot", "20", "--epochs", "1",
            "--num-workers", "0", "--heads", "linear"]
    r = runner.invoke(app, base + ["--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "p0_t1.png" in r.output and not (tmp_path / "a" / "results.json").exists()
    r = runner.invoke(app, base + ["--out", str(tmp_path / "b"), "--skip-bad-tiles"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["n_tiles"] == 15
    skipped = res["tile_checks"]["skipped"]
    assert [s["path"] for s in skipped] == ["p0_t1.png"] and "does not exist" in skipped[0]["error"]
    assert "1 tile(s) left out by --skip-bad-tiles" in r.output
    r = runner.invoke(app, ["extract", "--data", str(data), "--encoder", TINY, "--cache", str(tmp_path / "c"),
                            "--num-workers", "0", "--skip-bad-tiles"])
    assert r.exit_code == 0 and "15 tiles" in r.output, r.output


def test_near_duplicate_labels_stop_before_extraction(synth, tmp_path):
    """labels MSIMUT / 'msimut ' / MSS used to run silently as a 3-class problem."""
    import pandas as pd

    df = pd.read_csv(synth / "labels.csv")
    df["label"] = ["MSIMUT", "msimut ", "MSS"] * (len(df) // 3)
    df["patient_id"] = [f"P{i}" for i in range(len(df))]
    df.to_csv(synth / "labels.csv", index=False)
    r = runner.invoke(app, ["probe", "--data", str(synth), "--encoder", TINY, "--out", str(tmp_path / "o"),
                            "--num-workers", "0"])
    assert r.exit_code == 2 and re.search(r"'MSIMUT' \(lines \[\d+.*\]\) / 'msimut' \(lines", r.output) and "extract" not in r.output
    assert not (tmp_path / "o").exists()


def test_option_help_and_positive_class():
    import pandas as pd

    import re

    from jwth.eval.run import positive_index as _positive_index

    for cmd, opts in (("probe", ("--device", "--precision", "--num-workers", "--path-col", "--label-col", "--seed")),
                      ("extract", ("--device", "--precision", "--num-workers", "--path-col", "--label-col"))):
        out = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "240"}).output
        text = re.sub(r"\s+", " ", re.sub("[│╭╮╰╯─]", " ", out))
        assert "RANDOM initialisation" in text and "timm:vit_small_patch16_224" in text
        for opt in opts:  # every option has a help text (typer shows the option name, then its help)
            assert re.search(re.escape(opt) + r" \S+ [A-Z]", text), (cmd, opt)
    tiles = pd.DataFrame({"label": ["A", "A", "B", "C", "C"], "patient_id": ["1", "2", "3", "4", "5"]})
    assert _positive_index(["A", "B", "C"], tiles, None) == 1  # the rarer class, also with 3 classes
    assert _positive_index(["A", "C"], tiles[tiles.label != "B"], None) == 0  # tie: the first class


def test_cli_warnings_are_one_plain_line():
    """An explicit --patient-col none used to print a raw Python None and a stray source line."""
    import warnings

    from jwth.cli import plain_warning

    line = plain_warning(UserWarning("labels.csv: --patient-col none was given"), UserWarning, "tiles.py", 160,
                         "    warnings.warn(")
    assert line == "warning: labels.csv: --patient-col none was given\n"
    assert warnings.formatwarning is not plain_warning  # only main() installs it, importing does not


def test_every_option_of_every_command_has_help():
    """A new command written without help texts (a kind of first-use failure) fails here."""
    import click
    import typer.main

    group = typer.main.get_command(app)
    missing = []
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and not (p.help or "").strip() and p.name != "help":
                missing.append(f"{name} --{p.name}")
    assert not missing, f"options without help: {missing}"


def test_rerun_into_a_finished_run_folder_never_loses_the_finished_run(tmp_path):
    data = write_tiles(tmp_path / "d", n_patients=12, per_patient=2)
    out = tmp_path / "run"
    base = ["probe", "--data", str(data), "--encoder", "baseline:colour", "--out", str(out), "--folds", "2",
            "--n-boot", "20", "--epochs", "2", "--num-workers", "0"]
    r = runner.invoke(app, base + ["--heads", "linear"])
    assert r.exit_code == 0, r.output
    # the same settings again: rewritten in place, nothing archived
    r = runner.invoke(app, base + ["--heads", "linear"])
    assert r.exit_code == 0, r.output
    assert not list(out.glob("replaced-*"))
    first = (out / "results.json").read_text()
    # other settings: the finished run moves aside, whole
    r = runner.invoke(app, base + ["--heads", "linear", "--epochs", "3"])
    assert r.exit_code == 0, r.output
    moved = list(out.glob("replaced-*"))
    assert len(moved) == 1 and "held a finished run with other settings" in r.output
    assert (moved[0] / "results.json").read_text() == first
    assert yaml.safe_load((moved[0] / "config.yaml").read_text())["probe"]["train"]["epochs"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["probe"]["train"]["epochs"] == 3
