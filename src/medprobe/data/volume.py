"""Volumes with their geometry: one canonical orientation, optional resampling, CT windows.

Every 3D reader (NIfTI through nibabel, MHA/MHD/NRRD through SimpleITK, DICOM series through
pydicom or SimpleITK) ends in :func:`read_volume`, which returns the voxels and a
:class:`VolumeGeometry`:

* **Orientation.** The file's voxel-to-world affine (RAS+ world, mm) gives its axis codes
  (``nibabel.aff2axcodes``, e.g. ``LPS`` for a DICOM-ordered file). The array is reoriented
  with nibabel's canonical machinery (``io_orientation`` / ``apply_orientation``, as
  ``as_closest_canonical``) to a fixed layout ``(D, H, W)`` that depends only on the anatomy,
  never on how the file was stored. For the default ``slice_axis=2`` (axial) the layout is
  ``SPL``: D runs inferior→superior, H anterior→posterior (anterior at the top of a slice),
  W right→left (the patient's right on the viewer's left): every slice is already in the
  radiological display convention. ``slice_axis=1`` (coronal) gives ``AIL``, ``0``
  (sagittal) ``RIP``. So the same scan stored with flipped or permuted axes and the matching
  affine yields identical arrays, slices, embeddings and metrics.
* **Spacing.** ``spacing=(d, h, w)`` in mm resamples onto that grid (linear for images,
  nearest for masks; first voxel centre kept), and the affine follows.
* **Back to the file.** :func:`to_source` undoes both (nearest resampling back, inverse
  reorientation) so a prediction is written with exactly the source affine and shape.

CT intensities: :func:`window_range` turns ``window: [center, width]`` or a named preset
(lung, mediastinum, abdomen, bone, brain) into the fixed Hounsfield range a dataset uses as its
``value_range``; MR keeps per-image percentile scaling.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.errors import ConfigError, DataError

#: Axis codes (D, H, W) of the canonical layout for each slicing axis of the RAS volume.
LAYOUTS: dict[int, tuple[str, str, str]] = {2: ("S", "P", "L"), 1: ("A", "I", "L"), 0: ("R", "I", "P")}
PLANES = {2: "axial", 1: "coronal", 0: "sagittal"}

#: Hounsfield windows (center, width) of the named presets.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
ITK_EXTENSIONS = (".mha", ".mhd", ".nrrd", ".nhdr")


# --------------------------------------------------------------------------- windows and spacing options
def window_range(window: Any, where: str = "window") -> tuple[float, float] | None:
    """``[center, width]`` or a preset name -> the (low, high) Hounsfield range; None stays None."""
    if window is None or (isinstance(window, str) and window.strip().lower() in ("", "none")):
        return None
    if isinstance(window, str):
        name = window.strip().lower()
        if name not in WINDOW_PRESETS:
            raise ConfigError(f"{where}: unknown window {window!r}; use [center, width] in Hounsfield units or one "
                              f"of {', '.join(WINDOW_PRESETS)}")
        center, width = WINDOW_PRESETS[name]
    else:
        try:
            center, width = (float(v) for v in window)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected [center, width] in Hounsfield units or a preset name "
                              f"({', '.join(WINDOW_PRESETS)}), got {window!r}") from None
        if not (np.isfinite(center) and np.isfinite(width) and width > 0):
            raise ConfigError(f"{where}: window width must be > 0 and both values finite, got {window!r}")
    return center - width / 2.0, center + width / 2.0


def spacing_option(value: Any, where: str = "spacing") -> tuple[float, float, float] | None:
    """``[d, h, w]`` voxel sizes in mm (or one number for all three); None stays None."""
    if value is None:
        return None
    items = [value] * 3 if isinstance(value, (int, float)) else value
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected [d, h, w] voxel sizes in mm, got {value!r}") from None
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise ConfigError(f"{where}: expected three positive voxel sizes [d, h, w] in mm, got {value!r}")
    return out  # type: ignore[return-value]


def describe_intensity(window: Any, modality: str | None = None) -> str:
    """The intensity policy as text (part of a dataset's fingerprint)."""
    rng = window_range(window)
    if rng is None:
        return "percentile"
    return f"window={window if isinstance(window, str) else list(window)}->HU[{rng[0]:g},{rng[1]:g}]"


# --------------------------------------------------------------------------- geometry
def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes along the array axes (column norms of the affine's 3x3 part)."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(np.linalg.norm(a[:3, k])) for k in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the voxels of a returned volume are, and how to get back to the file's own layout."""

    affine: np.ndarray           # (d, h, w, 1) of the returned array -> RAS+ world (mm)
    shape: tuple[int, int, int]  # of the returned array
    orientation: str             # axis codes of (d, h, w), e.g. "SPL"
    source_affine: np.ndarray    # the file's own voxel -> RAS+ affine
    source_shape: tuple[int, int, int]
    source_orientation: str      # axis codes of the file's axes, e.g. "LPS"
    transform: np.ndarray        # nibabel orientation transform: file axes -> canonical axes
    canonical_affine: np.ndarray  # affine after reorientation, before resampling
    canonical_shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return voxel_sizes(self.affine)

    @property
    def resampled(self) -> bool:
        return self.shape != self.canonical_shape or not np.allclose(self.affine, self.canonical_affine)

    def describe(self) -> dict[str, Any]:
        return {"orientation": self.orientation, "source_orientation": self.source_orientation,
                "shape": list(self.shape), "spacing": [round(v, 6) for v in self.spacing],
                "source_shape": list(self.source_shape), "resampled": self.resampled}

    def agrees(self, other: "VolumeGeometry", atol: float = 1e-3) -> bool:
        """Same grid: shape and affine (within ``atol`` mm)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=atol))


