"""Multi-crop augmentation for DINO-style training on H&E tiles.

Caron et al. 2021 (DINO, sec. 3.1 "multi-crop"), DINOv2 defaults: 2 global crops of
224 px at scale 0.32-1.0 and 8 local crops of 96 px at scale 0.05-0.32 of the tile
area. Tiles have no "up", so every crop is also flipped and rotated by a random
multiple of 90 degrees (the dihedral group D4). Every random draw comes from an
explicit ``torch.Generator`` so a crop is a pure function of (seed, sample counter):
this is what makes resumed and multi-process runs reproduce single-process runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jwth.augment import StainAugmentConfig, stain_augment


@dataclass
class MultiCropConfig:
    """Crop counts, sizes (px) and area scales (fraction of the tile)."""

    global_crops_number: int = 2
    global_crops_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    flips: bool = True
    rotations: bool = True


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Draw a crop box (top, left, h, w) covering a random area fraction and aspect ratio.

    Same rule as torchvision's RandomResizedCrop (10 tries, then a centre crop), with
    an explicit generator.
    """
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator)
        target = area * (scale[0] + (scale[1] - scale[0]) * float(u[0]))
        ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(u[1]))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    s = min(height, width)
    return (height - s) // 2, (width - s) // 2, s, s


def _crop_resize(img: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    top, left, h, w = box
    crop = img[:, top : top + h, left : left + w].float()[None]
    if crop.shape[-2:] != (size, size):
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return crop[0].clamp(0.0, 255.0)


def _dihedral(x: torch.Tensor, flips: bool, rotations: bool, g: torch.Generator | None) -> torch.Tensor:
    r = torch.randint(0, 8, (1,), generator=g).item()
    if flips and r >= 4:
        x = torch.flip(x, dims=(-1,))
    if rotations and r % 4:
        x = torch.rot90(x, k=r % 4, dims=(-2, -1))
    return x


class MultiCropAugmentation:
    """Tile -> (global crops, local crops), each stain-augmented and normalised.

    Args:
        crops: crop configuration.
        stain: stain augmentation ranges (:class:`jwth.augment.StainAugmentConfig`).
        mean, std: per-channel normalisation (RGB in [0, 1] units).
        gram_scale: when > 1, also return the global crops at ``round(size * gram_scale)``
            px (same box, flip and stain draw; the student crop is the antialiased
            downsample of it) for a higher-resolution Gram teacher.

    Call with a uint8 tensor (3, H, W) and a generator; returns a dict with
    ``global`` (G, 3, S, S), ``local`` (L, 3, s, s) float32 normalised, and
    ``global_hr`` (G, 3, S', S') when ``gram_scale > 1``.
    """

    def __init__(
        self,
        crops: MultiCropConfig,
        stain: StainAugmentConfig,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        gram_scale: float = 1.0,
    ) -> None:
        self.crops = crops
        self.stain = stain
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255.0
        self.gram_scale = float(gram_scale)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tile, got {tuple(img.shape)}")
        c = self.crops
        _, height, width = img.shape
        gsize = c.global_crops_size
        hr_size = int(round(gsize * self.gram_scale)) if self.gram_scale > 1 else gsize
        globals_ = []
        for _ in range(c.global_crops_number):
            box = random_resized_crop_box(height, width, tuple(c.global_crops_scale), generator=generator)
            globals_.append(_dihedral(_crop_resize(img, box, hr_size), c.flips, c.rotations, generator))
        g = stain_augment(torch.stack(globals_), self.stain, generator)
        out: dict[str, torch.Tensor] = {}
        if hr_size != gsize:
            out["global_hr"] = self._norm(g)
            g = F.interpolate(g, size=(gsize, gsize), mode="bilinear", antialias=True, align_corners=False)
        out["global"] = self._norm(g)
        locals_ = []
        for _ in range(c.local_crops_number):
            box = random_resized_crop_box(height, width, tuple(c.local_crops_scale), generator=generator)
            locals_.append(_dihedral(_crop_resize(img, box, c.local_crops_size), c.flips, c.rotations, generator))
        if locals_:
            out["local"] = self._norm(stain_augment(torch.stack(locals_), self.stain, generator))
        else:
            out["local"] = torch.zeros(0, 3, c.local_crops_size, c.local_crops_size)
        return out
