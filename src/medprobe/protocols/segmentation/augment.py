"""Paired training augmentations for segmentation: the same geometry for image and mask.

Images are normalised (N, 3, S, S) batches, masks (N, S, S) labels. Geometric transforms
(``affine``, ``hflip``, ``elastic``) are composed into one sampling grid, so a batch costs one
``grid_sample`` for the images (bilinear, outside filled with the image minimum) and one for
the masks (nearest: labels stay labels). Intensity transforms (``brightness_contrast``,
``gamma``) follow on the images only. Every draw comes from the generator, so a seed gives
the same batch.

* ``affine`` — rotation ±10°, zoom ±10 %, shift ±5 % of the size.
* ``hflip`` — horizontal flip with probability 0.5 (leave out for left/right labels: lungs, lung zones).
* ``elastic`` — a smooth random displacement field: Gaussian control-point displacements on a
  coarse grid (``ELASTIC_POINTS`` x ``ELASTIC_POINTS``, sd ``ELASTIC_SIGMA`` of the half-size),
  upsampled bicubically to the image size (as torchio's RandomElasticDeformation, with
  bicubic instead of B-spline interpolation).
* ``brightness_contrast`` — contrast x(1 ± 0.15) about the image mean, brightness ± 0.15.
* ``gamma`` — MONAI's ``AdjustContrast``: each image rescaled to [0, 1] by its own min and
  max, raised to a gamma drawn log-uniformly in ``GAMMA_RANGE``, and mapped back.

``augment: true`` is ``affine`` + ``brightness_contrast`` (no flips: left/right labels keep their side).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medprobe.errors import ConfigError, suggest

SEG_AUGMENTATIONS: dict[str, str] = {
    "affine": "rotation ±10°, zoom ±10%, shift ±5% (image bilinear, mask nearest)",
    "hflip": "horizontal flip with probability 0.5 (not for left/right labels)",
    "elastic": "smooth random displacement field from coarse Gaussian control points (mask nearest)",
    "brightness_contrast": "contrast x(1±0.15) about the mean, brightness ±0.15",
    "gamma": "per-image min-max rescale, gamma log-uniform in [0.7, 1.5], rescale back (MONAI AdjustContrast)",
}
DEFAULT_SEG_AUGMENT: tuple[str, ...] = ("affine", "brightness_contrast")
ELASTIC_POINTS = 5
ELASTIC_SIGMA = 0.04
GAMMA_RANGE = (0.7, 1.5)


def augment_names(augment: bool | Sequence[str]) -> tuple[str, ...]:
    """The augmentations an ``augment:`` option selects (``true`` = the default pair, ``false``/[] = none)."""
    if isinstance(augment, bool):
        return DEFAULT_SEG_AUGMENT if augment else ()
    names = tuple(str(a) for a in augment)
    for i, name in enumerate(names):
        if name not in SEG_AUGMENTATIONS:
            raise ConfigError(f"augment[{i}]: {suggest(name, SEG_AUGMENTATIONS, 'augmentation')}")
    if len(set(names)) != len(names):
        raise ConfigError(f"augment: an augmentation is listed twice in {list(names)}")
    return names


def adjust_gamma(images: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-image gamma on the image's own [min, max] range: (N, C, H, W) and (N,) gammas."""
    dims = tuple(range(1, images.ndim))
    low = images.amin(dim=dims, keepdim=True)
    span = images.amax(dim=dims, keepdim=True) - low
    g = gamma.view(-1, *[1] * (images.ndim - 1)).to(images)
    return ((images - low) / (span + eps)).clamp_min(0) ** g * span + low


def elastic_field(n: int, size: tuple[int, int], gen: torch.Generator | None, sigma: float = ELASTIC_SIGMA,
                  points: int = ELASTIC_POINTS) -> torch.Tensor:
    """(n, H, W, 2) smooth displacements in grid units ([-1, 1] spans the image)."""
    coarse = torch.randn(n, 2, points, points, generator=gen) * sigma
    field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=True)
    return field.permute(0, 2, 3, 1)


def augment_pair(images: torch.Tensor, masks: torch.Tensor | None, gen: torch.Generator | None,
                 names: Sequence[str] = DEFAULT_SEG_AUGMENT, rotate_deg: float = 10.0, scale: float = 0.1,
                 shift: float = 0.05, contrast: float = 0.15, brightness: float = 0.15
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch of images and its masks with the same random geometry; intensities on images only."""
    names = augment_names(list(names))
    b = images.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    theta = torch.eye(2, 3).repeat(b, 1, 1)
    if "affine" in names:
        ang = u(-rotate_deg, rotate_deg) * math.pi / 180
        s = u(1 - scale, 1 + scale)
        tx, ty = u(-shift, shift) * 2, u(-shift, shift) * 2
        cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if "hflip" in names:
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
        theta = theta.clone()
        theta[:, :, 0] = theta[:, :, 0] * flip[:, None]  # x_in depends on -x_out
    geometric = any(k in names for k in ("affine", "hflip", "elastic"))
    out = images
    if geometric:
        grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
        if "elastic" in names:
            grid = grid + elastic_field(b, tuple(images.shape[-2:]), gen).to(grid)
        low = images.amin(dim=(2, 3), keepdim=True)  # fill outside with the image minimum (the background)
        out = F.grid_sample(images - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + low
        if masks is not None:
            m = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
            masks = m[:, 0].round().long()
    if "brightness_contrast" in names:
        c = u(1 - contrast, 1 + contrast).view(b, 1, 1, 1).to(images)
        br = u(-brightness, brightness).view(b, 1, 1, 1).to(images)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * c + mean + br
    if "gamma" in names:
        lo, hi = (math.log(g) for g in GAMMA_RANGE)
        out = adjust_gamma(out, torch.exp(u(lo, hi)))
    return out, masks
