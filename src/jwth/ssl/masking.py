"""iBOT block-wise masking of patch tokens.

Zhou et al. 2022 (iBOT, sec. 3 and app. C), block masking after Bao et al. 2022
(BEiT, Alg. 1); batch rule of DINOv2 (Oquab et al. 2023): a fraction
``probability`` of the crops is masked, and the masked crops get ratios spread over
``ratio_range`` (the i-th of n masked crops draws its ratio from the i-th of n equal
sub-intervals), the rest are left unmasked.
"""

from __future__ import annotations

import math

import torch


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    max_aspect: float = 3.0,
) -> torch.Tensor:
    """A boolean (h, w) mask with exactly ``num_masked`` True patches, mostly in blocks.

    Rectangular blocks of random area (>= ``min_block`` patches) and aspect ratio in
    [1/max_aspect, max_aspect] are added until the target is reached or no block fits;
    any remainder (small grids) is filled with random single patches so the count is
    exact.

    Raises:
        ValueError: num_masked outside [0, h * w].
    """
    h, w = grid
    n = h * w
    if not 0 <= num_masked <= n:
        raise ValueError(f"num_masked must be in [0, {n}], got {num_masked}")
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0
    log_a = (math.log(1 / max_aspect), math.log(max_aspect))
    while count < num_masked:
        left_to_mask = num_masked - count
        if left_to_mask < min_block:
            break
        added = 0
        for _ in range(10):
            u = torch.rand(2, generator=generator)
            area = min_block + (left_to_mask - min_block) * float(u[0])
            aspect = math.exp(log_a[0] + (log_a[1] - log_a[0]) * float(u[1]))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if 0 < bh < h and 0 < bw < w:
                top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
                region = mask[top : top + bh, left : left + bw]
                new = bh * bw - int(region.sum())
                if 0 < new <= left_to_mask:
                    region.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    if count < num_masked:
        free = (~mask).flatten().nonzero().flatten()
        pick = free[torch.randperm(len(free), generator=generator)[: num_masked - count]]
        mask.view(-1)[pick] = True
    return mask


def sample_masks(
    n_crops: int,
    grid: tuple[int, int],
    ratio_range: tuple[float, float] = (0.1, 0.5),
    probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masks for a batch of global crops.

    Args:
        n_crops: number of crops B.
        grid: patch grid (h, w); N = h * w.
        ratio_range: (min, max) fraction of masked patches in a masked crop.
        probability: fraction of crops that are masked (``int(B * probability)``).
        generator: torch.Generator for reproducibility.

    Returns:
        Boolean tensor (B, N); row i has round(N * r_i) True entries for masked crops.

    Raises:
        ValueError: ratio_range not within [0, 1] or probability not in [0, 1].
    """
    lo, hi = ratio_range
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"ratio_range must satisfy 0 <= min <= max <= 1, got {ratio_range}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    n = grid[0] * grid[1]
    n_masked = int(n_crops * probability)
    edges = torch.linspace(lo, hi, n_masked + 1)
    masks = []
    for i in range(n_masked):
        r = float(edges[i] + (edges[i + 1] - edges[i]) * torch.rand(1, generator=generator))
        masks.append(block_mask(grid, int(round(n * r)), generator).flatten())
    for _ in range(n_crops - n_masked):
        masks.append(torch.zeros(n, dtype=torch.bool))
    out = torch.stack(masks) if masks else torch.zeros(0, n, dtype=torch.bool)
    return out[torch.randperm(n_crops, generator=generator)]
