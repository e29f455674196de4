"""Read medical images from disk into float32 arrays in their native intensity units.

Formats: PNG/JPEG/TIFF/BMP (Pillow), DICOM (pydicom, also extension-less files), NIfTI
(nibabel), MHA/MHD/NRRD (SimpleITK, optional extra ``medprobe[itk]``) and NumPy ``.npy``/``.npz``.
Volumes with their geometry (canonical orientation, spacing) are read by
:func:`medprobe.data.volume.read_volume`; a DICOM series' geometry comes from
:func:`dicom_series_geometry`. 2D images come back as (H, W) or (H, W, 3);
volumes as (D, H, W) with D the slicing axis. Nothing is normalised: DICOM values are
passed through the modality LUT (rescale slope/intercept, e.g. to Hounsfield units) and
MONOCHROME1 images are inverted so that high values are bright, as in MONOCHROME2.

Every problem with a file raises :class:`~medprobe.errors.DataError` naming the file.
"""
from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medprobe.errors import ConfigError, DataError

PathLike = str | Path
Window = tuple[float, float] | Literal["auto"] | None

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
NUMPY_EXTENSIONS = (".npy", ".npz")
ITK_EXTENSIONS = (".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_EXTENSIONS = PIL_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS + ITK_EXTENSIONS + NUMPY_EXTENSIONS
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp") + NIFTI_EXTENSIONS + ITK_EXTENSIONS + NUMPY_EXTENSIONS

# Exceptions that mean "this file is broken", as raised by Pillow, pydicom, nibabel, numpy.
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError,
                                                 AttributeError, RuntimeError, NotImplementedError, SyntaxError,
                                                 zipfile.BadZipFile, zlib.error, struct.error, MemoryError)


def file_kind(path: PathLike) -> str:
    """'pil', 'dicom', 'nifti', 'itk', 'npy', 'npz' from the file name; 'unknown' otherwise.

    A file without extension is 'dicom' (DICOM files often have none).
    """
    name = Path(path).name.lower()
    if name.endswith(".nii.gz") or name.endswith(".nii"):
        return "nifti"
    suffix = Path(name).suffix
    if suffix in ITK_EXTENSIONS:
        return "itk"
    if suffix in PIL_EXTENSIONS:
        return "pil"
    if suffix in DICOM_EXTENSIONS or suffix == "":
        return "dicom"
    if suffix == ".npy":
        return "npy"
    if suffix == ".npz":
        return "npz"
    return "unknown"


def _unsupported(path: Path, supported: Sequence[str] = SUPPORTED_EXTENSIONS) -> DataError:
    return DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; supported: "
                     f"{', '.join(supported)} (files without an extension are read as DICOM)")


