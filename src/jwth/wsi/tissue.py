"""Tissue detection on a slide thumbnail with scikit-image.

Method (the usual one for H&E, as in CLAM's segmentation): convert the thumbnail to
HSV, threshold the saturation channel with Otsu's method (never below a floor, so a
blank slide of glass stays empty), then clean the mask with morphological closing
and opening and drop small objects and holes.
"""

from __future__ import annotations

import warnings

import numpy as np
from skimage import color, filters, morphology


def tissue_mask(
    thumb: np.ndarray,
    min_saturation: float = 0.05,
    max_value: float = 0.98,
    closing_radius: int = 2,
    min_object_fraction: float = 0.0005,
) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail.

    Args:
        thumb: RGB ``uint8`` array ``(h, w, 3)`` (any scale; a ~1024 px thumbnail).
        min_saturation: floor on the Otsu threshold of HSV saturation in [0, 1]; glass,
            background and a flat grey slide stay below it.
        max_value: pixels brighter than this HSV value (near-white) are never tissue.
        closing_radius: radius in thumbnail px of the disk used for closing/opening.
        min_object_fraction: connected components and holes smaller than this fraction
            of the thumbnail area are removed / filled.

    Returns:
        ``bool`` array ``(h, w)``, True on tissue.

    Raises:
        ValueError: ``thumb`` is not an ``(h, w, 3)`` array.
    """
    if thumb.ndim != 3 or thumb.shape[2] != 3:
        raise ValueError(f"tissue_mask expects an RGB (h, w, 3) thumbnail, got shape {thumb.shape}")
    hsv = color.rgb2hsv(thumb)
    sat, val = hsv[..., 1], hsv[..., 2]
    if float(sat.max() - sat.min()) < 1e-6:
        thr = 1.0  # constant image: Otsu is undefined
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            thr = float(filters.threshold_otsu(sat))
    thr = max(thr, min_saturation)
    mask = (sat > thr) & (val < max_value)
    if not mask.any():
        return mask
    if closing_radius > 0:
        fp = morphology.disk(closing_radius)
        mask = morphology.closing(mask, fp)
        mask = morphology.opening(mask, fp)
    area = max(int(min_object_fraction * mask.size), 1)
    try:  # scikit-image >= 0.26 names the size `max_size`
        mask = morphology.remove_small_objects(mask, max_size=area)
        mask = morphology.remove_small_holes(mask, max_size=area)
    except TypeError:  # pragma: no cover - older scikit-image
        mask = morphology.remove_small_objects(mask, min_size=area + 1)
        mask = morphology.remove_small_holes(mask, area_threshold=area + 1)
    return mask.astype(bool)
