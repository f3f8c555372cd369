"""Random stain augmentation of H&E tiles: LAB and HSV perturbation plus HED jitter.

Works on tensor batches (B, 3, H, W), uint8 or float in [0, 255], without autograd.
Each sample gets its own random draw. The three perturbations are applied in the order
LAB -> HSV -> HED, each with its own probability:

- **LAB** (CIE L*a*b*, D65): ``L' = L (1 + s_L) + d_L`` and likewise for a*, b*, with
  s ~ U(-lab_scale, lab_scale), d ~ U(-lab_shift, lab_shift) per channel (L in 0..100,
  a*/b* in about -128..127).
- **HSV**: hue rotated by U(-hsv_hue, hsv_hue) (fraction of the circle), saturation and
  value multiplied by 1 + U(-hsv_sat, hsv_sat), 1 + U(-hsv_val, hsv_val).
- **HED** (colour deconvolution, Ruifrok & Johnston 2001; jitter of Tellez et al. 2018):
  optical density OD = -ln(RGB), stain concentrations C = OD M^-1 where the rows of M
  are the unit OD vectors of haematoxylin and eosin of Ruifrok & Johnston (the values
  scikit-image uses) and, for DAB, their normalised cross product; then C' = C (1 + a) + b with
  a ~ U(-hed_alpha, hed_alpha), b ~ U(-hed_beta, hed_beta) per stain.

Every range is multiplied by ``strength``; at strength 0 the result equals the input
up to the uint8 rounding of the colour-space round trips (max abs difference <= 1).
With ``preserve_background`` the change is faded out on bright glass: it is blended
with weight w = clip((background_l - L) / background_soft, 0, 1) computed from the
input lightness L, so pixels with L >= background_l (white glass) are left unchanged.
Outputs are clipped to [0, 255]; flat, black and white tiles give no NaN/inf.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

# --- colour conversions (float tensors (B, 3, H, W) in [0, 1]) -------------------

_RGB2XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_XYZ2RGB = torch.linalg.inv(_RGB2XYZ)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix over the channel axis of (B, 3, H, W)."""
    return torch.einsum("ij,bjhw->bihw", m.to(x.dtype).to(x.device), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (B, 3, H, W) -> CIE L*a*b* (D65, 2 deg observer), same shape.

    Same constants as ``skimage.color.rgb2lab``; L in [0, 100].
    """
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp_min(0) ** 2.4, rgb / 12.92)
    xyz = _mix(_RGB2XYZ, lin) / _WHITE_D65.to(rgb).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) (B, 3, H, W) -> sRGB clipped to [0, 1] (inverse of :func:`rgb_to_lab`)."""
    fy = (lab[:, 0] + 16.0) / 116.0
    fx = fy + lab[:, 1] / 500.0
    fz = (fy - lab[:, 2] / 200.0).clamp_min(0.0)
    f = torch.stack([fx, fy, fz], dim=1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * _WHITE_D65.to(lab).view(1, 3, 1, 1)
    lin = _mix(_XYZ2RGB, xyz).clamp_min(0.0)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0.0, 1.0)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (B, 3, H, W) -> HSV with all channels in [0, 1] (as skimage)."""
    maxc, argmax = rgb.max(dim=1)
    minc = rgb.min(dim=1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    h = torch.where(argmax == 0, ((g - b) / safe) % 6.0, torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV in [0, 1] (B, 3, H, W) -> RGB in [0, 1]."""
    h, s, v = hsv[:, 0] % 1.0, hsv[:, 1].clamp(0, 1), hsv[:, 2].clamp(0, 1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = torch.stack([v, q, p, p, t, v], dim=1).gather(1, i[:, None]).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], dim=1).gather(1, i[:, None]).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], dim=1).gather(1, i[:, None]).squeeze(1)
    return torch.stack([r, g, b], dim=1)


def _hed_matrix() -> torch.Tensor:
    h = torch.tensor([0.65, 0.70, 0.29])
    e = torch.tensor([0.07, 0.99, 0.11])
    d = torch.linalg.cross(h, e)
    m = torch.stack([h, e, d])
    return m / m.norm(dim=1, keepdim=True)


_RGB_FROM_HED = _hed_matrix()  # rows: stain OD vectors (H, E, D)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1.0 / 512.0  # half a uint8 step: keeps -ln(RGB) finite on black pixels


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> stain concentrations C = OD M^-1, OD = -ln(max(RGB, 1/512)).

    Returns (B, 3, H, W) with channels haematoxylin, eosin, DAB; values are not
    clipped so the round trip with :func:`hed_to_rgb` is exact.
    """
    od = -torch.log(rgb.clamp_min(_OD_FLOOR))
    return torch.einsum("bjhw,ji->bihw", od, _HED_FROM_RGB.to(rgb))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (B, 3, H, W) -> RGB clipped to [0, 1]."""
    od = torch.einsum("bjhw,ji->bihw", hed, _RGB_FROM_HED.to(hed))
    return torch.exp(-od).clamp(0.0, 1.0)


