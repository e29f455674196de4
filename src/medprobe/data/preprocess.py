"""Turn a medical image into exactly what one backbone expects.

Intensities are scaled to [0, 1] (by the dataset's known value range, e.g. 0-255 for 8-bit
MedMNIST, else per image between the 0.5th and 99.5th percentiles, which suits DICOM and
NIfTI units), grayscale is repeated to 3 channels, the image is resized with the backbone's
resize policy and normalised with the backbone's own mean/std. :meth:`Preprocessor.prepare`
resizes the native image before scaling, so the per-pixel work happens at the target size.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medprobe.backbones.base import PreprocessSpec
from medprobe.errors import DataError


#: percentiles are taken on a strided subsample of at most about this many pixels
PERCENTILE_SAMPLE = 1 << 18


def intensity_range(image: np.ndarray, value_range: tuple[float, float] | None) -> tuple[float, float]:
    """(lo, hi) mapped to (0, 1): ``value_range``, else the image's 0.5th/99.5th percentiles.

    Percentiles of a large image are taken on a regular strided subsample (every k-th row and
    column, at most ~``PERCENTILE_SAMPLE`` pixels); images up to that size use every pixel.
    """
    if value_range is not None:
        return float(value_range[0]), float(value_range[1])
    if image.size <= 16:
        return float(image.min()), float(image.max())
    h, w = image.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / PERCENTILE_SAMPLE))))
    sample = image[::step, ::step]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    return lo, hi


def scale_intensity(image: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Map native intensities to [0, 1] (float32; no float64 copy of the image)."""
    lo, hi = intensity_range(image, value_range)
    scale = (hi - lo) if hi > lo else 1.0
    out = np.subtract(image, np.float32(lo), dtype=np.float32)
    out *= np.float32(1.0 / scale)
    return np.clip(out, 0.0, 1.0, out=out)


def crop_box(h: int, w: int, size: int, resize: str) -> tuple[int, int, int, int]:
    """(resized h, resized w, top, left) of the centre crop of side ``size`` from an (h, w) image.

    ``square``: the whole image resized to ``size`` x ``size``. ``shortest_edge+center_crop``:
    shortest edge to ``size``, centre crop. ``resize256_crop224``: shortest edge to
    ``round(size * 256 / 224)``, centre crop ``size`` (torchvision's Resize(256) + CenterCrop(224)
    evaluation, scaled to the image size; the WACV study's preprocessing).
    """
    if resize == "square":
        return size, size, 0, 0
    if resize not in RESIZE_SCALE:
        raise ValueError(f"unknown resize policy {resize!r}; allowed: square, {', '.join(RESIZE_SCALE)}")
    edge = round(size * RESIZE_SCALE[resize])
    r = edge / min(h, w)
    nh, nw = max(edge, round(h * r)), max(edge, round(w * r))
    return nh, nw, (nh - size) // 2, (nw - size) // 2


#: resize policies with a centre crop: shortest edge scaled to this multiple of the input size
RESIZE_SCALE = {"shortest_edge+center_crop": 1.0, "resize256_crop224": 256 / 224}


class Preprocessor:
    """Callable mapping a list of 2D images (H, W) or (H, W, 3) to a (B, 3, S, S) tensor."""

    def __init__(self, spec: PreprocessSpec, image_size: int, value_range: tuple[float, float] | None = None) -> None:
        self.spec = spec
        self.image_size = int(image_size)
        self.value_range = value_range
        lo, hi = spec.input_range
        self._mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std).view(1, 3, 1, 1)
        self._lo, self._span = lo, hi - lo

    def describe(self) -> dict:
        return {"mean": list(self.spec.mean), "std": list(self.spec.std), "input_range": list(self.spec.input_range),
                "resize": self.spec.resize, "interpolation": self.spec.interpolation, "image_size": self.image_size,
                "value_range": list(self.value_range) if self.value_range else "per-image p0.5-p99.5",
                "order": "range, resize, scale+clip"}

    def to_tensor(self, image: np.ndarray, source: str = "") -> torch.Tensor:
        """(H, W) or (H, W, 3) native image -> (3, H, W) float tensor in [0, 1]."""
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise DataError(f"{source or 'image'}: expected a 2D image (H, W) or (H, W, 3), got shape {image.shape}")
        if not np.isfinite(image).all():
            raise DataError(f"{source or 'image'}: contains NaN or infinite pixel values")
        image = scale_intensity(image[..., :3], self.value_range)
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return t.expand(3, -1, -1) if t.shape[0] == 1 else t

    def resize(self, batch: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        mode = self.spec.interpolation
        h, w = batch.shape[-2:]
        if self.spec.resize != "square":
            nh, nw, top, left = crop_box(h, w, s, self.spec.resize)
            if (nh, nw) != (h, w):
                batch = F.interpolate(batch, size=(nh, nw), mode=mode, align_corners=False, antialias=True)
            return batch[..., top:top + s, left:left + s]
        if (h, w) != (s, s):
            batch = F.interpolate(batch, size=(s, s), mode=mode, align_corners=False, antialias=True)
        return batch

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        return ((batch * self._span + self._lo) - self._mean) / self._std

    def scaled(self, image: np.ndarray, source: str = "", expand: bool = True) -> torch.Tensor:
        """One native image -> (C, S, S) float32 in [0, 1], the cheap way (C = 3, or 1 for a
        grayscale image when not ``expand``).

        The intensity range is found first (on a subsample), then the native image is resized
        and only the small result is scaled and clipped: no full-size float copy beyond the one
        the resize needs.
        """
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise DataError(f"{source or 'image'}: expected a 2D image (H, W) or (H, W, 3), got shape {image.shape}")
        image = image[..., :3]
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise DataError(f"{source or 'image'}: contains NaN or infinite pixel values")
        lo, hi = intensity_range(image, self.value_range)
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        t = self.resize(t)[0]
        t = ((t - lo) / ((hi - lo) if hi > lo else 1.0)).clamp_(0.0, 1.0)
        return t.expand(3, -1, -1) if expand and t.shape[0] == 1 else t

    def prepare(self, image: np.ndarray, source: str = "") -> torch.Tensor:
        """One native image -> the normalised (3, S, S) input (see :meth:`scaled`)."""
        return self.normalize(self.scaled(image, source)[None])[0].contiguous()

    def __call__(self, images: Sequence[np.ndarray], sources: Sequence[str] | None = None) -> torch.Tensor:
        sources = sources or [""] * len(images)
        return torch.stack([self.prepare(im, src) for im, src in zip(images, sources)])
