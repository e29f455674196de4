"""Figshare brain tumor dataset (Cheng et al., PLoS ONE 2015): 3,064 contrast-enhanced
T1-weighted MRI slices of 233 patients with meningioma (708), glioma (1,426) or
pituitary tumour (930), each with a tumour mask.

Task: task=classification (default): multiclass meningioma / glioma / pituitary
tumor (file label 1 / 2 / 3 -> class 0 / 1 / 2); task=segmentation: background, tumor
(from tumorMask).
Modality: MRI (T1-weighted, contrast-enhanced), 512 x 512 int16 slices (value_range
None: scaled by percentiles).
Official split: none (the release's cvind.mat holds 5-fold cross-validation indices;
it is not read here).
Licence: CC BY 4.0 (figshare).
Obtain: https://doi.org/10.6084/m9.figshare.1512427 (four zip files
brainTumorDataPublic_1-766.zip, ... plus cvind.mat and README.txt).

Layout (root = the folder where the zips were extracted; sub-folders are searched):
  1.mat, 2.mat, ..., 3064.mat   MATLAB v7.3 files (HDF5 with a 512-byte MATLAB header),
                                each holding a struct cjdata with the fields
                                  image        the slice (stored transposed, MATLAB
                                               column-major; read back as rows x cols)
                                  label        1 meningioma, 2 glioma, 3 pituitary tumor
                                  PID          patient id (a MATLAB char array)
                                  tumorBorder  border coordinates (not used)
                                  tumorMask    binary tumour mask (same shape as image)
Files whose name is not a number (cvind.mat) are ignored. Older MATLAB formats
(v5/v7 .mat) are not read: such a file is reported as not being MATLAB v7.3.
Records: one per file; key = the file number; patient = PID.
Metadata: none in the source besides the label (no sex/age).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Problems, PublicDataset, assign_splits, details,
                                            finish, folder_root, natural_key, split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "figshare_brain_tumor"
CLASSES = ("meningioma", "glioma", "pituitary tumor")
FIELDS = ("image", "label", "PID", "tumorBorder", "tumorMask")


def read_cjdata(path: Path, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The requested fields of the ``cjdata`` struct of a MATLAB v7.3 file, as stored (no transpose)."""
    try:
        import h5py  # an optional dependency: the extra medprobe[h5]
    except ImportError:
        raise ConfigError(f"dataset adapter {NAME!r} reads MATLAB v7.3 (HDF5) .mat files with h5py, which is not "
                          f'installed; install it with: pip install "medprobe[h5]"') from None

    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable MATLAB v7.3 (HDF5) .mat file ({e}); expected the cjdata struct "
                        f"with fields {', '.join(FIELDS)} (corrupt, truncated, or saved in an older MATLAB "
                        f"format?)") from None
    try:
        with f:
            group = f.get("cjdata")
            if not isinstance(group, h5py.Group):
                raise DataError(f"{path}: no struct 'cjdata' (top-level entries: {', '.join(f.keys()) or 'none'}); "
                                f"expected cjdata with fields {', '.join(FIELDS)}")
            out = {}
            for name in fields:
                item = group.get(name)
                if not isinstance(item, h5py.Dataset):
                    raise DataError(f"{path}: cjdata has no field {name!r} (fields present: "
                                    f"{', '.join(group.keys())}); expected {', '.join(FIELDS)}")
                out[name] = np.asarray(item[()])
            return out
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"{path}: cannot read the cjdata struct (corrupt or truncated file?): {e}") from None


def _pid(path: Path, raw: np.ndarray) -> str:
    arr = np.asarray(raw).ravel()
    if arr.dtype.kind in "ui" and arr.size:  # MATLAB char array: UTF-16 code units
        text = "".join(chr(int(c)) for c in arr if int(c) != 0)
    elif arr.dtype.kind == "f" and arr.size == 1 and float(arr[0]).is_integer():
        text = str(int(arr[0]))
    elif arr.dtype.kind in "SU" and arr.size:
        text = "".join(x.decode() if isinstance(x, bytes) else str(x) for x in arr)
    else:
        raise DataError(f"{path}: cjdata.PID has dtype {arr.dtype} and shape {raw.shape}; expected a MATLAB char "
                        f"array (patient id)")
    text = text.strip()
    if not text:
        raise DataError(f"{path}: cjdata.PID is empty; expected the patient id")
    return text


class BrainTumorDataset(PublicDataset):
    """Pixels and masks come from the .mat files (transposed back from MATLAB's column-major order)."""

    def _field(self, index: int, name: str) -> np.ndarray:
        path = Path(self.records[index].image_path or "")
        arr = read_cjdata(path, (name,))[name]
        if arr.ndim != 2 or arr.dtype.kind not in "biuf":
            raise DataError(f"{path}: cjdata.{name} has dtype {arr.dtype} and shape {arr.shape}; expected a 2D "
                            f"numeric array")
        return np.ascontiguousarray(arr.T)

    def read_image(self, index: int) -> np.ndarray:
        image = self._field(index, "image").astype(np.float32)
        if not np.isfinite(image).all():
            raise DataError(f"{self.records[index].image_path}: cjdata.image contains NaN or infinite values")
        return image

    def read_mask(self, index: int) -> np.ndarray:
        return (self._field(index, "tumorMask") > 0).astype(np.int64)


@register_adapter(NAME, "Figshare brain tumor MRI (.mat v7.3): meningioma/glioma/pituitary, tumour masks",
                  details(__doc__, official=False))
def build_figshare_brain_tumor(root: Path | None, task: str = "classification", split: str = "systematic",
                               split_seed: int = 0, split_fractions: Any = DEFAULT_FRACTIONS) -> ImageDataset:
    """Build the Figshare brain tumor set from the folder ``root`` holding 1.mat ... 3064.mat."""
    folder = folder_root(NAME, root, "the folder holding the extracted 1.mat ... 3064.mat files")
    task = option("task", task, str, choices=("classification", "segmentation"))
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    files = sorted((p for p in folder.rglob("*.mat") if p.stem.isdigit() and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.as_posix()))
    if not files:
        raise DataError(f"{folder}: no numbered .mat files (1.mat, 2.mat, ...) found; expected the extracted "
                        f"brainTumorDataPublic_*.zip files")
    drafts, where = [], []
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            problems.add(f"{path}: duplicate file number; {seen[path.stem]} has the same name")
            continue
        seen[path.stem] = path
        try:
            fields = read_cjdata(path, ("label", "PID"))
            label = np.asarray(fields["label"]).ravel()
            if label.size != 1 or not float(label[0]).is_integer() or int(label[0]) not in (1, 2, 3):
                raise DataError(f"{path}: cjdata.label is {label.tolist()}; expected one of 1 (meningioma), "
                                f"2 (glioma), 3 (pituitary tumor)")
            pid = _pid(path, fields["PID"])
        except DataError as e:
            problems.add(str(e))
            continue
        cls = int(label[0]) - 1
        drafts.append(Record(path.stem, "", pid, cls if task == "classification" else None,
                             {"tumor_type": CLASSES[cls]}, str(path), str(path) if task == "segmentation" else None))
        where.append(str(path))
    problems.check()
    records = assign_splits(drafts, policy)
    spec = TaskSpec("multiclass", CLASSES) if task == "classification" else TaskSpec("segmentation",
                                                                                   ("background", "tumor"))
    ds = BrainTumorDataset(NAME, folder, records, spec, where=where, policy=policy, notes=[f"task={task}"])
    return finish(ds, problems)
