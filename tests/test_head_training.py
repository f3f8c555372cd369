"""Head training on cached tokens (jwth.eval.train): batch gathering, the cosine schedule,
early stopping on the inner split, bf16 token products, and the shared bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jwth.eval.metrics import METRICS, _resample_groups, bootstrap_ci, bootstrap_cis
from jwth.eval.train import (
    BatchGather,
    Features,
    HeadTrainConfig,
    cosine_factor,
    fit_heads,
    grid_predict,
    resolve_token_dtype,
    select_and_fit,
)
from jwth.heads import build_head, normalize_tokens
from jwth.heads.attention_pool import attend


def _features(T=64, N=9, D=16, dtype=torch.float32, seed=0) -> Features:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(T, N, D, generator=g)
    return Features(cls=torch.randn(T, D, generator=g), patches=p.to(dtype),
                    patches_normalized=normalize_tokens(p).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_gather_equals_indexing_and_reuses_its_buffers(dtype):
    f = _features(dtype=dtype)
    gather = BatchGather(f, {"raw", "normalized"}, max_batch=8)
    idx = np.array([5, 0, 63, 17, 17])
    cls, tok = gather(idx)
    assert torch.equal(cls, f.cls[idx])
    assert torch.equal(tok["raw"], f.patches[idx].float())
    assert torch.equal(tok["normalized"], f.patches_normalized[idx].float())
    ptr = tok["raw"].data_ptr()
    _, tok2 = gather(np.array([1, 2]))  # a smaller batch: a view of the same buffer
    assert tok2["raw"].shape[0] == 2 and tok2["raw"].data_ptr() == ptr
    assert torch.equal(tok2["raw"], f.patches[[1, 2]].float())


def test_batch_gather_hands_normalized_tokens_in_bf16_when_asked():
    f = _features()
    f.normalized_dtype = torch.bfloat16
    _, tok = BatchGather(f, {"raw", "normalized"}, 4)(np.array([3, 1]))
    assert tok["normalized"].dtype == torch.bfloat16 and tok["raw"].dtype == torch.float32
    assert torch.equal(tok["normalized"], f.patches_normalized[[3, 1]].bfloat16())
    with pytest.raises(ValueError, match="no raw patch tokens"):
        BatchGather(Features(cls=f.cls), {"raw"}, 4)


def test_cosine_schedule_by_hand_and_applied_per_step(monkeypatch):
    assert cosine_factor(0, 10) == 1.0
    assert cosine_factor(5, 10) == pytest.approx(0.5)
    assert cosine_factor(10, 10) == pytest.approx(0.0) and cosine_factor(12, 10) == pytest.approx(0.0)
    import jwth.eval.train as train_mod

    used = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            used.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(train_mod, "_adamw", lambda h, lr, wd: Recording(h.parameters(), lr=lr, weight_decay=wd))
    f = _features(T=48)
    y = np.arange(48) % 2
    fit_heads([build_head("linear", 16, 2)], f, y, np.arange(48), HeadTrainConfig(epochs=2, batch_size=16),
              [(1e-2, 0.0)], 2)
    # 2 epochs x 3 steps; step s uses 0.5 (1 + cos(pi s / 6)) of the base lr
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)]
    assert used == pytest.approx(expected)
    # early stopping keeps the schedule: 1 epoch of the same run uses its first 3 factors
    used.clear()
    fit_heads([build_head("linear", 16, 2)], f, y, np.arange(48), HeadTrainConfig(epochs=2, batch_size=16),
              [(1e-2, 0.0)], 2, epochs=1)
    assert used == pytest.approx(expected[:3])


def test_on_epoch_false_stops_training_after_that_epoch():
    f = _features(T=40)
    y = np.arange(40) % 2
    seen, forwards = [], []

    def on_epoch(e):
        seen.append(e)
        return e < 2

    head = build_head("attention", 16, 2, num_heads=2)
    orig = head.forward_normalized

    def counted(*a, **k):
        forwards.append(head.training)
        return orig(*a, **k)

    head.forward_normalized = counted
    fit_heads([head], f, y, np.arange(40), HeadTrainConfig(epochs=6, batch_size=10), [(1e-3, 0.0)], 2,
              on_epoch=on_epoch)
    assert seen == [1, 2]
    assert forwards == [True] * 8  # 2 epochs x 4 training steps, then nothing


def _separable(T=120, D=8, seed=0):
    """Class = sign of feature 0, with a wide margin: a linear probe reaches BACC 1 quickly."""
    rng = np.random.default_rng(seed)
    y = np.arange(T) % 2
    x = rng.standard_normal((T, D)).astype(np.float32)
    x[:, 0] = np.where(y == 1, 3.0, -3.0) + 0.1 * x[:, 0]
    patients = np.arange(T)
    return Features(cls=torch.from_numpy(x)), y, patients


def test_early_stopping_rule_on_scripted_validation_scores(monkeypatch):
    import jwth.eval.train as train_mod

    # validation BACC of the two grid settings after epochs 1, 2, 3, ...
    script = [(0.50, 0.50), (0.60, 0.52), (0.60, 0.55), (0.55, 0.50), (0.58, 0.54), (0.90, 0.90)]
    epoch = iter(script)
    monkeypatch.setattr(train_mod, "grid_predict", lambda heads, feats, idx: [None] * len(heads))
    current = []
    monkeypatch.setattr(train_mod, "metric", lambda name, y, p: current.pop(0))
    real_fit = train_mod.fit_heads

    def fit(heads, *a, on_epoch=None, **k):
        def scripted(e):
            current[:] = list(next(epoch))
            return on_epoch(e)
        return real_fit(heads, *a, on_epoch=scripted if on_epoch else None, **k)

    monkeypatch.setattr(train_mod, "fit_heads", fit)
    feats, y, _ = _separable(T=40)
    idx = np.arange(40)
    cfg = HeadTrainConfig(epochs=10, batch_size=16, patience=2, lrs=[1e-2, 1e-3], weight_decays=[1e-4])
    _, info = select_and_fit(lambda: build_head("linear", 8, 2), feats, y, idx[:30], idx[30:], idx, cfg, 2)
    # setting 0 is best at epoch 3 (a tie with epoch 2 moves it forward), setting 1 at epoch 3;
    # epochs 4 and 5 are both below: stop after epoch 5, before the late 0.90
    assert info["epochs_run"] == 5
    assert info["val_bacc"] == [0.60, 0.55] and info["val_epoch"] == [3, 3]
    assert (info["lr"], info["epochs"]) == (1e-2, 3)


def test_early_stopping_on_separable_features_gives_a_perfect_head():
    feats, y, _ = _separable()
    idx = np.arange(len(y))
    fit, val = idx[:80], idx[80:]
    cfg = HeadTrainConfig(epochs=40, batch_size=16, patience=3, lrs=[1e-2, 1e-3], weight_decays=[1e-4])

    def make():
        torch.manual_seed(0)
        return build_head("linear", 8, 2)

    head, info = select_and_fit(make, feats, y, fit, val, idx, cfg, 2)
    last = max(info["val_epoch"])
    assert info["epochs_run"] == min(cfg.epochs, last + cfg.patience)
    best = int(np.argmax(info["val_bacc"]))
    assert (info["lr"], info["weight_decay"]) == info["grid"][best]
    assert info["epochs"] == info["val_epoch"][best] >= 1
    assert info["val_bacc"][best] == pytest.approx(1.0)
    p = grid_predict([head], feats, val)[0]
    assert (p.argmax(1) == y[val]).mean() == 1.0


def test_patience_zero_trains_every_epoch_and_refits_on_all_of_them():
    feats, y, _ = _separable()
    idx = np.arange(len(y))
    cfg = HeadTrainConfig(epochs=4, batch_size=16, patience=0)
    calls = []

    def make():
        calls.append(1)
        torch.manual_seed(0)
        return build_head("linear", 8, 2)

    _, info = select_and_fit(make, feats, y, idx[:80], idx[80:], idx, cfg, 2)
    assert info["epochs"] == 4 and info["epochs_run"] == 4
    assert all(e in (0, 4) for e in info["val_epoch"])  # scored once, after the last epoch
    assert len(calls) == len(info["grid"]) + 1  # the grid, then the refit


def test_grid_predict_equals_each_head_alone_and_restores_the_mode():
    f = _features()
    heads = [build_head("attention", 16, 3, num_heads=4) for _ in range(3)]
    for h in heads:
        h.train()
    idx = np.arange(10, 30)
    together = grid_predict(heads, f, idx, batch_size=7)
    for h, p in zip(heads, together):
        h.eval()
        with torch.no_grad():
            alone = h(f.cls[idx], f.patches[idx]).softmax(-1).numpy()
        np.testing.assert_allclose(p, alone, atol=1e-5)
    assert all(h.training is False for h in heads)
    heads[0].train()
    grid_predict(heads[:1], f, idx)
    assert heads[0].training


def test_attend_with_bf16_tokens_stays_close_to_fp32_and_returns_fp32():
    g = torch.Generator().manual_seed(1)
    tokens = normalize_tokens(torch.randn(4, 49, 64, generator=g))
    qk = (torch.randn(4, 8, 64, generator=g) / 8).requires_grad_()
    p32, a32 = attend(qk, tokens)
    p16, a16 = attend(qk, tokens.bfloat16())
    assert p16.dtype == torch.float32 and a16.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: errors of ~1e-2 relative, never more
    torch.testing.assert_close(a16, a32, rtol=0, atol=2e-2)
    torch.testing.assert_close(p16, p32, rtol=0, atol=5e-2)
    p16.sum().backward()
    assert qk.grad is not None and torch.isfinite(qk.grad).all()


def test_resolve_token_dtype():
    assert resolve_token_dtype("fp32") == torch.float32
    assert resolve_token_dtype("bf16") == torch.bfloat16
    assert resolve_token_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_token_dtype("fp8")


def _naive_resamples(groups, n_boot, seed):
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    for _ in range(n_boot):
        pick = rng.integers(0, len(ids), len(ids))
        yield np.concatenate([np.flatnonzero(groups == ids[p]) for p in pick])


def test_patient_resamples_list_the_drawn_patients_tiles_in_draw_order():
    groups = np.random.default_rng(3).choice(["p1", "p2", "p10", "x", "y"], size=40)
    for a, b in zip(_naive_resamples(groups, 50, 7), _resample_groups(groups, 50, 7)):
        assert np.array_equal(a, b)


def test_shared_bootstrap_equals_one_bootstrap_per_metric():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 150)
    p = rng.dirichlet(np.ones(3), 150)
    p[np.arange(150), y] += 0.3
    groups = rng.integers(0, 30, 150)
    together = bootstrap_cis(y, p, groups, METRICS, n_boot=200, seed=4)
    for m in METRICS:
        assert together[m] == bootstrap_ci(y, p, groups, m, n_boot=200, seed=4)
    lo, hi = together["bacc"]
    assert 0 < lo < hi < 1


@pytest.mark.parametrize("kw, msg", [({"epochs": 0}, "--epochs 0"), ({"patience": -1}, "--patience -1"),
                                     ({"batch_size": 1}, "at least 2 tiles"), ({"lrs": []}, "at least one"),
                                     ({"token_precision": "fp8"}, "auto, fp32 or bf16")])
def test_bad_head_training_options_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        HeadTrainConfig(**kw).check()
    HeadTrainConfig().check()  # the defaults pass


def test_one_fold_is_refused_with_the_option_named():
    from jwth.eval.splits import patient_folds

    with pytest.raises(ValueError, match="--folds 1: k-fold cross-validation needs at least 2"):
        patient_folds(np.array([0, 1] * 4), np.arange(8).astype(str), n_splits=1)


@pytest.mark.parametrize("kw, msg", [({"batch_size": 0}, "--batch-size 0"), ({"num_workers": -1}, "--num-workers -1"),
                                     ({"precision": "fp8"}, "--precision 'fp8'"), ({"n_boot": 0}, "--n-boot 0")])
def test_bad_extraction_options_fail_before_any_tile_is_read(tmp_path, kw, msg):
    from jwth.eval.probe import ProbeConfig
    from jwth.eval.run import RunConfig, probe_run

    n_boot = kw.pop("n_boot", 1000)
    # the data folder does not even exist: the option check comes first
    with pytest.raises(ValueError, match=msg):
        probe_run(RunConfig(data=str(tmp_path / "nowhere"), encoder="baseline:colour", out=str(tmp_path / "run"),
                            probe=ProbeConfig(n_boot=n_boot), **kw), quiet=True)
    assert not (tmp_path / "run").exists()
