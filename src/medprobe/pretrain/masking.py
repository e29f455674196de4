"""iBOT block-wise masks for masked image modelling on the global crops.

As in BEiT/iBOT/DINOv2: rectangles of random area and aspect ratio are masked until the
wanted number of patches is reached. A share ``probability`` of the images in a batch is
masked; their masking ratios are stratified over ``[ratio_min, ratio_max]`` (one uniform
draw in each of ``n`` equal bins), the other images get no mask. Unlike DINOv2's generator,
masks always hold exactly the requested number of patches (the last few are single patches
when no rectangle fits), which keeps the ratio exact on the small grids of small crops.
"""
from __future__ import annotations

import math
import random

import numpy as np


def block_mask(height: int, width: int, num_masked: int, rng: random.Random, min_block: int = 4,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> np.ndarray:
    """A (height, width) boolean mask with exactly ``num_masked`` True patches, grown as rectangles."""
    total = height * width
    num_masked = max(0, min(int(num_masked), total))
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < num_masked:
        budget = num_masked - count
        added = 0
        for _ in range(attempts):
            area = rng.uniform(min(min_block, budget), budget)
            ratio = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * ratio)))
            w = int(round(math.sqrt(area / ratio)))
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            region = mask[top:top + h, left:left + w]
            new = h * w - int(region.sum())
            if 0 < new <= budget:
                region[...] = True
                added = new
                break
        if added == 0:  # no rectangle fits the remaining budget: top up with single patches
            free = np.flatnonzero(~mask.ravel())
            pick = rng.sample(list(free), budget)
            mask.ravel()[pick] = True
            added = budget
        count += added
    return mask


def batch_masks(n_images: int, height: int, width: int, ratio: tuple[float, float], probability: float,
                rng: random.Random) -> np.ndarray:
    """Masks for ``n_images`` crops, (n_images, height * width) bool, in random order."""
    total = height * width
    n_masked = int(n_images * probability)
    bounds = np.linspace(ratio[0], ratio[1], n_masked + 1)
    masks = []
    for i in range(n_masked):
        r = rng.uniform(float(bounds[i]), float(bounds[i + 1]))
        masks.append(block_mask(height, width, int(total * r), rng).ravel())
    masks += [np.zeros(total, dtype=bool)] * (n_images - n_masked)
    rng.shuffle(masks)
    return np.stack(masks) if masks else np.zeros((0, total), dtype=bool)
