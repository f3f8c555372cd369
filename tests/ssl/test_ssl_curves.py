"""Loss-curve figure of pretraining runs."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from jwth.cli import app
from jwth.ssl.curves import _smooth, plot_losses, read_losses


def _write(run, steps, loss, gram=0.0):
    run.mkdir(parents=True)
    pd.DataFrame({"step": steps, "loss": loss, "dino": loss, "ibot": 1.0, "koleo": 0.1, "gram": gram,
                  "lr": 1e-3, "teacher_temp": 0.04}).to_csv(run / "losses.csv", index=False)
    return run


def test_read_losses_keeps_last_write_of_a_repeated_step(tmp_path):
    run = _write(tmp_path / "r", [0, 1, 2, 1, 2, 3], [5.0, 4.0, 3.0, 4.5, 3.5, 2.0])
    df = read_losses(run)
    assert df["step"].tolist() == [0, 1, 2, 3] and df["loss"].tolist() == [5.0, 4.5, 3.5, 2.0]
    with pytest.raises(FileNotFoundError, match="losses.csv"):
        read_losses(tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "losses.csv").write_text("")
    with pytest.raises(ValueError, match="cannot be read"):
        read_losses(bad)
    (bad / "losses.csv").write_text("step,loss\n")
    with pytest.raises(ValueError, match="no rows"):
        read_losses(bad)
    (bad / "losses.csv").write_text("step,loss\n0,1.5\n1,abc\n")
    with pytest.raises(ValueError, match="non-numeric value in data row 2"):
        read_losses(bad)


def test_smoothing_is_a_trailing_moving_average():
    y = np.array([0.0, 3.0, 6.0, 9.0])
    # window 3 with the first value repeated in front: (0+0+0)/3, (0+0+3)/3, (0+3+6)/3, (3+6+9)/3
    assert np.allclose(_smooth(y, 3), [0.0, 1.0, 3.0, 6.0])
    assert np.array_equal(_smooth(y, 1), y)


def test_plot_chains_runs_and_cli(tmp_path):
    a = _write(tmp_path / "pre", list(range(50)), list(np.linspace(10, 8, 50)))
    b = _write(tmp_path / "post", list(range(10)), list(np.linspace(8, 7.9, 10)), gram=0.5)
    png = plot_losses([a, b], tmp_path / "curves.png")
    w, h = Image.open(png).size
    assert w > 800 and h > 300
    r = CliRunner().invoke(app, ["plot-losses", str(a), str(b), "--out", str(tmp_path / "cli.png")])
    assert r.exit_code == 0 and (tmp_path / "cli.png").is_file(), r.output
    r = CliRunner().invoke(app, ["plot-losses", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "losses.csv" in r.output
