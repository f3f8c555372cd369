"""Stain augmentation: identity at zero strength, range, background, flat tiles,
colour conversions against scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import color

from jwth.augment import (
    StainAugmentConfig,
    hed_to_rgb,
    hsv_to_rgb,
    lab_to_rgb,
    rgb_to_hed,
    rgb_to_hsv,
    rgb_to_lab,
    stain_augment,
)

ALWAYS = dict(p_lab=1.0, p_hsv=1.0, p_hed=1.0)


def _batch(seed=0, n=6, size=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[0] = 255  # glass
    x[1] = 0  # black
    x[2, 0], x[2, 1:] = 20, 0  # flat dark red
    x[3, :, :, : size // 2] = 255  # half glass, half pen stroke
    x[3, 2, :, size // 2 :] = 120
    return x


def test_conversions_match_skimage():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64).float()
    npx = x.permute(0, 2, 3, 1).numpy().astype(np.float64)
    lab = torch.from_numpy(color.rgb2lab(npx)).permute(0, 3, 1, 2).float()
    hsv = torch.from_numpy(color.rgb2hsv(npx)).permute(0, 3, 1, 2).float()
    assert (rgb_to_lab(x) - lab).abs().max() < 1e-3
    assert (rgb_to_hsv(x) - hsv).abs().max() < 1e-5
    assert (lab_to_rgb(lab) - x).abs().max() < 1e-4
    assert (hsv_to_rgb(hsv) - x).abs().max() < 1e-5
    y = x.clamp_min(0.01)
    assert (hed_to_rgb(rgb_to_hed(y)) - y).abs().max() < 1e-5


def test_hed_channels_follow_skimage_direction():
    """Haematoxylin-rich (purple) pixels have more H than eosin-rich (pink) ones, as in skimage."""
    px = torch.tensor([[90, 60, 160], [240, 150, 190]], dtype=torch.float32).T.reshape(1, 3, 1, 2) / 255
    ours = rgb_to_hed(px)[0, :, 0]
    ref = color.rgb2hed(px[0].permute(1, 2, 0).numpy().astype(np.float64))[0]
    assert (ours[0, 0] > ours[0, 1]) == (ref[0, 0] > ref[1, 0])


def test_zero_strength_is_identity_uint8():
    x = _batch()
    y = stain_augment(x, StainAugmentConfig(strength=0.0, **ALWAYS), torch.Generator().manual_seed(0))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert (y.int() - x.int()).abs().max() <= 1


def test_zero_strength_identity_on_real_tiles(real_tiles):
    from jwth.ssl.data import list_images, load_uint8

    paths = list_images(real_tiles)[:4]
    x = torch.stack([load_uint8(p) for p in paths])
    y = stain_augment(x, StainAugmentConfig(strength=0.0, **ALWAYS))
    assert (y.int() - x.int()).abs().max() <= 1
    z = stain_augment(x, StainAugmentConfig(strength=1.0, **ALWAYS), torch.Generator().manual_seed(1))
    assert (z.float() - x.float()).abs().mean() > 1.0  # it does change real tissue


@pytest.mark.parametrize("strength", [1.0, 5.0])
def test_range_no_nan_background_white(strength):
    x = _batch()
    y = stain_augment(x, StainAugmentConfig(strength=strength, **ALWAYS), torch.Generator().manual_seed(3))
    assert y.min() >= 0 and y.max() <= 255
    assert (y[0].int() - 255).abs().max() <= 2  # glass stays white
    assert (y[3, :, :, :12].int() - 255).abs().max() <= 2  # glass beside a pen stroke
    yf = stain_augment(x.float(), StainAugmentConfig(strength=strength, **ALWAYS), torch.Generator().manual_seed(3))
    assert torch.isfinite(yf).all() and yf.min() >= 0 and yf.max() <= 255
    assert (yf - y.float()).abs().max() <= 1.0  # float and uint8 paths agree


def test_changes_tissue_and_per_sample_draws_differ():
    x = torch.full((4, 3, 8, 8), 0, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 150, 80, 160  # purple tissue
    y = stain_augment(x, StainAugmentConfig(**ALWAYS), torch.Generator().manual_seed(0))
    assert (y.int() - x.int()).abs().max() > 2
    means = y.float().mean(dim=(2, 3))
    assert torch.cdist(means, means).max() > 1.0  # different draws per sample


def test_reproducible_with_generator():
    x = _batch(1)
    a = stain_augment(x, generator=torch.Generator().manual_seed(7))
    b = stain_augment(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_only_stated_channels_change():
    """Only an L shift: a*, b* of tissue unchanged (up to uint8 rounding)."""
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 160, 90, 150
    cfg = StainAugmentConfig(
        p_lab=1.0, p_hsv=0.0, p_hed=0.0, lab_shift=(10.0, 0.0, 0.0), lab_scale=(0.0, 0.0, 0.0), preserve_background=False
    )
    y = stain_augment(x, cfg, torch.Generator().manual_seed(0))
    lx, ly = rgb_to_lab(x.float() / 255), rgb_to_lab(y.float() / 255)
    assert (lx[:, 0] - ly[:, 0]).abs().max() > 1.0
    assert (lx[:, 1:] - ly[:, 1:]).abs().max() < 1.5
    cfg_h = StainAugmentConfig(p_lab=0.0, p_hsv=1.0, p_hed=0.0, hsv_hue=0.1, hsv_sat=0.0, hsv_val=0.0, preserve_background=False)
    y = stain_augment(x, cfg_h, torch.Generator().manual_seed(0))
    hx, hy = rgb_to_hsv(x.float() / 255), rgb_to_hsv(y.float() / 255)
    assert (hx[:, 0] - hy[:, 0]).abs().max() > 0.01
    assert (hx[:, 1:] - hy[:, 1:]).abs().max() < 0.02


def test_bad_input_and_unknown_keys():
    with pytest.raises(ValueError):
        stain_augment(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(KeyError, match="valid"):
        StainAugmentConfig.from_dict({"hue": 0.1})


def test_preview_grid_writes_png(synthetic_tiles, tmp_path):
    from jwth.augment import preview_grid

    out = preview_grid(synthetic_tiles, tmp_path / "p.png", n_tiles=2, n_draws=2)
    assert out.is_file() and out.stat().st_size > 1000
