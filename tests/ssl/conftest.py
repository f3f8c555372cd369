"""Fixtures for the self-supervised training tests: tiny configs and tile folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: overrides that make a ViT small enough for a CPU unit test (2 blocks, 32 px crops)
TINY = [
    "model.arch=vit_tiny_patch16_224",
    "model.kwargs={depth: 2}",
    "model.drop_path_rate=0.0",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
    "dino.head_n_prototypes=32",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=32",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "optim.batch_size=4",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "train.num_workers=0",
    "train.progress=false",
    "train.tensorboard=false",
    "train.precision=fp32",
    "train.device=cpu",
]


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    return list(TINY)


def _he_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random H&E-looking RGB tile: pink background with purple blobs and white glass."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = (235, 170, 200)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(3, 8)):
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(3, size // 4))]
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[m] = rng.uniform([60, 20, 100], [140, 80, 190])
    glass = xx > size * rng.uniform(0.7, 1.0)
    img[glass] = 245
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def synthetic_tiles(tmp_path_factory) -> Path:
    """16 synthetic 48 px PNG tiles in nested folders (no labels.csv)."""
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    for i in range(16):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(_he_like(rng, 48)).save(sub / f"t{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def flat_tiles(tmp_path_factory) -> Path:
    """8 identical flat-colour tiles: a collapse-inducing data set."""
    root = tmp_path_factory.mktemp("flat")
    for i in range(8):
        Image.fromarray(np.full((48, 48, 3), (200, 120, 180), np.uint8)).save(root / f"f{i}.png")
    return root


@pytest.fixture(scope="session")
def real_tiles() -> Path:
    """The real TCGA CRC MSI tiles, or skip with the reason."""
    from jwth.settings import data_root

    root = data_root(required=False)
    if root is None or not (root / "tcga_crc_msi" / "labels.csv").is_file():
        pytest.skip("real data not found: set JWTH_DATA_ROOT to the folder holding tcga_crc_msi/")
    return root / "tcga_crc_msi"
