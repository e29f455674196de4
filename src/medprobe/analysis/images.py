"""Shared plumbing of the analyses: pick images, prepare them for a backbone, run it, draw overlays.

Images come from a dataset adapter (``build_dataset``) or from files (PNG, DICOM, NIfTI,
NumPy); volumes contribute 2D slices. :func:`prepare` returns both the normalised model
input and the same pixels before normalisation (resized/cropped exactly as the model saw
them), so every heat map is drawn over the image in the model's own geometry.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medprobe.backbones.base import Backbone
from medprobe.data.preprocess import Preprocessor
from medprobe.errors import ConfigError, DataError


@dataclass
class ImageSet:
    """2D images in native units, their display names and the intensity range to scale them by."""

    images: list[np.ndarray]
    names: list[str]
    value_range: tuple[float, float] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def __post_init__(self) -> None:
        if len(self.images) != len(self.names):
            raise ValueError(f"{len(self.images)} images but {len(self.names)} names")
        for im, name in zip(self.images, self.names):
            if im.ndim != 2 and not (im.ndim == 3 and im.shape[-1] in (3, 4)):
                raise DataError(f"{name}: expected a 2D image (H, W) or (H, W, 3), got shape {im.shape}")


def _is_volume(arr: np.ndarray) -> bool:
    return arr.ndim == 3 and arr.shape[-1] not in (3, 4)


def _pick_slices(volume: np.ndarray, slices: Sequence[int] | None, name: str) -> list[tuple[int, np.ndarray]]:
    depth = volume.shape[0]
    chosen = list(slices) if slices else [depth // 2]
    out = []
    for z in chosen:
        zz = z + depth if z < 0 else z
        if not 0 <= zz < depth:
            raise ConfigError(f"{name}: slice {z} is out of range; the volume has {depth} slices along the slicing "
                              f"axis (0..{depth - 1})")
        out.append((zz, volume[zz]))
    return out


def images_from_files(paths: Sequence[str | Path], slices: Sequence[int] | None = None,
                      slice_axis: int = 2) -> ImageSet:
    """Read image files; a volume gives the slices ``slices`` (default: the middle one).

    Volumes with a geometry (NIfTI, MHA/MHD/NRRD, a folder of DICOM slices) are read in the
    canonical orientation (:func:`medprobe.data.volume.read_volume`) and cut along the plane
    ``slice_axis`` (2 axial, 1 coronal, 0 sagittal), so every slice is drawn in the radiological
    convention whatever the file's axis order; multi-frame DICOM and 3D arrays are cut along
    their first axis.
    """
    from medprobe.data.readers import read_image
    from medprobe.data.volume import read_volume, volume_kind
    images, names = [], []
    for path in paths:
        p = Path(path)
        arr = read_volume(p, slice_axis=slice_axis)[0] if volume_kind(p) in ("nifti", "itk", "dicom_series") \
            else read_image(p)
        if _is_volume(arr):
            for z, im in _pick_slices(arr, slices, p.name):
                images.append(im)
                names.append(f"{p.name} [slice {z}]")
        else:
            if slices:
                raise ConfigError(f"{p}: --slices applies to volumes, but this file is a 2D image {arr.shape}")
            images.append(arr)
            names.append(p.name)
    if not images:
        raise ConfigError("no images given")
    return ImageSet(images, names, None, source=", ".join(str(p) for p in paths))


def images_from_dataset(adapter: str, root: str | Path | None = None, options: dict[str, Any] | None = None, *,
                        split: str | None = None, indices: Sequence[int] | None = None, n: int = 4,
                        slices: Sequence[int] | None = None) -> ImageSet:
    """Images ``indices`` (positions within ``split``, or within the whole dataset) of a dataset
    built by adapter ``adapter``; by default the first ``n``. Volumes give ``slices`` (default middle)."""
    from medprobe.data.adapters import build_dataset
    ds = build_dataset(adapter, root, **(options or {}))
    if split is not None:
        if split not in ds.splits():
            raise ConfigError(f"dataset {ds.name!r} has no split {split!r}; it has {', '.join(ds.splits())}")
        pool = [int(i) for i in ds.indices(split)]
    else:
        pool = list(range(len(ds)))
    chosen = list(indices) if indices is not None else list(range(min(n, len(pool))))
    if not chosen:
        raise ConfigError(f"dataset {ds.name!r}{f' split {split!r}' if split else ''} has no images")
    for i in chosen:
        if not 0 <= i < len(pool):
            raise ConfigError(f"image index {i} is out of range: dataset {ds.name!r}"
                              f"{f' split {split!r}' if split else ''} has {len(pool)} images (0..{len(pool) - 1})")
    images, names = [], []
    for i in chosen:
        rec = ds.records[pool[i]]
        arr = ds.load_image(pool[i])
        if ds.ndim == 3 or _is_volume(arr):
            for z, im in _pick_slices(arr, slices, rec.key):
                images.append(im)
                names.append(f"{rec.key} [slice {z}]")
        else:
            images.append(arr)
            names.append(rec.key)
    return ImageSet(images, names, getattr(ds, "value_range", None), source=f"{adapter}:{root or ''}")


@dataclass
class Prepared:
    """Model input (B, 3, S, S), the same pixels in [0, 1] before normalisation (B, S, S, 3), the grid."""

    inputs: torch.Tensor
    display: np.ndarray
    grid: tuple[int, int]
    image_size: int
    geometry: list[dict[str, float]] = field(default_factory=list)


def check_image_size(backbone: Backbone, image_size: int | None) -> int:
    """``image_size`` (default: the backbone's) checked to be a multiple of the patch size."""
    size = int(image_size or backbone.default_image_size)
    if size < 1:
        raise ConfigError(f"image size must be positive, got {size}")
    p = backbone.patch_size
    if p and size % p:
        raise ConfigError(f"image size {size} is not a multiple of {backbone.name}'s patch size {p}; use e.g. "
                          f"{size - size % p or p}")
    return size


def _geometry(shape: tuple[int, int], spec_resize: str, size: int) -> dict[str, float]:
    """How native pixel (x, y) maps to model-input pixels: x' = x * sx - left, y' = y * sy - top."""
    h, w = shape
    if spec_resize == "shortest_edge+center_crop":
        r = size / min(h, w)
        nh, nw = max(size, round(h * r)), max(size, round(w * r))
        return {"sx": nw / w, "sy": nh / h, "left": (nw - size) // 2, "top": (nh - size) // 2, "h": h, "w": w}
    return {"sx": size / w, "sy": size / h, "left": 0, "top": 0, "h": h, "w": w}


def prepare(backbone: Backbone, images: ImageSet, image_size: int | None = None) -> Prepared:
    """Preprocess ``images`` for ``backbone`` exactly as feature extraction does."""
    size = check_image_size(backbone, image_size)
    pre = Preprocessor(backbone.preprocess, size, images.value_range)
    tensors = [pre.to_tensor(im, name) for im, name in zip(images.images, images.names)]
    resized = torch.cat([pre.resize(t[None]) for t in tensors])
    display = resized.clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)
    patch = backbone.patch_size or 1
    geometry = [_geometry(im.shape[:2], backbone.preprocess.resize, size) for im in images.images]
    return Prepared(pre.normalize(resized).contiguous(), display, (size // patch, size // patch), size, geometry)


def device_of(backbone: Backbone) -> torch.device:
    try:
        return next(backbone.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def patch_tokens(backbone: Backbone, inputs: torch.Tensor, block: int = -1, batch_size: int = 16) -> torch.Tensor:
    """Patch tokens (B, D, h, w) of block ``block`` (normed like the final output), float32 on CPU."""
    require_patch_tokens(backbone, "this analysis")
    idx = backbone.resolve_blocks([block])[0]
    dev = device_of(backbone)
    out = []
    for s in range(0, len(inputs), batch_size):
        res = backbone.forward_tokens(inputs[s:s + batch_size].to(dev), blocks=[idx])
        out.append(res.blocks[0].patch_grid.float().cpu())
    return torch.cat(out)


def require_patch_tokens(backbone: Backbone, what: str) -> None:
    """:class:`ConfigError` unless ``backbone`` is a ViT with patch tokens."""
    if not backbone.is_vit or not backbone.patch_size:
        raise ConfigError(f"{what} needs a vision transformer with patch tokens; {backbone.name} is a CNN whose "
                          f"feature maps are not patch tokens. Choose a ViT backbone (e.g. dinov2_vits14, rad_dino)")


# --------------------------------------------------------------------------- drawing
def show_image(ax: Any, image: np.ndarray, title: str | None = None) -> None:
    """Draw a (S, S, 3) image in [0, 1] (grayscale images show as gray) without axes."""
    h, w = image.shape[:2]
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="bilinear",
              extent=(0, w, h, 0))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def overlay(ax: Any, image: np.ndarray, heat: np.ndarray, *, cmap: str = "inferno", alpha: float = 0.55,
            vmin: float | None = None, vmax: float | None = None, title: str | None = None) -> Any:
    """Draw ``heat`` (h, w) stretched over ``image`` (S, S, 3); returns the heat map's artist."""
    show_image(ax, image, title)
    s_h, s_w = image.shape[:2]
    art = ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, extent=(0, s_w, s_h, 0),
                    interpolation="nearest")
    ax.set_xlim(0, s_w)
    ax.set_ylim(s_h, 0)
    return art


def ensure_dir(path: str | Path) -> Path:
    """Create the output folder ``path``; :class:`ConfigError` if that is impossible."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"cannot use {out} as output folder: it or one of its parents is a file") from None
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e.strerror}") from None
    return out


def write_caption(png: Path, title: str, description: str, **extra: Any) -> Path:
    """Write the sidecar ``<png>.json`` the HTML report uses as the picture's caption."""
    meta = {"title": title, "description": description, **extra}
    path = png.with_suffix(".json")
    path.write_text(json.dumps(meta, indent=1, default=str))
    return path


def short_names(names: Sequence[str], width: int = 28) -> list[str]:
    """Names cut to ``width`` characters in the middle (keeps the start and e.g. a ``[slice k]`` tail)."""
    head = max(1, (width - 1) // 2)
    return [n if len(n) <= width else n[:head] + "…" + n[-(width - 1 - head):] for n in names]
