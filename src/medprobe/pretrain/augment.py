"""Multi-crop augmentation for self-supervised pretraining (DINOv2, with RAD-DINO's radiograph changes).

Every image gives 2 global and ``n_local`` local views. Each view is a random resized crop
(area fraction and aspect ratio as torchvision's ``RandomResizedCrop``, or, with
``crops.mode: side``, a square whose side is drawn uniformly in pixels as RAD-DINO), a horizontal flip,
colour jitter (brightness/contrast for every image; saturation, hue and random grayscale
only for RGB images), Gaussian blur with a per-view probability and, for the second global
view, optional solarisation. All randomness comes from a :class:`random.Random` handed in,
so a view is a pure function of (image, seed): runs are reproducible and resumable.
Images are (C, H, W) float tensors in [0, 1] with C = 1 (grayscale) or 3 (RGB).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medprobe.pretrain.config import AugmentConfig, CropsConfig

_RGB_TO_GRAY = (0.299, 0.587, 0.114)


@dataclass
class Views:
    """The views of one image: 2 global (C, G, G) and ``n_local`` local (C, L, L) tensors."""

    globals: list[torch.Tensor]
    locals: list[torch.Tensor]


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect in ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: the central crop with the aspect ratio clamped to the allowed range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def side_box(height: int, width: int, side: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, s, s) of a square crop with side drawn from U(side) pixels (RAD-DINO), capped by the image."""
    s = int(round(rng.uniform(*side)))
    s = max(1, min(s, height, width))
    return rng.randint(0, height - s), rng.randint(0, width - s), s, s


def resize(image: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """(C, H, W) -> (C, size, size), antialiased when shrinking, clamped to [0, 1]."""
    if image.shape[-2:] == (size, size):
        return image
    out = F.interpolate(image[None], size=(size, size), mode=mode, align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def _blur_matrix(n: int, sigma: float, radius: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix applying a 1D Gaussian with reflect padding along one axis."""
    offsets = torch.arange(-radius, radius + 1)
    k = torch.exp(-0.5 * (offsets.to(dtype) / sigma) ** 2)
    k = k / k.sum()
    idx = torch.arange(n)[:, None] + offsets[None, :]
    idx = idx.abs()  # reflect at 0 (…, 2, 1, 0, 1, 2 …)
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)
    m = torch.zeros(n, n, dtype=dtype)
    m.scatter_add_(1, idx, k.expand(n, -1).contiguous())
    return m


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, H, W) image (kernel radius ceil(3 sigma), reflect padding).

    Written as two small matrix products, which is much faster than a convolution for the
    small crops of pretraining.
    """
    h, w = image.shape[-2:]
    radius = min(max(1, int(math.ceil(3.0 * sigma))), h - 1, w - 1)
    if radius < 1:
        return image
    mh = _blur_matrix(h, sigma, radius, image.dtype)
    mw = mh if w == h else _blur_matrix(w, sigma, radius, image.dtype)
    return mh @ image @ mw.t()


def _gray(image: torch.Tensor) -> torch.Tensor:
    if image.shape[0] == 1:
        return image
    w = torch.tensor(_RGB_TO_GRAY, dtype=image.dtype).view(3, 1, 1)
    return (image * w).sum(0, keepdim=True)


def _hue_shift(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the chroma of an RGB image by ``shift`` turns (in YIQ space)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=image.dtype)
    a = 2 * math.pi * shift
    rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=image.dtype)
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,jhw->ihw", m, image)


class MultiCrop:
    """Callable ``(image, rng) -> Views`` implementing the configured multi-crop augmentation."""

    def __init__(self, crops: CropsConfig, augment: AugmentConfig) -> None:
        self.crops = crops
        self.aug = augment

    def _photometric(self, img: torch.Tensor, rng: random.Random, blur_p: float, solarize_p: float) -> torch.Tensor:
        a = self.aug
        rgb = img.shape[0] == 3
        if rng.random() < a.hflip:
            img = img.flip(-1)
        if rng.random() < a.jitter_p:
            if a.brightness > 0:
                img = img * rng.uniform(1 - a.brightness, 1 + a.brightness)
            if a.contrast > 0:
                mean = _gray(img).mean()
                img = (img - mean) * rng.uniform(1 - a.contrast, 1 + a.contrast) + mean
            if rgb and a.saturation > 0:
                g = _gray(img)
                img = (img - g) * rng.uniform(1 - a.saturation, 1 + a.saturation) + g
            if rgb and a.hue > 0:
                img = _hue_shift(img, rng.uniform(-a.hue, a.hue))
            img = img.clamp(0.0, 1.0)
        if rgb and a.grayscale_p > 0 and rng.random() < a.grayscale_p:
            img = _gray(img).expand(3, -1, -1)
        if blur_p > 0 and rng.random() < blur_p:
            img = gaussian_blur(img, rng.uniform(*a.blur_sigma))
        if solarize_p > 0 and rng.random() < solarize_p:
            img = torch.where(img >= 0.5, 1.0 - img, img)
        return img.contiguous()

    def box(self, height: int, width: int, which: str, rng: random.Random) -> tuple[int, int, int, int]:
        """The crop (top, left, h, w) of one ``global`` or ``local`` view under the configured mode."""
        c = self.crops
        if c.mode == "side":
            return side_box(height, width, c.side_range(which), rng)
        scale = c.global_scale if which == "global" else c.local_scale
        return crop_box(height, width, (scale[0], scale[1]), (c.ratio[0], c.ratio[1]), rng)

    def _view(self, image: torch.Tensor, size: int, which: str, rng: random.Random, blur_p: float,
              solarize_p: float = 0.0) -> torch.Tensor:
        h, w = image.shape[-2:]
        top, left, ch, cw = self.box(h, w, which, rng)
        view = resize(image[:, top:top + ch, left:left + cw], size, self.aug.interpolation)
        return self._photometric(view, rng, blur_p, solarize_p)

    def __call__(self, image: torch.Tensor, rng: random.Random) -> Views:
        c, a = self.crops, self.aug
        g1 = self._view(image, c.global_size, "global", rng, a.blur_p[0])
        g2 = self._view(image, c.global_size, "global", rng, a.blur_p[1], a.solarize_p)
        locs = [self._view(image, c.local_size, "local", rng, a.blur_p[2]) for _ in range(c.n_local)]
        return Views([g1, g2], locs)
