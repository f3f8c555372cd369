"""The online pretraining monitor: subset drawing, k-NN, out-of-fold metrics, plotting,
and a run that writes monitor.csv; graceful stop on SIGTERM and after max_minutes."""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jwth.ssl.config import load_config
from jwth.ssl.monitor import MonitorSet, _pick_tiles, build_monitor_set, evaluate_features, knn_predict
from jwth.ssl.signals import GracefulStop
from jwth.ssl.train import load_checkpoint, train


@pytest.fixture(scope="module")
def labelled_tiles(tmp_path_factory) -> Path:
    """24 tiles of 12 patients (6 per class, 2 tiles each); class 'B' tiles are darker."""
    root = tmp_path_factory.mktemp("labelled")
    (root / "img").mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for p in range(12):
        lab = "A" if p < 6 else "B"
        for t in range(2):
            base = 200 if lab == "A" else 90
            arr = np.clip(rng.normal(base, 10, (40, 40, 3)), 0, 255).astype(np.uint8)
            name = f"img/p{p:02d}_{t}.png"
            Image.fromarray(arr).save(root / name)
            rows.append({"path": name, "label": lab, "patient_id": f"{p:03d}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def test_pick_tiles_is_class_balanced_and_spread_over_patients():
    # class 0: 2 patients x 10 tiles; class 1: 10 patients x 1 tile
    y = np.array([0] * 20 + [1] * 10)
    pats = np.array(["a"] * 10 + ["b"] * 10 + [f"c{i}" for i in range(10)])
    idx = _pick_tiles(y, pats, 12, seed=0)
    assert (y[idx] == 0).sum() == 6 and (y[idx] == 1).sum() == 6
    # round-robin: 3 tiles from each of the two class-0 patients, not 6 from one
    assert sorted(np.unique(pats[idx[y[idx] == 0]], return_counts=True)[1].tolist()) == [3, 3]
    assert len(set(idx.tolist())) == len(idx)
    np.testing.assert_array_equal(idx, _pick_tiles(y, pats, 12, seed=0))  # seeded


def test_knn_votes_are_class_balanced():
    """Hand example: the 3 nearest neighbours are 2 of class 0 (of 8 training tiles) and
    1 of class 1 (of 2): votes 2/8 = 0.25 vs 1/2 = 0.5, so class 1 wins."""
    train_x = np.array([[1.0, 0.0]] * 2 + [[1.0, 0.2]] * 6 + [[0.99, 0.05], [-1.0, 0.0]])
    train_y = np.array([0] * 8 + [1, 1])
    # nearest by cosine to (1, 0.01): the two (1, 0), then (0.99, 0.05) [class 1]
    pred = knn_predict(train_x, train_y, np.array([[1.0, 0.01]]), k=3, n_classes=2)
    assert pred.tolist() == [1]
    # unweighted majority would say 0: the weighting is what decides here
    assert knn_predict(train_x, train_y, np.array([[1.0, 0.01]]), k=1, n_classes=2).tolist() == [0]


def test_monitor_set_and_separable_features(labelled_tiles):
    ms = build_monitor_set(labelled_tiles, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), n_tiles=16, n_folds=3, seed=0)
    assert isinstance(ms, MonitorSet)
    assert ms.images.shape == (16, 3, 32, 32) and ms.classes == ["A", "B"]
    assert (ms.y == 0).sum() == 8 and (ms.y == 1).sum() == 8
    assert ms.patients.dtype.kind == "U" and "000" in set(ms.patients)  # IDs stay strings
    for tr, te in ms.folds:
        assert not set(ms.patients[tr]) & set(ms.patients[te])
    # features equal to the label (+ noise) -> both classifiers perfect; pure noise -> not
    rng = np.random.default_rng(0)
    good = np.c_[(2.0 * ms.y - 1.0) * 5.0, rng.normal(size=(16, 3))]
    knn, lr = evaluate_features(good, ms, k=3)
    assert knn == 1.0 and lr == 1.0
    const = np.ones((16, 4))
    knn_c, lr_c = evaluate_features(const, ms, k=3)
    assert knn_c <= 0.75 and lr_c == 0.5  # constant features carry no signal


def test_monitor_set_refuses_unlabelled_folders(synthetic_tiles):
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        build_monitor_set(synthetic_tiles, 32, (0.5,) * 3, (0.25,) * 3)


def test_run_writes_monitor_csv_and_plot(labelled_tiles, tiny_overrides, tmp_path):
    ov = tiny_overrides + ["optim.epochs=1", "optim.batch_size=4", "monitor.every_steps=2", "monitor.n_tiles=16",
                           "monitor.n_folds=3", "monitor.knn_k=3"]  # fmt: skip
    r = train(load_config(overrides=ov), labelled_tiles, tmp_path / "run")  # 24 tiles / 4 = 6 steps
    assert r.steps_done == 6
    rows = list(csv.DictReader(open(tmp_path / "run" / "monitor.csv")))
    assert [int(x["step"]) for x in rows] == [0, 2, 4, 6]
    for x in rows:
        assert 0.0 <= float(x["knn_bacc_cls"]) <= 1.0 and float(x["erank_cls"]) > 1.0
        assert int(x["n_tiles"]) == 16 and int(x["n_classes"]) == 2
    # resume past the end re-evaluates nothing twice: rows stay unique per step
    from jwth.ssl.curves import plot_losses, read_monitor

    mon = read_monitor(tmp_path / "run")
    assert mon is not None and mon["step"].is_unique
    png = plot_losses([tmp_path / "run"], tmp_path / "curves.png")
    assert png.stat().st_size > 10_000
    # pilots side by side: both runs on their own step counts (the x range stays 0..6, not 0..13)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = []
    real_close = plt.close
    plt.close = lambda fig=None: closed.append(fig)  # keep the figure to inspect it
    try:
        plot_losses([tmp_path / "run", tmp_path / "run"], tmp_path / "overlay.png", overlay=True)
    finally:
        plt.close = real_close
    fig = closed[-1]
    assert max(line.get_xdata().max() for line in fig.axes[0].lines) == 5  # losses at steps 0..5
    real_close(fig)


def test_graceful_stop_flag_and_second_signal():
    # whatever the handlers were before (a background job starts with SIGINT ignored)
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGINT) is not before[0]  # its own handler while inside
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == "SIGTERM"
    # handlers restored to what they were
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_checkpoints_and_resume_finishes(synthetic_tiles, tiny_overrides, tmp_path, monkeypatch):
    """SIGTERM arriving inside step 1 of a 4-step run: the run finishes that step, writes a
    checkpoint and the encoder and returns; the same call again resumes to the end."""
    import jwth.ssl.train as tr

    ov = tiny_overrides + ["optim.epochs=1", "train.checkpoint_every=100"]
    real_ema = tr.ema_update
    calls = {"n": 0}

    def ema_then_signal(*a, **k):
        real_ema(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:  # during step 1, before its end-of-step checks
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tr, "ema_update", ema_then_signal)
    r = train(load_config(overrides=ov), synthetic_tiles, tmp_path / "run")
    assert r.stopped_by == "SIGTERM" and r.steps_done == 2
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == 2 and (tmp_path / "run" / "encoder" / "model.safetensors").is_file()
    monkeypatch.setattr(tr, "ema_update", real_ema)
    again = train(load_config(overrides=ov), synthetic_tiles, tmp_path / "run")
    assert again.stopped_by is None and again.steps_done == 4
    assert [row["step"] for row in again.losses] == [2, 3]


