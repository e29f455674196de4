"""Training and test *items* of a segmentation dataset: 2D images, or slices of 3D volumes.

An item is what the backbone sees: one 2D image. For 3D datasets each volume (D, H, W) is cut
into slices along ``slice_axis`` (0 = D, the dataset's own slice order), in volume order;
``SplitItems.owner`` maps items back to their volume. Masks are brought to the network's
input geometry with nearest-neighbour resizing (the same square resize or shortest-edge
resize + centre crop the :class:`~medprobe.data.preprocess.Preprocessor` applies to images);
logits go back to the native geometry with bilinear resizing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medprobe.data.base import ImageDataset
from medprobe.data.preprocess import Preprocessor
from medprobe.errors import DataError


def source_of(dataset: ImageDataset, index: int) -> str:
    """The file (or record key) that names record ``index`` in error messages."""
    rec = dataset.records[index]
    return rec.image_path or rec.key


def mask_source_of(dataset: ImageDataset, index: int) -> str:
    rec = dataset.records[index]
    return rec.mask_path or rec.image_path or rec.key


@dataclass(frozen=True)
class Geometry:
    """How a native 2D item maps onto the square network input of side ``size``."""

    size: int
    resize: str = "square"  # or a centre-crop policy of medprobe.data.preprocess.RESIZE_SCALE

    def crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(resized h, resized w, top, left) of the centre crop; the crop is the whole image for square."""
        from medprobe.data.preprocess import crop_box
        return crop_box(h, w, self.size, self.resize)  # the same geometry as the images

    def mask_to_input(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) labels -> (S, S) labels (nearest neighbour), uint8."""
        h, w = mask.shape
        nh, nw, top, left = self.crop_box(h, w)
        t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        if (nh, nw) != (h, w):
            t = F.interpolate(t, size=(nh, nw), mode="nearest-exact")
        t = t[..., top:top + self.size, left:left + self.size]
        return t[0, 0].round().to(torch.uint8).numpy()

    def logits_to_native(self, logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """(B, C, S, S) logits -> (B, C, H, W); outside a centre crop everything is background."""
        h, w = shape
        nh, nw, top, left = self.crop_box(h, w)
        if (top, left, nh, nw) != (0, 0, self.size, self.size):
            canvas = logits.new_full((logits.shape[0], logits.shape[1], nh, nw), -20.0)
            canvas[:, 0] = 20.0
            canvas[..., top:top + self.size, left:left + self.size] = logits
            logits = canvas
        if tuple(logits.shape[-2:]) != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits


def check_mask(dataset: ImageDataset, index: int, image_shape: tuple[int, ...], mask: np.ndarray) -> np.ndarray:
    """Validate a mask against its image and the declared classes; errors name the file."""
    src, msrc = source_of(dataset, index), mask_source_of(dataset, index)
    shape = image_shape[:2] if dataset.ndim == 2 and len(image_shape) == 3 else tuple(image_shape)
    if len(shape) == 3 and mask.ndim == 2:
        raise DataError(f"{msrc}: 2D mask {mask.shape} for the 3D image {src} {shape}; expected a mask volume "
                        f"of the same shape")
    if tuple(mask.shape) != tuple(shape):
        raise DataError(f"{msrc}: mask shape {mask.shape} differs from the shape {shape} of its image {src}")
    c = dataset.task.num_classes
    if mask.size and (mask.min() < 0 or mask.max() >= c):
        bad = np.unique(mask[(mask < 0) | (mask >= c)])[:10]
        raise DataError(f"{msrc}: mask has values {', '.join(str(int(v)) for v in bad)} outside the declared "
                        f"classes 0..{c - 1} ({', '.join(dataset.task.class_names)})")
    return mask


@dataclass
class SplitItems:
    """The items of one split: which record each comes from, and which slice."""

    split: str
    records: np.ndarray  # dataset indices of the split's records, in dataset order
    owner: np.ndarray  # (n_items,) position in ``records`` of each item
    slice_index: np.ndarray  # (n_items,) slice number within its volume (0 for 2D)
    shapes: list[tuple[int, ...]]  # native image shape of each record ((H, W) or (D, H, W))
    slice_axis: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.owner)

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """Item rows of the records at ``positions`` (in ``records``), in item order."""
        return np.flatnonzero(np.isin(self.owner, positions))

    def item_shape(self, position: int) -> tuple[int, int]:
        shape = self.shapes[position]
        if len(shape) == 3:
            return tuple(s for a, s in enumerate(shape) if a != self.slice_axis)  # type: ignore[return-value]
        return shape[0], shape[1]


def _as_items(dataset: ImageDataset, image: np.ndarray, axis: int) -> list[np.ndarray]:
    if dataset.ndim == 3:
        return list(np.moveaxis(image, axis, 0))
    return [image]


def build_items(dataset: ImageDataset, split: str, slice_axis: int = 0) -> SplitItems:
    """List the items of ``split`` (reads every image once to learn shapes and slice counts)."""
    records = dataset.indices(split)
    owner, slices, shapes = [], [], []
    for pos, i in enumerate(records):
        image = dataset.load_image(int(i))
        if dataset.ndim == 3 and image.ndim != 3:
            raise DataError(f"{source_of(dataset, int(i))}: expected a volume (D, H, W) in a 3D dataset, "
                            f"got shape {image.shape}")
        shapes.append(tuple(image.shape[:2]) if dataset.ndim == 2 else tuple(image.shape))
        n = image.shape[slice_axis] if dataset.ndim == 3 else 1
        owner += [pos] * n
        slices += list(range(n))
    return SplitItems(split, records, np.asarray(owner, dtype=np.int64), np.asarray(slices, dtype=np.int64), shapes,
                      slice_axis)


def load_case(dataset: ImageDataset, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Native image and validated mask of record ``index``."""
    image = dataset.load_image(index)
    mask = check_mask(dataset, index, image.shape, np.asarray(dataset.load_mask(index)))
    return image, mask


