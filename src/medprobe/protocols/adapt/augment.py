"""Training augmentations for medical images, applied to whole batches on the model's device.

They work on images already scaled to [0, 1] and resized to the training size (before the
backbone's mean/std normalisation). All geometric transforms of one sample (random resized
crop, small affine, horizontal flip) are composed into a single affine map, so a batch costs
one ``grid_sample``; brightness/contrast jitter follows. Slices of one volume share their
random parameters (``groups``), so a volume is transformed consistently.

The horizontal flip is optional and should be left out for left-right sensitive tasks
(situs, laterality, chest radiographs with side markers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medprobe.errors import ConfigError, suggest

AUGMENTATIONS: dict[str, str] = {
    "random_resized_crop": "crop a random area fraction (crop_scale) and aspect ratio (3/4..4/3), resized back",
    "affine": "small rotation (±rotate degrees), translation (±translate of the size) and zoom (±zoom)",
    "brightness_contrast": "additive brightness (±brightness) and contrast about the image mean (×1±contrast)",
    "hflip": "horizontal flip with probability 0.5 (leave out for left-right sensitive tasks)",
}
DEFAULT_AUGMENT: tuple[str, ...] = ("random_resized_crop", "affine", "brightness_contrast", "hflip")


def check_augmentations(names: list[str], where: str = "augment") -> None:
    """Raise :class:`ConfigError` for an unknown or repeated augmentation name."""
    for i, name in enumerate(names):
        if name not in AUGMENTATIONS:
            raise ConfigError(f"{where}[{i}]: {suggest(str(name), AUGMENTATIONS, 'augmentation')}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: an augmentation is listed twice in {names}")


@dataclass(frozen=True)
class AugmentSpec:
    """Which augmentations run and how strong they are."""

    names: tuple[str, ...] = DEFAULT_AUGMENT
    crop_scale: tuple[float, float] = (0.7, 1.0)
    rotate: float = 10.0
    translate: float = 0.05
    zoom: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self) -> None:
        check_augmentations(list(self.names))
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale: expected two area fractions 0 < low <= high <= 1, got {list(self.crop_scale)}")
        for key, value, top in (("rotate", self.rotate, 180.0), ("translate", self.translate, 0.5),
                                ("zoom", self.zoom, 0.5), ("brightness", self.brightness, 1.0),
                                ("contrast", self.contrast, 1.0)):
            if not 0 <= value <= top:
                raise ConfigError(f"{key}: must be within [0, {top:g}], got {value}")

    @property
    def active(self) -> bool:
        return bool(self.names)


class Augmenter:
    """Callable ``(x, generator, groups=None) -> x'`` on a (N, C, H, W) batch in [0, 1]."""

    def __init__(self, spec: AugmentSpec) -> None:
        self.spec = spec

    def _uniform(self, n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    def geometry(self, n: int, g: torch.Generator) -> torch.Tensor | None:
        """(n, 2, 3) maps from output to input coordinates ([-1, 1] grid), or None if no geometric op."""
        names = self.spec.names
        if not any(k in names for k in ("random_resized_crop", "affine", "hflip")):
            return None
        m = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
        if "random_resized_crop" in names:
            lo, hi = self.spec.crop_scale
            area = self._uniform(n, lo, hi, g)
            log_ratio = self._uniform(n, math.log(3 / 4), math.log(4 / 3), g)
            w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
            h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
            cx = (1 - w) * self._uniform(n, -1, 1, g)
            cy = (1 - h) * self._uniform(n, -1, 1, g)
            crop = torch.zeros(n, 3, 3, dtype=torch.float64)
            crop[:, 0, 0], crop[:, 1, 1], crop[:, 0, 2], crop[:, 1, 2], crop[:, 2, 2] = w, h, cx, cy, 1.0
            m = crop @ m
        if "affine" in names:
            s = self.spec
            angle = torch.deg2rad(self._uniform(n, -s.rotate, s.rotate, g))
            zoom = self._uniform(n, 1 - s.zoom, 1 + s.zoom, g)
            tx = self._uniform(n, -2 * s.translate, 2 * s.translate, g)  # [-1, 1] grid spans 2 units
            ty = self._uniform(n, -2 * s.translate, 2 * s.translate, g)
            aff = torch.zeros(n, 3, 3, dtype=torch.float64)
            cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
            aff[:, 0, 0], aff[:, 0, 1], aff[:, 1, 0], aff[:, 1, 1] = cos, -sin, sin, cos
            aff[:, 0, 2], aff[:, 1, 2], aff[:, 2, 2] = tx, ty, 1.0
            m = m @ aff
        if "hflip" in names:
            flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
            m = m @ torch.diag_embed(torch.stack([flip, torch.ones(n, dtype=torch.float64),
                                                  torch.ones(n, dtype=torch.float64)], dim=1))
        return m[:, :2]

    def photometric(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        if "brightness_contrast" not in self.spec.names:
            return None
        s = self.spec
        return (self._uniform(n, -s.brightness, s.brightness, g).float(),
                self._uniform(n, 1 - s.contrast, 1 + s.contrast, g).float())

    def __call__(self, x: torch.Tensor, generator: torch.Generator, groups: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Augment ``x`` (N, C, H, W) in [0, 1]; rows with the same ``groups`` value share parameters."""
        if not self.spec.active:
            return x
        n = int(groups.max()) + 1 if groups is not None and len(groups) else x.shape[0]
        pick = (lambda t: t[groups.to(t.device)]) if groups is not None else (lambda t: t)
        theta = self.geometry(n, generator)
        if theta is not None:
            theta = pick(theta).to(device=x.device, dtype=torch.float32)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        bc = self.photometric(n, generator)
        if bc is not None:
            b, c = (pick(t).to(x.device).view(-1, 1, 1, 1) for t in bc)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * c + mean + b).clamp(0.0, 1.0)
        return x