def _existing(path: PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a directory, expected an image file")
    return p


def _check_finite(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise DataError(f"{path}: contains {bad} NaN or infinite pixel value(s); expected finite intensities")
    return arr


def _as_float(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: pixel data has dtype {arr.dtype}; expected a numeric array")
    return _check_finite(np.asarray(arr, dtype=np.float32), path)


# --------------------------------------------------------------------------- public API
def read_image(path: PathLike) -> np.ndarray:
    """Read any supported image file as float32: (H, W), (H, W, 3) or a volume (D, H, W)."""
    p = _existing(path)
    kind = file_kind(p)
    if kind == "pil":
        return _read_pil(p, mask=False)
    if kind == "dicom":
        return read_dicom(p)
    if kind == "nifti":
        return read_nifti(p)[0]
    if kind == "itk":  # geometry-aware formats come back in the canonical axial layout
        from medprobe.data.volume import read_volume
        return read_volume(p)[0]
    if kind in ("npy", "npz"):
        arr = _read_numpy(p, keys=("image",))
        if arr.ndim not in (2, 3):
            raise DataError(f"{p}: array has shape {arr.shape}; expected (H, W), (H, W, 3) or (D, H, W)")
        return _as_float(arr, p)
    raise _unsupported(p)


def read_mask(path: PathLike, slice_axis: int = 2) -> np.ndarray:
    """Read a segmentation label map as int64 ((H, W), or (D, H, W) for NIfTI/3D arrays).

    Values must be integers (a float mask with fractional values is an error). Palette
    PNGs keep their palette indices as labels; a colour mask with equal channels is read
    as grayscale.
    """
    p = _existing(path)
    kind = file_kind(p)
    if kind == "pil" and p.suffix.lower() not in (".jpg", ".jpeg"):
        arr = _read_pil(p, mask=True)
    elif kind == "nifti":
        arr = _read_nifti_raw(p, slice_axis, scaled=False)[0]
    elif kind == "itk":
        from medprobe.data.volume import read_volume
        arr = read_volume(p, mask=True)[0]
    elif kind in ("npy", "npz"):
        arr = _read_numpy(p, keys=("mask", "label", "image"))
    else:
        raise DataError(f"{p}: unsupported mask file type; supported: {', '.join(MASK_EXTENSIONS)} "
                        f"(lossy JPEG and DICOM are not accepted for masks)")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        _check_finite(arr, p)
        if not np.array_equal(arr, np.round(arr)):
            bad = np.unique(arr[arr != np.round(arr)])[:5]
            raise DataError(f"{p}: mask has non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)}); "
                            f"expected an integer label map")
    elif arr.dtype.kind not in "iu":
        raise DataError(f"{p}: mask has dtype {arr.dtype}; expected an integer label map")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------- Pillow
def _read_pil(path: Path, mask: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            frames = []
            for i in range(getattr(img, "n_frames", 1)):
                img.seek(i)
                img.load()
                frames.append(_pil_mask_array(img, path) if mask else _pil_image_array(img))
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (Pillow cannot identify the format); "
                        f"the file may be corrupt or mislabelled") from None
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read image: {e}") from None
    if len(frames) == 1:
        arr = frames[0]
    else:
        if any(f.shape != frames[0].shape for f in frames) or frames[0].ndim != 2:
            raise DataError(f"{path}: multi-page file with {len(frames)} pages of different shapes or colour; "
                            f"expected a grayscale stack")
        arr = np.stack(frames)
    return arr if mask else _check_finite(arr, path)


def _pil_image_array(img: Any) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        img = img.convert("L")
    elif mode in ("LA", "La"):
        img = img.convert("L")
    elif mode == "P" or mode == "PA":
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.ascontiguousarray(rgb[..., 0])
        return rgb
    elif mode not in ("L", "F", "I", "RGB") and not mode.startswith("I;16"):
        img = img.convert("RGB")  # RGBA, RGBX, CMYK, YCbCr, LAB, HSV
    return np.asarray(img).astype(np.float32)


def _pil_mask_array(img: Any, path: Path) -> np.ndarray:
    if img.mode in ("LA", "La", "PA"):
        img = img.getchannel(0)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise DataError(f"{path}: mask is a colour ({img.mode}) image; expected a single-channel label map "
                            f"(grayscale or palette PNG with values 0..C-1)")
        arr = arr[..., 0]
    return np.array(arr)


# --------------------------------------------------------------------------- NumPy
def _read_numpy(path: Path, keys: Sequence[str]) -> np.ndarray:
    try:
        if file_kind(path) == "npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            for k in keys:
                if k in names:
                    return z[k]
            if len(names) == 1:
                return z[names[0]]
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read NumPy file: {e}") from None
    raise DataError(f"{path}: .npz holds arrays {names}; expected a single array or one named "
                    f"{' or '.join(repr(k) for k in keys)}")


# --------------------------------------------------------------------------- NIfTI
def read_nifti(path: PathLike, slice_axis: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume as float32 (D, H, W), D being ``slice_axis`` of the file.

    Returns ``(volume, affine)``. The affine is re-ordered to the returned axis order, so
    ``affine @ [d, h, w, 1]`` is the world (scanner) position of voxel ``volume[d, h, w]``
    and ``nibabel.Nifti1Image(prediction, affine)`` writes a prediction aligned with the
    source. Scaling (scl_slope/scl_inter) is applied.
    """
    p = _existing(path)
    vol, affine = _read_nifti_raw(p, slice_axis, scaled=True)
    return _as_float(vol, p), affine


def _permutation(slice_axis: int) -> list[int]:
    if slice_axis not in (0, 1, 2, -1, -2, -3) or isinstance(slice_axis, bool):
        raise ConfigError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
    axis = int(slice_axis) % 3
    return [axis] + [a for a in range(3) if a != axis]


def nifti_affine(path: PathLike, slice_axis: int = 2) -> np.ndarray:
    """The affine :func:`read_nifti` returns, read from the header only (no pixel data)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    p = _existing(path)
    perm = _permutation(slice_axis)
    try:
        affine = np.asarray(nib.load(str(p)).affine, dtype=np.float64)
    except _READ_ERRORS + (ImageFileError,) as e:
        raise DataError(f"{p}: cannot read NIfTI header: {e}") from None
    out = affine.copy()
    out[:, :3] = affine[:, perm]
    return out


def nifti_array(path: Path, *, scaled: bool, channel: int | None = None,
                hint: str = "4D time series and multi-channel images are not supported") -> tuple[np.ndarray, np.ndarray]:
    """``(voxels (X, Y, Z), affine)`` of a NIfTI file in its stored axis order: float32 with the header's
    scaling (``scaled``) or the stored values (masks); ``channel`` picks one volume of a 4D file.
    Trailing singleton axes are dropped and a 2D image becomes one slice; anything else is a DataError
    (``hint`` says what to do with a 4D file)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(str(path))
        affine = np.asarray(img.affine, dtype=np.float64)
        if channel is not None:
            if len(img.shape) != 4:
                raise DataError(f"{path}: image has shape {img.shape}; expected a 4D multi-channel volume")
            if channel >= img.shape[3]:
                raise DataError(f"{path}: channel {channel} requested but the image has {img.shape[3]}")
            data = np.asarray(img.dataobj[..., channel], dtype=np.float32)
        else:
            data = img.get_fdata(dtype=np.float32) if scaled else np.asanyarray(img.dataobj)
            data = np.array(data)  # detach from the memory map
    except ImageFileError as e:
        raise DataError(f"{path}: cannot read: not a NIfTI file nibabel can read ({e})") from None
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read NIfTI file (corrupt or truncated?): {e}") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise DataError(f"{path}: NIfTI image has shape {data.shape}; expected a 3D volume ({hint})")
    return data, affine


def _read_nifti_raw(path: Path, slice_axis: int, scaled: bool) -> tuple[np.ndarray, np.ndarray]:
    perm = _permutation(slice_axis)
    data, affine = nifti_array(path, scaled=scaled)
    out = np.ascontiguousarray(np.transpose(data, perm))
    new_affine = affine.copy()
    new_affine[:, :3] = affine[:, perm]
    return out, new_affine


# --------------------------------------------------------------------------- DICOM
def _dcmread(path: Path, force: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), force=force)
    except InvalidDicomError:
        if not force and Path(path).suffix == "":
            return _dcmread(path, force=True)
        hint = "" if Path(path).suffix else f" (files without an extension are read as DICOM; other supported " \
            f"types: {', '.join(SUPPORTED_EXTENSIONS)})"
        raise DataError(f"{path}: not a valid DICOM file (no DICOM header; corrupt or not DICOM){hint}") from None
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read DICOM file (corrupt or truncated?): {e}") from None


def _dicom_pixels(ds: Any, path: Path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (not an image: e.g. a report or a DICOMDIR)")
    try:
        return np.asarray(ds.pixel_array)
    except _READ_ERRORS as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = ""
        if ts is not None and getattr(ts, "is_compressed", False):
            hint = (f" (compressed transfer syntax {ts.name}; install a decoder such as "
                    f"pylibjpeg[all] or python-gdcm)")
        raise DataError(f"{path}: cannot decode DICOM pixel data{hint}: {e}") from None


def _rescale_params(ds: Any, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (slope, intercept), from the top level or the enhanced functional groups."""
    def _from(item: Any) -> tuple[float, float] | None:
        seq = item.get("PixelValueTransformationSequence") if item is not None else None
        if seq:
            t = seq[0]
            return float(t.get("RescaleSlope", 1) or 1), float(t.get("RescaleIntercept", 0) or 0)
        return None

    slope = np.ones(n_frames)
    icpt = np.zeros(n_frames)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope[:] = float(ds.get("RescaleSlope", 1) or 1)
        icpt[:] = float(ds.get("RescaleIntercept", 0) or 0)
    shared = ds.get("SharedFunctionalGroupsSequence")
    found = _from(shared[0]) if shared else None
    if found:
        slope[:], icpt[:] = found
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) == n_frames:
        for i, item in enumerate(per_frame):
            found = _from(item)
            if found:
                slope[i], icpt[i] = found
    return slope, icpt


def _modality_lut(arr: np.ndarray, ds: Any, frames: bool) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply the modality LUT; also return the output range of the stored-value range."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    smin, smax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if "ModalityLUTSequence" in ds:
        try:
            from pydicom.pixels import apply_modality_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_modality_lut
        out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        return out, (float(out.min()), float(out.max()))
    n = arr.shape[0] if frames else 1
    slope, icpt = _rescale_params(ds, n)
    out = arr.astype(np.float32)  # float32 throughout: no float64 copy of a full-size image
    if frames:
        out *= slope.reshape((n,) + (1,) * (arr.ndim - 1)).astype(np.float32)
        out += icpt.reshape((n,) + (1,) * (arr.ndim - 1)).astype(np.float32)
    elif slope[0] != 1 or icpt[0] != 0:
        out *= np.float32(slope[0])
        out += np.float32(icpt[0])
    ends = sorted((smin * slope[0] + icpt[0], smax * slope[0] + icpt[0]))
    return out, (float(ends[0]), float(ends[1]))


def _first(value: Any) -> float:
    try:
        return float(value[0]) if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") else float(value)
    except (TypeError, ValueError, IndexError):
        return float("nan")


def _apply_window(arr: np.ndarray, window: Window, ds: Any, path: Path) -> np.ndarray:
    if isinstance(window, str):
        if window != "auto":
            raise ConfigError(f"window must be (center, width), 'auto' or None, got {window!r}")
        center = _first(ds.get("WindowCenter")) if "WindowCenter" in ds else float("nan")
        width = _first(ds.get("WindowWidth")) if "WindowWidth" in ds else float("nan")
        if not (np.isfinite(center) and np.isfinite(width) and width > 0):
            lo, hi = float(arr.min()), float(arr.max())  # no usable VOI tags: full range
            center, width = (lo + hi) / 2, max(hi - lo, 1e-6)
    else:
        try:
            center, width = (float(v) for v in window)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ConfigError(f"window must be (center, width), 'auto' or None, got {window!r}") from None
        if width <= 0:
            raise ConfigError(f"window width must be positive, got {width}")
    lo = center - width / 2
    return np.clip((arr - lo) / width, 0.0, 1.0).astype(np.float32)


def read_dicom(path: PathLike, window: Window = None) -> np.ndarray:
    """Read a DICOM image: (H, W), (H, W, 3) for colour, (D, H, W) for multi-frame.

    The modality LUT (RescaleSlope/RescaleIntercept, or a Modality LUT Sequence) is applied,
    so CT comes back in Hounsfield units. MONOCHROME1 images are inverted within the
    stored-value range so that high values are bright. ``window``: None keeps native units;
    ``(center, width)`` or ``"auto"`` (the file's WindowCenter/WindowWidth, else its full
    range) maps the window linearly to [0, 1], clipping outside it.
    """
    p = _existing(path)
    ds = _dcmread(p)
    raw = _dicom_pixels(ds, p)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    if colour:
        return _as_float(raw, p)
    arr, (lo, hi) = _modality_lut(raw, ds, frames=n_frames > 1)
    if window is not None:
        arr = _apply_window(arr, window, ds, p)
        lo, hi = 0.0, 1.0
    if photometric == "MONOCHROME1":
        arr = (lo + hi) - arr
    return _as_float(arr, p)


def _series_files(paths: Sequence[PathLike] | PathLike) -> list[Path]:
    if isinstance(paths, (str, Path)):
        folder = Path(paths)
        if not folder.is_dir():
            paths = [folder]
        else:
            paths = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
            if not paths:
                raise DataError(f"{folder}: folder has no DICOM files")
    files = [_existing(x) for x in paths]  # type: ignore[union-attr]
    if not files:
        raise DataError("read_dicom_series: no files given")
    return files


def _read_series(files: list[Path]) -> tuple[np.ndarray, list[Any], np.ndarray]:
    """Slices stacked in order along the slice normal, their datasets (same order), and the order used."""
    slices, headers, positions, numbers = [], [], [], []
    for f in files:
        ds = _dcmread(f)
        raw = _dicom_pixels(ds, f)
        if raw.ndim != 2:
            raise DataError(f"{f}: expected a single-frame grayscale slice in a series, got pixel shape {raw.shape}")
        arr, (lo, hi) = _modality_lut(raw, ds, frames=False)  # rescale slope/intercept: always applied
        if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            arr = (lo + hi) - arr
        if slices and arr.shape != slices[0].shape:
            raise DataError(f"{f}: slice shape {arr.shape} differs from {files[0]} with shape {slices[0].shape}")
        slices.append(_as_float(arr, f))
        headers.append(ds)
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is not None and len(ipp) == 3:
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float)) if iop is not None and \
                len(iop) == 6 else np.array([0.0, 0.0, 1.0])
            positions.append(float(np.dot(normal, np.asarray(ipp, float))))
        else:
            positions.append(None)
        numbers.append(ds.get("InstanceNumber"))
    if all(v is not None for v in positions):
        order = np.argsort(np.asarray(positions, float), kind="stable")
    elif all(v is not None and str(v).strip() != "" for v in numbers):
        order = np.argsort(np.asarray([float(v) for v in numbers]), kind="stable")
    else:
        order = np.arange(len(files))
    return np.stack([slices[i] for i in order]).astype(np.float32), [headers[i] for i in order], order


def read_dicom_series(paths: Sequence[PathLike] | PathLike) -> np.ndarray:
    """Stack single-frame DICOM slices into a (D, H, W) float32 volume.

    ``paths`` is a list of files or a folder (all its files). Slices are ordered by their
    position along the slice normal (ImagePositionPatient/ImageOrientationPatient), else by
    InstanceNumber, else as given. For the voxel geometry use :func:`dicom_series_geometry`.
    """
    return _read_series(_series_files(paths))[0]


def dicom_series_geometry(paths: Sequence[PathLike] | PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM series as ``(volume (slice, row, column), voxel -> RAS+ affine)``.

    The affine comes from ImageOrientationPatient (row and column direction cosines),
    PixelSpacing (row spacing, column spacing), the ImagePositionPatient of the first and last
    slice (slice step; SpacingBetweenSlices / SliceThickness along the normal for a single
    slice) and is converted from DICOM's LPS to RAS. Missing geometry tags are an error naming
    the file.
    """
    files = _series_files(paths)
    volume, headers, _ = _read_series(files)
    first = headers[0]
    where = getattr(first, "filename", None) or files[0]
    try:
        iop = np.asarray([float(v) for v in first.ImageOrientationPatient], float)
        ipp0 = np.asarray([float(v) for v in first.ImagePositionPatient], float)
        row_sp, col_sp = (float(v) for v in first.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        raise DataError(f"{where}: DICOM slice lacks ImageOrientationPatient, ImagePositionPatient or "
                        f"PixelSpacing; the series has no usable geometry") from None
    if len(iop) != 6 or len(ipp0) != 3:
        raise DataError(f"{where}: malformed ImageOrientationPatient {iop.tolist()} or ImagePositionPatient "
                        f"{ipp0.tolist()}")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if len(headers) > 1:
        ipp_last = np.asarray([float(v) for v in headers[-1].ImagePositionPatient], float)
        step = (ipp_last - ipp0) / (len(headers) - 1)
    else:
        thick = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        step = normal * float(thick)
    lps = np.eye(4)
    lps[:3, 0] = step               # slice index
    lps[:3, 1] = col_dir * row_sp   # row index moves along the column direction
    lps[:3, 2] = row_dir * col_sp   # column index moves along the row direction
    lps[:3, 3] = ipp0
    return volume, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
