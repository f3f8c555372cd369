"""Nuclei segmentation, token fractions and attention alignment on drawn nuclei with known areas."""

from __future__ import annotations

import numpy as np
import pytest

from jwth.eval.nuclei import enrichment, rank_correlation, segment_nuclei, token_fractions

BACKGROUND = (235, 210, 225)  # eosin-pink: haematoxylin OD 0.005
DARK = (60, 40, 120)  # dark purple: haematoxylin OD 0.155
PALE = (170, 140, 200)  # pale purple: haematoxylin OD 0.042 (above the 0.03 floor, below dark_h 0.06)


def _disc(img: np.ndarray, cy: int, cx: int, r: int, colour) -> None:
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def drawn_tile() -> np.ndarray:
    """64 x 64 px at 0.5 um/px, tokens of 16 px (4 x 4 grid).

    token 0 (row 0, col 0): dark disc r = 5 px centred (8, 8): 81 px (Gauss circle N(5) = 81),
        20.25 um^2, round and dark -> lymphocyte-like;
    token 6 (row 1, col 2): pale disc r = 5 px centred (24, 40): 81 px, round but not dark;
    token 15 (row 3, col 3): dark 14 x 6 px rectangle: 84 px = 21 um^2, dark but elongated.
    """
    img = np.empty((64, 64, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    _disc(img, 8, 8, 5, DARK)
    _disc(img, 24, 40, 5, PALE)
    img[49:55, 49:63] = DARK
    return img


def test_token_fractions_of_drawn_nuclei():
    nuc = segment_nuclei(drawn_tile(), mpp=0.5)
    f = token_fractions(nuc.mask, (4, 4))
    expected = np.zeros(16)
    expected[0], expected[6], expected[15] = 81 / 256, 81 / 256, 84 / 256
    np.testing.assert_allclose(f, expected)
    lymph = token_fractions(nuc.lymph_mask, (4, 4))
    expected_l = np.zeros(16)
    expected_l[0] = 81 / 256
    np.testing.assert_allclose(lymph, expected_l)
    assert nuc.count == 3
    np.testing.assert_allclose(sorted(nuc.areas_um2), [20.25, 20.25, 21.0])


def test_touching_nuclei_are_split_by_the_watershed():
    img = np.empty((64, 64, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    _disc(img, 32, 24, 7, DARK)
    _disc(img, 32, 37, 7, DARK)  # centres 13 px apart, radii 7: the discs overlap
    nuc = segment_nuclei(img, mpp=0.5)
    assert nuc.count == 2
    assert nuc.mask.sum() == len(np.unique(np.flatnonzero(nuc.labels)))  # every mask pixel has a nucleus


def test_blank_tile_has_no_nuclei():
    img = np.full((32, 32, 3), 255, dtype=np.uint8)
    nuc = segment_nuclei(img)
    assert nuc.count == 0 and not nuc.mask.any()
    assert np.isnan(enrichment(np.full(4, 0.25), token_fractions(nuc.mask, (2, 2))))


def test_token_fractions_rejects_a_grid_that_does_not_divide():
    with pytest.raises(ValueError, match="does not split"):
        token_fractions(np.zeros((30, 32), bool), (4, 4))


def test_enrichment_and_rank_correlation_by_hand():
    f = np.array([1.0, 0.0, 0.0, 0.0])
    a = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.5, 0.25, 0.25]])
    # weighted f: 0.5, 0.25, 0; mean f = 0.25
    np.testing.assert_allclose(enrichment(a, f[None]), [2.0, 1.0, 0.0])
    # row 0: ranks a = [4, 2.5, 2.5, 1], f = [4, 2, 2, 2] -> centred a [1.5, 0, 0, -1.5], f [1.5, -.5, -.5, -.5]
    # cov = 2.25 + 0.75 = 3.0; |a| = sqrt(4.5), |f| = sqrt(3) -> 3 / sqrt(13.5)
    r = rank_correlation(a, f[None])
    np.testing.assert_allclose(r[0], 3.0 / np.sqrt(13.5))
    assert np.isnan(r[1])  # uniform attention has no ranking
