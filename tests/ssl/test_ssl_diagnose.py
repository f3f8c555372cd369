"""Token diagnostics on matrices with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jwth.diagnose import effective_rank, gram_spectrum, mean_pairwise_cosine, pca_rgb, token_metrics


def test_effective_rank_known_values():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    u = torch.randn(10, 1)
    assert effective_rank(u @ torch.randn(1, 7)) == pytest.approx(1.0, abs=1e-6)  # rank one
    # singular values (3, 1): p = (.75, .25), erank = exp(H(p))
    x = torch.diag(torch.tensor([3.0, 1.0]))
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert effective_rank(x) == pytest.approx(float(np.exp(h)), rel=1e-6)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    with pytest.raises(ValueError):
        effective_rank(torch.zeros(2, 2, 2))


def test_cosine_and_gram_spectrum_collapsed_vs_diverse():
    same = torch.ones(6, 4)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    ortho = torch.eye(4)
    assert mean_pairwise_cosine(ortho) == pytest.approx(0.0, abs=1e-9)
    s_same, s_orth = gram_spectrum(same), gram_spectrum(ortho)
    assert s_same.sum() == pytest.approx(1.0) and s_orth.sum() == pytest.approx(1.0)
    assert s_same[0] == pytest.approx(1.0) and np.allclose(s_orth, 0.25)
    m = token_metrics(torch.stack([same, same]))
    assert m["gram_top1_share"] == pytest.approx(1.0) and m["gram_components_for_90pct"] == 1
    assert m["effective_rank_per_tile"] == pytest.approx(1.0, abs=1e-6)


def test_pca_rgb_shape_and_range():
    maps = pca_rgb(torch.randn(3, 12, 16), (3, 4))
    assert maps.shape == (3, 3, 4, 3) and maps.min() >= 0 and maps.max() <= 1
    assert maps.std() > 0.05