def test_max_minutes_stops_cleanly(synthetic_tiles, tiny_overrides, tmp_path):
    ov = tiny_overrides + ["optim.epochs=1", "train.max_minutes=0.0001"]
    r = train(load_config(overrides=ov), synthetic_tiles, tmp_path / "run")
    assert r.stopped_by == "max_minutes" and r.steps_done == 1
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == 1


def test_error_after_stop_signal_keeps_last_complete_step(synthetic_tiles, tiny_overrides, tmp_path, monkeypatch):
    """Session ends often signal every process: a data-loader worker dying from SIGTERM makes
    the step fail part-way. Then the run saves the weights of the last complete step and
    returns; the same error without a stop signal still propagates."""
    import jwth.ssl.train as tr

    ov = tiny_overrides + ["optim.epochs=1", "train.checkpoint_every=100"]
    real_fwd = tr.backbone_forward
    calls = {"n": 0}

    def dying_forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # teacher + student-global + student-local per step: this is step 1's teacher
            os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
        return real_fwd(*a, **k)

    monkeypatch.setattr(tr, "backbone_forward", dying_forward)
    r = train(load_config(overrides=ov), synthetic_tiles, tmp_path / "run")
    assert r.stopped_by == "SIGTERM" and r.steps_done == 1
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert meta["step"] == 1

    calls["n"] = 0

    def broken_forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a real bug")
        return real_fwd(*a, **k)

    monkeypatch.setattr(tr, "backbone_forward", broken_forward)
    with pytest.raises(RuntimeError, match="a real bug"):
        train(load_config(overrides=ov), synthetic_tiles, tmp_path / "run2")


def test_data_workers_ignore_stop_signals():
    from jwth.ssl.signals import ignore_stop_signals

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        ignore_stop_signals(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_resume_with_other_settings_is_refused_unless_asked(synthetic_tiles, tiny_overrides, tmp_path):
    """A run resumed with another batch size would silently follow another schedule: refused,
    with the changed keys named; allowed with train.resume_with_changes=true and recorded."""
    ov = tiny_overrides + ["optim.epochs=1", "train.max_steps=1"]
    train(load_config(overrides=ov), synthetic_tiles, tmp_path / "run")
    with pytest.raises(ValueError, match=r"optim.batch_size: 4 -> 8"):
        train(load_config(overrides=ov + ["optim.batch_size=8"]), synthetic_tiles, tmp_path / "run")
    # how it runs (train.*, monitor.*) may change freely
    r = train(load_config(overrides=ov + ["train.max_steps=2", "train.checkpoint_every_minutes=5"]), synthetic_tiles,
              tmp_path / "run")
    assert r.steps_done == 2
    r = train(load_config(overrides=ov + ["train.max_steps=3", "optim.base_lr=0.001", "train.resume_with_changes=true"]),
              synthetic_tiles, tmp_path / "run")
    assert r.steps_done == 3
    rec = (tmp_path / "run" / "config_changes.jsonl").read_text()
    assert "optim.base_lr" in rec


def test_config_values_of_the_wrong_kind_are_named():
    from jwth.ssl.config import ConfigError

    with pytest.raises(ConfigError, match=r"'optim.batch_size' needs a number .* got 'abc'"):
        load_config(overrides=["optim.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"'train.progress' needs a bool"):
        load_config(overrides=["train.progress=1"])
    assert load_config(overrides=["optim.epochs=1.5"])["optim"]["epochs"] == 1.5