def axcodes(affine: np.ndarray) -> str:
    import nibabel as nib
    return "".join(c or "?" for c in nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def reorient(data: np.ndarray, affine: np.ndarray, target: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``data`` (i, j, k) with voxel->RAS ``affine`` brought to the axis codes ``target``.

    Returns ``(array, affine, transform)``; ``transform`` is nibabel's orientation transform
    (``apply_orientation(data, transform)`` is the array).
    """
    from nibabel import orientations as ornt

    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"voxel-to-world affine is singular or not finite: {affine.tolist()}")
    src = ornt.io_orientation(affine)
    transform = ornt.ornt_transform(src, ornt.axcodes2ornt(tuple(target)))
    out = ornt.apply_orientation(data, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, data.shape[:3])
    return np.ascontiguousarray(out), new_affine, transform


def resample(volume: np.ndarray, affine: np.ndarray, spacing: Sequence[float], order: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Resample onto voxel sizes ``spacing`` (same axes and first voxel centre); ``order`` 1 linear, 0 nearest."""
    old = np.asarray(voxel_sizes(affine))
    new = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(np.floor((n - 1) * o / s + 1e-6)) + 1 for n, o, s in zip(volume.shape, old, new))
    new_affine = np.asarray(affine, dtype=np.float64).copy()
    new_affine[:3, :3] = new_affine[:3, :3] * (new / old)[None, :]
    return resample_to(volume, affine, shape, new_affine, order), new_affine


def resample_to(volume: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                order: int) -> np.ndarray:
    """``volume`` (on ``affine``) sampled at the voxel centres of the grid (``shape``, ``target_affine``)."""
    from scipy import ndimage

    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    if order == 0 and volume.dtype.kind in "iub":
        src = volume
    else:
        src = volume.astype(np.float32, copy=False)
    out = ndimage.affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=tuple(int(s) for s in shape),
                                   order=order, mode="nearest")
    return out.astype(volume.dtype, copy=False) if order == 0 else out.astype(np.float32, copy=False)


