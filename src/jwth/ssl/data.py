"""Unlabelled tile data for self-supervised training, with step-indexed sampling.

Every crop is a pure function of (seed, global sample counter k): the sampler walks a
seeded permutation of the tiles per epoch and hands each process its slice of the
global batch, and the dataset seeds the augmentation of sample k with (seed, k). A
resumed run therefore sees exactly the crops of an uninterrupted run, and a global
batch split over W processes is the same global batch as on one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def list_images(root: str | Path, max_tiles: int | None = None) -> list[Path]:
    """Image files for SSL: the ``path`` column of ``root/labels.csv`` if present
    (labels unused), else every png/jpg/jpeg/tif/tiff/bmp under ``root`` (recursive,
    sorted). ``max_tiles`` keeps that many, evenly spaced over the list.

    Raises:
        FileNotFoundError: root missing or no image found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Tile folder {root} does not exist.")
    lf = root / "labels.csv"
    paths: list[Path]
    if lf.is_file():
        import pandas as pd

        df = pd.read_csv(lf)
        if "path" in df.columns:
            paths = [root / p for p in df["path"].astype(str)]
        else:
            paths = []
    else:
        paths = []
    if not paths:
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if max_tiles and int(max_tiles) < len(paths):
        # evenly spaced over the list (labels.csv is often sorted by class / patient)
        idx = np.unique(np.linspace(0, len(paths) - 1, int(max_tiles)).round().astype(int))
        paths = [paths[i] for i in idx]
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}.")
    return paths


def sample_seed(seed: int, k: int, salt: int = 0) -> int:
    """A 63-bit seed for sample counter k (stable across processes and resumes)."""
    return (int(seed) * 1_000_003 + int(k) * 7_919 + int(salt) * 104_729 + 12_345) % (2**63 - 1)


def load_uint8(path: Path) -> torch.Tensor:
    """Read an image as a uint8 (3, H, W) tensor (via ``jwth.data.tiles.load_tile``)."""
    from jwth.data.tiles import load_tile

    img, _ = load_tile(path)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class SSLTileDataset(Dataset):
    """Indexed by (tile index, global sample counter k); returns the augmented crops.

    Args:
        paths: image files.
        augmentation: callable (uint8 (3, H, W), torch.Generator) -> dict of crops.
        seed: run seed.
    """

    def __init__(self, paths: list[Path], augmentation: Callable, seed: int) -> None:
        self.paths = list(paths)
        self.augmentation = augmentation
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        idx, k = key
        g = torch.Generator().manual_seed(sample_seed(self.seed, k))
        return self.augmentation(load_uint8(self.paths[idx]), g)


class StepBatchSampler(Sampler):
    """Yields, for steps start..total-1, this process's slice of the global batch.

    Global sample counter k = step * global_batch + j (j < global_batch); tile index =
    perm_e[k mod n] with perm_e a permutation seeded by (seed, epoch e = k // n).
    Process r takes j in [r * B_local, (r + 1) * B_local).

    Raises:
        ValueError: global_batch not divisible by world_size.
    """

    def __init__(
        self, n: int, global_batch: int, start_step: int, total_steps: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"optim.batch_size={global_batch} (global) must be divisible by the number of processes {world_size}."
            )
        self.n, self.gb, self.start, self.total = n, global_batch, start_step, total_steps
        self.seed, self.rank, self.world = seed, rank, world_size
        self.local = global_batch // world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, salt=1))
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            out = []
            for j in range(self.rank * self.local, (self.rank + 1) * self.local):
                k = step * self.gb + j
                out.append((int(self._perm(k // self.n)[k % self.n]), k))
            yield out
