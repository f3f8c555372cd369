"""Masking, EMA, multi-crop, heads, schedules, config and the collapse check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jwth.augment import StainAugmentConfig
from jwth.ssl.config import ConfigError, load_config
from jwth.ssl.heads import DINOHead
from jwth.ssl.masking import block_mask, sample_masks
from jwth.ssl.model import ema_update
from jwth.ssl.multicrop import MultiCropAugmentation, MultiCropConfig
from jwth.ssl.collapse import collapse_reason, collapse_stats
from jwth.ssl.schedules import cosine_schedule, teacher_temp_schedule


def test_block_mask_exact_count_and_blocky():
    g = torch.Generator().manual_seed(0)
    for k in (0, 1, 5, 30, 64):
        m = block_mask((8, 8), k, g)
        assert m.shape == (8, 8) and int(m.sum()) == k
    with pytest.raises(ValueError):
        block_mask((4, 4), 17)
    # a 14x14 grid at 40 %: mostly contiguous (each masked patch has a masked 4-neighbour)
    m = block_mask((14, 14), 78, torch.Generator().manual_seed(1))
    pad = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1))[0, 0]
    nb = pad[:-2, 1:-1] + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:]
    assert float((nb[m] > 0).float().mean()) > 0.8


def test_sample_masks_ratios_and_probability():
    grid, n_crops = (14, 14), 64
    masks = sample_masks(n_crops, grid, (0.1, 0.5), 0.5, torch.Generator().manual_seed(0))
    assert masks.shape == (n_crops, 196) and masks.dtype == torch.bool
    ratios = masks.float().mean(1)
    masked = ratios > 0
    assert int(masked.sum()) == 32  # probability 0.5 of 64 crops
    assert ratios[masked].min() >= 0.1 - 1 / 196 and ratios[masked].max() <= 0.5 + 1 / 196
    # ratios spread over the range (stratified): both halves represented
    assert (ratios[masked] < 0.3).sum() >= 12 and (ratios[masked] > 0.3).sum() >= 12
    with pytest.raises(ValueError):
        sample_masks(4, grid, (0.6, 0.5), 0.5)


def test_ema_update_formula():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    s = [torch.tensor([3.0, 6.0]), torch.tensor([[10.0]])]
    ema_update(t, s, 0.9)
    assert torch.allclose(t[0], torch.tensor([1.2, 2.4])) and torch.allclose(t[1], torch.tensor([[1.0]]))
    ema_update(t, s, 1.0)  # final momentum 1: teacher frozen
    assert torch.allclose(t[0], torch.tensor([1.2, 2.4]))


def test_multicrop_shapes_and_determinism():
    mc = MultiCropConfig(2, 32, (0.32, 1.0), 3, 16, (0.05, 0.32))
    aug = MultiCropAugmentation(mc, StainAugmentConfig(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), gram_scale=2.0)
    img = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    a = aug(img, torch.Generator().manual_seed(5))
    b = aug(img, torch.Generator().manual_seed(5))
    c = aug(img, torch.Generator().manual_seed(6))
    assert a["global"].shape == (2, 3, 32, 32) and a["local"].shape == (3, 3, 16, 16)
    assert a["global_hr"].shape == (2, 3, 64, 64)
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    assert not torch.equal(a["global"], c["global"])


def test_dihedral_only_changes_orientation():
    """With full-tile crops and no stain change, a crop is the tile up to a D4 transform."""
    mc = MultiCropConfig(2, 16, (1.0, 1.0), 0, 8, (0.1, 0.2))
    aug = MultiCropAugmentation(mc, StainAugmentConfig(strength=0.0), (0, 0, 0), (1 / 255, 1 / 255, 1 / 255))
    img = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16).remainder(256).to(torch.uint8)
    seen = set()
    for s in range(12):
        out = aug(img, torch.Generator().manual_seed(s))["global"]
        for crop in out:
            cands = [torch.rot90(f, k, (-2, -1)) for f in (img.float(), img.float().flip(-1)) for k in range(4)]
            d = [float((crop - c).abs().max()) for c in cands]
            assert min(d) <= 1.0
            seen.add(int(np.argmin(d)))
    assert len(seen) >= 4


def test_dino_head_shapes_and_fixed_norm():
    h = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    y = h(torch.randn(5, 12))
    assert y.shape == (5, 20)
    assert y.abs().max() <= 1.0 + 1e-5  # cosine scores: unit prototypes, unit bottleneck
    g = h.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)


@pytest.mark.parametrize("separate", [False, True])
def test_head_scores_match_one_head_call_per_input_and_their_gradients(separate):
    """SSLNetwork.head_scores (one normalised prototype matrix for both calls) gives the values
    and the gradients of calling the heads one input at a time."""
    from jwth.ssl.model import SSLNetwork

    torch.manual_seed(0)
    dino = DINOHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=8)
    ibot = DINOHead(12, out_dim=24, hidden_dim=16, bottleneck_dim=8) if separate else None
    backbone = torch.nn.Linear(12, 12)
    backbone.num_features = 12
    net = SSLNetwork(backbone, dino, ibot)
    cls, patches = torch.randn(3, 12), torch.randn(7, 12)
    w_c, w_p = torch.randn(3, 20), torch.randn(7, 24 if separate else 20)
    a, b = net.head_scores(cls, patches)
    ((a * w_c).sum() + (b * w_p).sum()).backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    a2, b2 = net.dino_head(cls), net.patch_head(patches)
    ((a2 * w_c).sum() + (b2 * w_p).sum()).backward()
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2)
    want = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want) and any("last_layer" in n for n in got)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, msg=n)


def test_schedules():
    s = cosine_schedule(1.0, 0.0, 10, warmup=2)
    assert len(s) == 10 and s[0] == 0.0 and s[2] == pytest.approx(1.0) and s[-1] < 0.05
    assert np.all(np.diff(s[2:]) <= 0)
    m = cosine_schedule(0.992, 1.0, 100)
    assert m[0] == pytest.approx(0.992) and m[-1] == pytest.approx(1.0, abs=1e-5)
    t = teacher_temp_schedule(0.04, 0.07, 30, 50)
    assert t[0] == pytest.approx(0.04) and t[29] == pytest.approx(0.07) and t[-1] == pytest.approx(0.07)


def test_warmups_keep_their_length_on_runs_shorter_than_the_warmup():
    """A 10-step run with a 30-step teacher-temperature warm-up ends 9/29 of the way up the
    ramp (slope (0.07 - 0.04) / 29 per step), not at 0.07; the lr warm-up likewise."""
    short = teacher_temp_schedule(0.04, 0.07, 30, 10)
    full = teacher_temp_schedule(0.04, 0.07, 30, 50)
    assert len(short) == 10
    np.testing.assert_allclose(short, full[:10])
    assert short[-1] == pytest.approx(0.04 + 9 * 0.03 / 29)
    lr_short = cosine_schedule(1.0, 0.0, 5, warmup=20)
    assert len(lr_short) == 5
    np.testing.assert_allclose(lr_short, np.arange(5) / 20)  # linspace(0, 1, 20, endpoint=False)[:5]
    # warm-up equal to the run: the ramp only, never the cosine part
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 4, warmup=4), [0, 0.25, 0.5, 0.75])


def test_config_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["optim.batchsize=3"])
    assert "optim.batch_size" in str(e.value) and "crops.local_crops_number" in str(e.value)
    assert "Did you mean 'optim.batch_size'" in str(e.value)
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  batch_size: 8\nfoo: 1\n")
    with pytest.raises(ConfigError, match="foo"):
        load_config(f)
    cfg = load_config(overrides=["optim.batch_size=8", "crops.global_crops_scale=[0.4,1.0]", "model.kwargs={reg_tokens: 4}"])
    assert cfg["optim"]["batch_size"] == 8 and cfg["crops"]["global_crops_scale"] == [0.4, 1.0]
    assert cfg["model"]["kwargs"] == {"reg_tokens": 4}
    assert cfg["dino"]["head_n_prototypes"] == 65536 and cfg["crops"]["local_crops_number"] == 8  # DINOv2 defaults


def test_collapse_detector():
    k, b = 64, 16
    uniform = torch.full((b, k), 1.0 / k)
    st = collapse_stats(uniform, torch.randn(b, 8))
    assert collapse_reason(st, b) and "uniform" in collapse_reason(st, b)
    same = torch.ones(b, 8)
    onehot = torch.nn.functional.one_hot(torch.zeros(b, dtype=torch.long), k).float() * 0.9 + 0.1 / k
    st = collapse_stats(onehot, same)
    assert st["embedding_spread"] < 1e-6 and collapse_reason(st, b)
    healthy = torch.softmax(torch.randn(b, k) * 5, -1)
    st = collapse_stats(healthy, torch.randn(b, 8))
    assert collapse_reason(st, b) is None


def test_every_shipped_config_resolves():
    """Packaged recipes only use known keys (load_config raises ConfigError otherwise)."""
    from pathlib import Path

    import jwth
    from jwth.ssl.config import load_config

    files = sorted((Path(jwth.__file__).parent / "configs").glob("pretrain_*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_config(f)
        assert cfg["optim"]["batch_size"] > 0 and cfg["model"]["arch"].startswith("vit_"), f


def test_phase_timer_summary_medians_and_shares():
    from jwth.ssl.profile import PhaseTimer

    t = PhaseTimer(True)
    for v in (9.0, 0.010, 0.030, 0.020):  # first step (warm-up) excluded: median 0.020
        t.add("teacher", v)
    for v in (9.0, 0.060, 0.060, 0.060):
        t.add("backward", v)
    s = t.summary()
    assert s["phases"]["teacher"]["median_ms"] == pytest.approx(20.0)
    assert s["phases"]["backward"]["share"] == pytest.approx(60 / 80)
    assert s["step_ms"] == pytest.approx(80.0) and s["steps"] == 3
    assert list(s["phases"]) == ["teacher", "backward"]  # step order
    off = PhaseTimer(False)
    with off.phase("teacher"):
        pass
    off.add("data", 1.0)
    assert off.summary()["phases"] == {}