def canonicalize(data: np.ndarray, affine: np.ndarray, *, slice_axis: int = 2,
                 spacing: Sequence[float] | None = None, mask: bool = False) -> tuple[np.ndarray, VolumeGeometry]:
    """Reorient a file's array (i, j, k) to the canonical layout of ``slice_axis`` and resample to ``spacing``."""
    if slice_axis not in LAYOUTS or isinstance(slice_axis, bool):
        raise ConfigError(f"slice_axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {slice_axis!r}")
    if data.ndim != 3:
        raise DataError(f"expected a 3D volume, got shape {data.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    out, can_affine, transform = reorient(data, affine, LAYOUTS[slice_axis])
    final_affine = can_affine
    if spacing is not None:
        out, final_affine = resample(out, can_affine, spacing, order=0 if mask else 1)
    geom = VolumeGeometry(final_affine, tuple(out.shape), "".join(LAYOUTS[slice_axis]), affine,
                          tuple(data.shape), axcodes(affine), transform, can_affine,
                          _canonical_shape(data.shape, transform))
    return out, geom


def _canonical_shape(shape: Sequence[int], transform: np.ndarray) -> tuple[int, int, int]:
    out = [0, 0, 0]
    for src_axis, (dst_axis, _) in enumerate(transform):
        out[int(dst_axis)] = int(shape[src_axis])
    return tuple(out)  # type: ignore[return-value]


def to_source(labels: np.ndarray, geometry: VolumeGeometry) -> np.ndarray:
    """A label volume on the returned grid brought back to the file's grid and axis order (nearest)."""
    from nibabel import orientations as ornt

    arr = np.asarray(labels)
    if tuple(arr.shape) != geometry.shape:
        raise DataError(f"label volume shape {arr.shape} differs from the volume's shape {geometry.shape}")
    if geometry.resampled:
        arr = resample_to(arr, geometry.affine, geometry.canonical_shape, geometry.canonical_affine, order=0)
    back = ornt.ornt_transform(ornt.axcodes2ornt(tuple(geometry.orientation)),
                               ornt.io_orientation(geometry.source_affine))
    return np.ascontiguousarray(ornt.apply_orientation(arr, back))


# --------------------------------------------------------------------------- readers
def volume_kind(path: str | Path) -> str:
    """'nifti', 'itk' (MHA/MHD/NRRD), 'dicom_series' (a folder), 'numpy' or 'unknown'."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom_series"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(ITK_EXTENSIONS):
        return "itk"
    if name.endswith((".npy", ".npz")):
        return "numpy"
    return "unknown"


def read_volume(path: str | Path, *, slice_axis: int = 2, spacing: Sequence[float] | None = None,
                mask: bool = False, channel: int | None = None, reader: str = "auto"
                ) -> tuple[np.ndarray, VolumeGeometry]:
    """Read a volume in the canonical layout of ``slice_axis`` (see the module text) with its geometry.

    Images come back float32 in native units (CT in Hounsfield units: NIfTI scl_slope/inter,
    DICOM RescaleSlope/Intercept are applied); masks (``mask=True``) int64 label maps.
    ``channel`` picks one channel of a 4D (multi-modal) NIfTI. ``reader``: ``auto`` or ``itk``
    (SimpleITK also for NIfTI and DICOM series folders).
    """
    from medprobe.data import readers

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    kind = volume_kind(p)
    if reader not in ("auto", "itk"):
        raise ConfigError(f"reader must be auto or itk, got {reader!r}")
    if reader == "itk" or kind == "itk":
        data, affine = read_itk_raw(p)
    elif kind == "nifti":
        data, affine = _nifti_raw(p, mask, channel)
    elif kind == "dicom_series":
        data, affine = readers.dicom_series_geometry(p)
    elif kind == "numpy":
        data = readers._read_numpy(p, keys=("mask", "label", "image") if mask else ("image",))
        affine = np.eye(4)
    else:
        raise DataError(f"{p}: not a volume file; supported: .nii, .nii.gz, {', '.join(ITK_EXTENSIONS)}, "
                        f".npy/.npz, or a folder of DICOM slices")
    if data.ndim != 3:
        raise DataError(f"{p}: volume has shape {data.shape}; expected a 3D volume")
    if mask:
        data = _as_labels(data, p)
    else:
        data = readers._as_float(np.asarray(data), p)
    try:
        return canonicalize(data, affine, slice_axis=slice_axis, spacing=spacing, mask=mask)
    except DataError as e:
        raise DataError(f"{p}: {e}") from None


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(data)
    if arr.dtype.kind == "b":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{path}: mask has non-integer values; expected an integer label map")
    elif arr.dtype.kind not in "iu":
        raise DataError(f"{path}: mask has dtype {arr.dtype}; expected an integer label map")
    return arr.astype(np.int64)


def _nifti_raw(path: Path, mask: bool, channel: int | None) -> tuple[np.ndarray, np.ndarray]:
    from medprobe.data.readers import nifti_array
    return nifti_array(path, scaled=not mask, channel=channel, hint="give channel= for a 4D multi-channel image")


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def itk_affine(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """Voxel (i=x, j=y, k=z) -> RAS+ affine of a SimpleITK image (ITK's world is LPS)."""
    n = len(spacing)
    d = np.asarray(direction, dtype=np.float64).reshape(n, n)
    lps = np.eye(4)
    lps[:n, :n] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:n, 3] = origin
    return LPS_TO_RAS @ lps


def read_itk_raw(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A volume through SimpleITK (MHA/MHD/NRRD, NIfTI, or a DICOM series folder): array (i, j, k) and affine."""
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ConfigError(f"{path}: reading MHA/MHD/NRRD needs SimpleITK; install medprobe[itk] "
                          f"(pip install SimpleITK)") from None
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader()
            ids = series.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise DataError(f"{path}: folder has no DICOM series SimpleITK can read")
            if len(ids) > 1:
                raise DataError(f"{path}: folder holds {len(ids)} DICOM series ({', '.join(ids[:3])}...); expected one")
            series.SetFileNames(series.GetGDCMSeriesFileNames(str(path), ids[0]))
            image = series.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: SimpleITK cannot read the file: {str(e).strip().splitlines()[-1]}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                        f"expected a scalar volume")
    if image.GetDimension() != 3:
        raise DataError(f"{path}: image has {image.GetDimension()} dimensions; expected a 3D volume")
    arr = sitk.GetArrayFromImage(image)  # (z, y, x)
    affine = itk_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return np.ascontiguousarray(np.transpose(arr, (2, 1, 0))), affine
