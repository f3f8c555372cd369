"""Nuclei of H&E tiles and their overlap with the patch-token grid.

Nuclei come from scikit-image, not from our own image processing:

1. colour deconvolution of RGB into haematoxylin / eosin / DAB optical densities
   (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 23:291, 2001;
   :func:`skimage.color.rgb2hed`), keeping the haematoxylin channel H;
2. a global threshold on H (Otsu 1979, :func:`skimage.filters.threshold_otsu`, never
   below ``min_threshold``), small objects and holes removed
   (:func:`skimage.morphology.remove_small_objects` / ``remove_small_holes``): the
   **nuclear mask**;
3. touching nuclei split by a marker-controlled watershed on the distance transform
   (Beucher & Meyer 1993; :func:`skimage.segmentation.watershed`), one marker per
   regional maximum of the distance deeper than ``split_depth_um``
   (:func:`skimage.morphology.h_maxima`), so an elongated nucleus (a ridge) stays one;
4. per nucleus, :func:`skimage.measure.regionprops`: a nucleus is **lymphocyte-like**
   (small, round, dark) when its area is within ``lymph_area_um2``, its eccentricity
   at most ``max_eccentricity``, its solidity at least ``min_solidity`` and its mean H
   at least ``dark_h``.

The token grid of a ViT with patch size p splits an (H, W) image into
(H/p) x (W/p) squares in row-major order -- the order of the encoder's patch
tokens (:class:`jwth.encoders.Tokens`). :func:`token_fractions` gives, per token,
the fraction of its pixels inside a mask.

:func:`enrichment` and :func:`rank_correlation` compare an attention distribution
over patch tokens with a per-token nuclear fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Nuclei:
    """Nuclei of one image.

    Attributes:
        labels: (H, W) int32, 0 = background, k > 0 = nucleus k (after watershed).
        mask: (H, W) bool nuclear mask (union of all nuclei).
        lymph_mask: (H, W) bool, pixels of lymphocyte-like nuclei.
        threshold: the H threshold used (optical density).
        areas_um2: (K,) area of each nucleus in um^2.
        lymph_like: (K,) bool per nucleus.
    """

    labels: np.ndarray
    mask: np.ndarray
    lymph_mask: np.ndarray
    threshold: float
    areas_um2: np.ndarray
    lymph_like: np.ndarray

    @property
    def count(self) -> int:
        return int(len(self.areas_um2))


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Haematoxylin optical density (H, W) float64 of an (H, W, 3) uint8 RGB image.

    Ruifrok & Johnston (2001) colour deconvolution via :func:`skimage.color.rgb2hed`.

    Raises:
        ValueError: the image is not (H, W, 3).
    """
    from skimage.color import rgb2hed

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"Expected an RGB image (H, W, 3), got shape {rgb.shape}.")
    return rgb2hed(rgb)[..., 0]


