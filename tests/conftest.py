"""Shared fixtures: real tiles from the data root, tiny synthetic data sets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from jwth.settings import data_root
from jwth_testutils import write_tiles


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a small shared CPU, 2+ threads make tiny forwards several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    return write_tiles(tmp_path / "synth")