def input_masks(dataset: ImageDataset, items: SplitItems, geometry: Geometry) -> np.ndarray:
    """(n_items, S, S) uint8 masks in the network's input geometry (memoised on ``items``)."""
    key = f"masks:{geometry}"
    if key not in items.cache:
        out = np.zeros((len(items), geometry.size, geometry.size), dtype=np.uint8)
        row = 0
        for i in items.records:
            _, mask = load_case(dataset, int(i))
            for m in _as_items(dataset, mask, items.slice_axis):
                out[row] = geometry.mask_to_input(m)
                row += 1
        items.cache[key] = out
    return items.cache[key]


def input_images(dataset: ImageDataset, items: SplitItems, pre: Preprocessor, batch: int = 64) -> np.ndarray:
    """(n_items, 3, S, S) float16 preprocessed images (memoised on ``items``)."""
    key = f"images:{pre.image_size}:{pre.describe()}"
    if key not in items.cache:
        out = np.zeros((len(items), 3, pre.image_size, pre.image_size), dtype=np.float16)
        row = 0
        for i in items.records:
            image = dataset.load_image(int(i))
            src = source_of(dataset, int(i))
            parts = _as_items(dataset, image, items.slice_axis)
            for start in range(0, len(parts), batch):
                chunk = parts[start:start + batch]
                out[row:row + len(chunk)] = pre(chunk, [f"{src}[slice {start + k}]" for k in range(len(chunk))]
                                                ).numpy().astype(np.float16)
                row += len(chunk)
        items.cache[key] = out
    return items.cache[key]


def item_slices(dataset: ImageDataset, array: np.ndarray, axis: int) -> list[np.ndarray]:
    """A record's native image or mask as its list of 2D items."""
    return _as_items(dataset, array, axis)