def segment_nuclei(
    rgb: np.ndarray,
    mpp: float = 0.5,
    min_threshold: float = 0.03,
    min_area_um2: float = 4.0,
    max_hole_um2: float = 10.0,
    split_depth_um: float = 0.5,
    lymph_area_um2: tuple[float, float] = (15.0, 65.0),
    max_eccentricity: float = 0.75,
    min_solidity: float = 0.9,
    dark_h: float = 0.06,
) -> Nuclei:
    """Segment nuclei in an H&E image (see the module docstring for the steps and sources).

    Args:
        rgb: (H, W, 3) uint8 RGB image.
        mpp: resolution of ``rgb`` in um/px (areas and distances are given in um).
        min_threshold: lower bound of the Otsu threshold on H (optical density), so that a
            tile without nuclei does not get its stroma segmented.
        min_area_um2: smaller connected components are removed (um^2).
        max_hole_um2: holes up to this area inside the mask are filled (um^2).
        split_depth_um: two touching nuclei are split when the distance transform dips by
            more than this between their centres (um).
        lymph_area_um2: (min, max) area of a lymphocyte-like nucleus (um^2; a lymphocyte
            nucleus is about 5-9 um across).
        max_eccentricity, min_solidity: roundness criteria of a lymphocyte-like nucleus.
        dark_h: minimum mean haematoxylin optical density of a lymphocyte-like nucleus.

    Returns:
        :class:`Nuclei`.

    Raises:
        ValueError: not an RGB image, or ``mpp`` not positive.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.measure import regionprops
    from skimage.morphology import h_maxima, remove_small_holes, remove_small_objects
    from skimage.segmentation import watershed

    if not mpp > 0:
        raise ValueError(f"mpp must be positive (um/px), got {mpp}.")
    h = haematoxylin(rgb)
    px_area = mpp * mpp
    t = max(float(threshold_otsu(h)) if np.ptp(h) > 0 else np.inf, min_threshold)
    mask = h > t
    mask = remove_small_objects(mask, max_size=max(int(min_area_um2 / px_area) - 1, 0))
    mask = remove_small_holes(mask, max_size=int(max_hole_um2 / px_area))
    labels = np.zeros(mask.shape, dtype=np.int32)
    areas, lymph = [], []
    lymph_mask = np.zeros_like(mask)
    if mask.any():
        dist = ndi.distance_transform_edt(mask)
        markers, _ = ndi.label(h_maxima(dist, max(split_depth_um / mpp, 1e-6)))
        labels = watershed(-dist, markers, mask=mask).astype(np.int32)
        for r in regionprops(labels, intensity_image=h):
            a = r.area * px_area
            ok = (lymph_area_um2[0] <= a <= lymph_area_um2[1] and r.eccentricity <= max_eccentricity
                  and r.solidity >= min_solidity and r.intensity_mean >= dark_h)
            areas.append(a)
            lymph.append(ok)
            if ok:
                lymph_mask[labels == r.label] = True
    return Nuclei(labels=labels, mask=mask, lymph_mask=lymph_mask, threshold=t,
                  areas_um2=np.asarray(areas, dtype=np.float64), lymph_like=np.asarray(lymph, dtype=bool))


def token_fractions(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch token's pixels inside ``mask``.

    Args:
        mask: (H, W) bool (or 0/1) image.
        grid: token grid (h, w); H and W must be multiples of h and w.

    Returns:
        (h * w,) float64 in [0, 1], row-major like the encoder's patch tokens.

    Raises:
        ValueError: the image does not split into the grid.
    """
    H, W = mask.shape
    gh, gw = grid
    if gh <= 0 or gw <= 0 or H % gh or W % gw:
        raise ValueError(f"A {H}x{W} mask does not split into a {gh}x{gw} token grid.")
    blocks = np.asarray(mask, dtype=np.float64).reshape(gh, H // gh, gw, W // gw)
    return blocks.mean(axis=(1, 3)).reshape(-1)


def enrichment(attention: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Attention-weighted nuclear fraction over the uniform average.

    e = sum_i a_i f_i / mean_i f_i. e = 1 for uniform attention (a_i = 1/N), e > 1 when
    attention sits on tokens richer in nuclei than the tile's average; at most
    max_i f_i / mean_i f_i.

    Args:
        attention: (..., N) weights summing to 1 over the last axis (e.g. (B, K, N)).
        fraction: (B, N) per-token fractions broadcastable against ``attention``
            after inserting the head axis (pass (B, 1, N) for (B, K, N) attention).

    Returns:
        (...) enrichment; NaN where the tile has no nuclei (mean f = 0).
    """
    a = np.asarray(attention, dtype=np.float64)
    f = np.asarray(fraction, dtype=np.float64)
    mean = f.mean(axis=-1)
    weighted = (a * f).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, weighted / np.where(mean > 0, mean, 1.0), np.nan)


def rank_correlation(attention: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between attention and nuclear fraction over the tokens.

    Pearson correlation of the average ranks (ties get their mean rank), as
    :func:`scipy.stats.spearmanr`.

    Args:
        attention: (..., N); fraction: broadcastable against it (e.g. (B, 1, N)).

    Returns:
        (...) correlation in [-1, 1]; NaN where either side is constant.
    """
    from scipy.stats import rankdata

    a, f = np.broadcast_arrays(np.asarray(attention, dtype=np.float64), np.asarray(fraction, dtype=np.float64))
    ra = rankdata(a, axis=-1)
    rf = rankdata(f, axis=-1)
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rf = rf - rf.mean(axis=-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rf * rf).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rf).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


__all__ = ["Nuclei", "enrichment", "haematoxylin", "rank_correlation", "segment_nuclei", "token_fractions"]