# --- the augmentation --------------------------------------------------------------


@dataclass
class StainAugmentConfig:
    """Ranges of the random stain perturbation (see module docstring for symbols).

    Attributes:
        strength: multiplies every range below; 0 = identity.
        p_lab, p_hsv, p_hed: per-sample probability of each perturbation.
        lab_shift: max |d| for (L, a*, b*), in LAB units.
        lab_scale: max |s| for (L, a*, b*), relative.
        hsv_hue: max hue rotation, fraction of the colour circle.
        hsv_sat, hsv_val: max relative change of saturation and value.
        hed_alpha: max relative change of each stain concentration.
        hed_beta: max additive change of each stain concentration (OD units).
        preserve_background: fade the change out on bright glass (L >= background_l).
        background_l, background_soft: where the fade starts and its width (L units).
    """

    strength: float = 1.0
    p_lab: float = 0.8
    p_hsv: float = 0.8
    p_hed: float = 0.5
    lab_shift: tuple[float, float, float] = (6.0, 6.0, 6.0)
    lab_scale: tuple[float, float, float] = (0.05, 0.1, 0.1)
    hsv_hue: float = 0.03
    hsv_sat: float = 0.15
    hsv_val: float = 0.08
    hed_alpha: float = 0.05
    hed_beta: float = 0.02
    preserve_background: bool = True
    background_l: float = 90.0
    background_soft: float = 8.0

    @classmethod
    def from_dict(cls, d: dict | None) -> "StainAugmentConfig":
        """Build from a mapping; unknown keys raise KeyError listing the valid ones."""
        d = dict(d or {})
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(d) - valid)
        if bad:
            raise KeyError(f"unknown stain augmentation keys {bad}; valid: {sorted(valid)}")
        for k in ("lab_shift", "lab_scale"):
            if k in d:
                v = d[k]
                d[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v, v, v]))
        return cls(**d)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lab_shift"] = list(out["lab_shift"])
        out["lab_scale"] = list(out["lab_scale"])
        return out


def _uniform(n: int, k: int, half_range: float | torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(n, k, generator=g) * 2.0 - 1.0
    return u * torch.as_tensor(half_range, dtype=torch.float32)


@dataclass
class StainDraw:
    """The random parameters of one :func:`stain_augment` call, one row per sample.

    Attributes (n = batch size; ranges already multiplied by the strength, zero rows
    where a perturbation is off for that sample):
        lab_scale, lab_shift: (n, 3) s and d for (L, a*, b*).
        hsv: (n, 3) hue rotation (fraction of the circle), relative saturation and value change.
        hed_alpha, hed_beta: (n, 3) relative and additive change of the H, E, D concentrations.
        on: (n, 3) bool, whether LAB, HSV, HED are applied to each sample.
    """

    lab_scale: torch.Tensor
    lab_shift: torch.Tensor
    hsv: torch.Tensor
    hed_alpha: torch.Tensor
    hed_beta: torch.Tensor
    on: torch.Tensor


def draw_stain(n: int, config: StainAugmentConfig | None = None, generator: torch.Generator | None = None) -> StainDraw:
    """Draw the parameters of the stain perturbation for ``n`` samples (CPU generator).

    The draw order is fixed (LAB switch, scale, shift; HSV switch, hue, saturation,
    value; HED switch, alpha, beta) so a seeded generator always yields the same
    parameters, and the uniform variates do not depend on ``strength``: the same seed at
    strength 2 gives the same direction as at strength 1, twice as far.
    """
    cfg = config or StainAugmentConfig()
    st = float(cfg.strength)
    on_lab = (torch.rand(n, generator=generator) < cfg.p_lab).float()[:, None]
    s = _uniform(n, 3, torch.tensor(cfg.lab_scale) * st, generator) * on_lab
    d = _uniform(n, 3, torch.tensor(cfg.lab_shift) * st, generator) * on_lab
    on_hsv = (torch.rand(n, generator=generator) < cfg.p_hsv).float()[:, None]
    hue = _uniform(n, 1, cfg.hsv_hue * st, generator) * on_hsv
    sat = _uniform(n, 1, cfg.hsv_sat * st, generator) * on_hsv
    val = _uniform(n, 1, cfg.hsv_val * st, generator) * on_hsv
    on_hed = (torch.rand(n, generator=generator) < cfg.p_hed).float()[:, None]
    a = _uniform(n, 3, cfg.hed_alpha * st, generator) * on_hed
    b = _uniform(n, 3, cfg.hed_beta * st, generator) * on_hed
    on = torch.cat([on_lab, on_hsv, on_hed], dim=1) > 0
    return StainDraw(s, d, torch.cat([hue, sat, val], dim=1), a, b, on)


@torch.no_grad()
def apply_stain(images: torch.Tensor, draw: StainDraw, config: StainAugmentConfig | None = None) -> torch.Tensor:
    """Apply drawn stain parameters (:func:`draw_stain`) to a batch of tiles.

    Args:
        images: (B, 3, H, W) uint8, or float with values in [0, 255].
        draw: parameters with B rows.
        config: only ``preserve_background``, ``background_l`` and ``background_soft`` are read.

    Returns:
        Tensor of the input's shape, dtype and device, values in [0, 255] (rounded for
        uint8 input).

    Raises:
        ValueError: input is not (B, 3, H, W), or the draw has another number of rows.
    """
    cfg = config or StainAugmentConfig()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    if draw.on.shape[0] != n:
        raise ValueError(f"stain draw has {draw.on.shape[0]} rows for a batch of {n} tiles")
    in_dtype = images.dtype
    x = images.float() / 255.0
    x = torch.nan_to_num(x, nan=1.0).clamp(0.0, 1.0)
    dev = x.device

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev).reshape(n, -1, 1, 1)

    lab0 = rgb_to_lab(x)
    out = x
    if bool(draw.on[:, 0].any()):  # LAB
        lab = lab0 * (1 + per_sample(draw.lab_scale)) + per_sample(draw.lab_shift)
        lab[:, 0] = lab[:, 0].clamp(0.0, 100.0)
        out = lab_to_rgb(lab)
    if bool(draw.on[:, 1].any()):  # HSV
        hsv = rgb_to_hsv(out)
        hsv = torch.cat(
            [
                (hsv[:, :1] + per_sample(draw.hsv[:, 0])) % 1.0,
                (hsv[:, 1:2] * (1 + per_sample(draw.hsv[:, 1]))).clamp(0, 1),
                (hsv[:, 2:3] * (1 + per_sample(draw.hsv[:, 2]))).clamp(0, 1),
            ],
            dim=1,
        )
        out = hsv_to_rgb(hsv)
    if bool(draw.on[:, 2].any()):  # HED
        hed = rgb_to_hed(out)
        out = hed_to_rgb(hed * (1 + per_sample(draw.hed_alpha)) + per_sample(draw.hed_beta))
    if cfg.preserve_background:
        soft = max(float(cfg.background_soft), 1e-6)
        w = ((cfg.background_l - lab0[:, :1]) / soft).clamp(0.0, 1.0)
        out = x + w * (out - x)
    out = torch.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0) * 255.0
    if in_dtype == torch.uint8:
        return out.round().to(torch.uint8)
    return out.to(in_dtype)


