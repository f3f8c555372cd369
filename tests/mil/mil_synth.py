"""Synthetic bags for the MIL tests (numpy only; a few hundred instances)."""

from __future__ import annotations

import numpy as np

from jwth.mil.bags import Bags


def make_bags(n_pos=20, n_neg=40, dim=8, signal=0.0, size_pos=27, size_neg=7, seed=0) -> Bags:
    """Bags whose size depends on the label (positives median ``size_pos``, negatives ``size_neg``,
    as MSI vs MSS in tcga_crc_msi); with ``signal > 0`` a third of a positive bag's instances
    are shifted by ``signal`` along feature 0 (a witness-instance MIL problem)."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for y, n_bags, med in ((1, n_pos, size_pos), (0, n_neg, size_neg)):
        for _ in range(n_bags):
            n = max(1, int(rng.integers(med // 2, med * 3 // 2 + 1)))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            if y == 1 and signal > 0:
                k = max(1, n // 3)
                x[:k, 0] += signal
            feats.append(x)
            labels.append(y)
    ids = [f"TCGA-AA-{i:04d}" for i in range(len(feats))]
    return Bags(feats, np.array(labels), ids, np.array(ids), ["MSS", "MSIMUT"], "cls")
