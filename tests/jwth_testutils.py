"""Test helpers shared by the top-level tests (not a conftest: importable by name)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

TINY = "timm:vit_tiny_patch16_224?img_size=64"


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
