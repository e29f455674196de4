"""Cases (2D images or 3D volumes): slicing, reassembly, per-case metrics, NIfTI output.

Predictions are made per item (image or slice) and reassembled into whole cases here, so
metrics are always computed per image / per volume (never per slice) and then averaged over
the test cases, with percentile bootstrap confidence intervals over cases.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medprobe.metrics import MetricValue, aggregate_cases as aggregate  # noqa: F401 (re-export)


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """(D, H, W) -> (n, a, b): the slices along ``axis``, in order (a view)."""
    return np.moveaxis(volume, axis, 0)


def from_slices(slices: np.ndarray | Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Inverse of :func:`to_slices`: stack slices (in order) back into a (D, H, W) volume."""
    return np.ascontiguousarray(np.moveaxis(np.stack(list(slices)), 0, axis))


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes along the array axes (column norms of the affine's 3x3 part)."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(np.linalg.norm(a[:3, k])) for k in range(3))  # type: ignore[return-value]


def write_nifti(path: str | Path, labels: np.ndarray, affine: np.ndarray, slice_axis: int | None = None) -> Path:
    """Write a (D, H, W) label volume as NIfTI aligned with its source image.

    ``affine`` maps (d, h, w) voxel indices to world coordinates (what the manifest adapter's
    ``dataset.affine(i)`` returns). When ``slice_axis`` — the source file's axis that became D —
    is given, the array and affine are put back in the source file's own axis order, so the
    written file has exactly the original affine and shape.
    """
    import nibabel as nib

    data, aff = np.asarray(labels), np.asarray(affine, dtype=np.float64)
    if slice_axis is not None:
        axis = int(slice_axis) % 3
        perm = [axis] + [a for a in range(3) if a != axis]  # file axes -> (D, H, W)
        inv = np.argsort(perm)
        data = np.transpose(data, inv)
        original = aff.copy()
        original[:, :3] = aff[:, inv]
        aff = original
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if data.size == 0 or int(data.max()) <= 255 else np.int16
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data.astype(dtype)), aff), str(path))
    return path


def foreground_slice(mask: np.ndarray, axis: int) -> int:
    """Index of the slice along ``axis`` with the most foreground (the middle one if empty)."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    counts = (mask > 0).sum(axis=other)
    return int(np.argmax(counts)) if counts.max() > 0 else mask.shape[axis] // 2


def iter_cases(owner: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]]
               ) -> Iterable[tuple[int, list[np.ndarray]]]:
    """Group per-item predictions ``(positions, labels)`` (in item order) into cases.

    Yields ``(case position, [item labels in slice order])`` as soon as a case is complete.
    """
    current, parts = None, []
    for positions, labels in chunks:
        for p, lab in zip(positions, labels):
            c = int(owner[p])
            if current is not None and c != current:
                yield current, parts
                parts = []
            current = c
            parts.append(lab)
    if current is not None:
        yield current, parts