@torch.no_grad()
def stain_augment(
    images: torch.Tensor,
    config: StainAugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly perturb the stain colours of a batch of H&E tiles.

    :func:`draw_stain` then :func:`apply_stain`; each sample gets its own draw.

    Args:
        images: (B, 3, H, W) uint8, or float with values in [0, 255].
        config: ranges and probabilities (defaults: :class:`StainAugmentConfig`).
        generator: CPU torch.Generator for reproducible draws (global RNG if None).

    Returns:
        Tensor of the input's shape, dtype and device, values in [0, 255] (rounded for
        uint8 input).

    Raises:
        ValueError: input is not (B, 3, H, W).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(images.shape)}")
    return apply_stain(images, draw_stain(images.shape[0], config, generator), config)


def preview_grid(
    data_dir, out_png, n_tiles: int = 4, n_draws: int = 5, strength: float = 1.0, seed: int = 0,
    config: StainAugmentConfig | None = None,
):  # fmt: skip
    """Save a PNG: one row per tile, the original then ``n_draws`` augmentations.

    Tiles are taken evenly spaced from ``data_dir`` (labels.csv ``path`` column or
    images). Returns the output path.

    Raises:
        FileNotFoundError: no images in data_dir.
    """
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from jwth.ssl.data import list_images, load_uint8

    paths = list_images(data_dir)
    idx = np.unique(np.linspace(0, len(paths) - 1, min(n_tiles, len(paths))).round().astype(int))
    cfg = config or StainAugmentConfig()
    cfg = StainAugmentConfig.from_dict({**cfg.to_dict(), "strength": strength})
    g = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(len(idx), n_draws + 1, figsize=(1.8 * (n_draws + 1), 1.8 * len(idx)), squeeze=False)
    for r, i in enumerate(idx):
        img = load_uint8(paths[i])
        aug = stain_augment(img[None].expand(n_draws, -1, -1, -1).contiguous(), cfg, g)
        for c, t in enumerate([img] + list(aug)):
            axes[r, c].imshow(t.permute(1, 2, 0).numpy())
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    axes[0, 0].set_title("original", fontsize=8)
    for c in range(1, n_draws + 1):
        axes[0, c].set_title(f"draw {c}", fontsize=8)
    fig.suptitle(f"stain augmentation (strength {strength})", fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
