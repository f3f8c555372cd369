"""Shared fixtures: real tiles from the data root, tiny synthetic data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from jwth.settings import data_root

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TINY = "timm:vit_tiny_patch16_224?img_size=64"


@pytest.fixture(scope="session")
def root() -> Path:
    r = data_root(required=False)
    if r is None or not (r / "tcga_crc_msi" / "labels.csv").is_file():
        pytest.skip("real data not found (set JWTH_DATA_ROOT or place shared/data beside the checkout)")
    return r


@pytest.fixture(scope="session")
def real_mini(root: Path, tmp_path_factory) -> Path:
    """A labels.csv over 48 real TCGA MSI/MSS tiles: 6 patients per class, 4 tiles each."""
    src = root / "tcga_crc_msi"
    df = pd.read_csv(src / "labels.csv")
    keep = []
    for lab in ("MSIMUT", "MSS"):
        counts = df[df.label == lab].groupby("patient_id").size()
        pats = counts[counts >= 4].index.sort_values()[:6]
        keep.append(df[df.patient_id.isin(pats)].groupby("patient_id").head(4))
    sub = pd.concat(keep)
    sub["path"] = [str(src / p) for p in sub.path]
    d = tmp_path_factory.mktemp("real_mini")
    sub.to_csv(d / "labels.csv", index=False)
    return d


def write_tiles(folder: Path, n_patients: int = 6, per_patient: int = 3, size: int = 64, seed: int = 0) -> Path:
    """Synthetic RGB tiles: class B tiles are redder. Writes labels.csv; returns the folder."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        label = "A" if p % 2 == 0 else "B"
        for t in range(per_patient):
            arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            if label == "B":
                arr[..., 0] = 255
            name = f"p{p}_t{t}.png"
            Image.fromarray(arr).save(folder / name)
            rows.append({"path": name, "label": label, "patient_id": f"P{p}", "site": f"S{p % 3}"})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    return write_tiles(tmp_path / "synth")
