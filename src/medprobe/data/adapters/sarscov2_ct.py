"""SARS-CoV-2 CT scans (Soares et al., medRxiv 2020; hospitals in Sao Paulo, Brazil): CT slices
of COVID-19 and non-COVID patients, distributed as per-class folders of slice images.

Task: classification of the class folders: 2 folders -> binary (the folder whose name
starts with non/normal/healthy/negative is class 0), more -> multiclass (same rule,
then alphabetical); classes= sets the order explicitly (folder names).
Units: unit=slice (default): every slice is a 2D record; unit=volume: the slices of one
patient folder, in natural file-name order, are stacked into a (D, H, W) volume
(RGB slices with equal channels become grayscale; other RGB slices are averaged; all
slices of a volume must have one shape).
Modality: CT slices as PNG/JPEG images exported with a display window already
applied (8-bit). intensity=fixed (default) scales every slice by the fixed 8-bit
range 0-255, so a value means the same in every scan (the export's window);
intensity=percentile scales each slice by its own 0.5-99.5th percentiles. Hounsfield
windows do not apply: the files hold no Hounsfield units.
Official split: none.
Licence: CC BY-NC-SA 4.0 (as listed on the Kaggle page; verify there).
Obtain: kaggle.com/datasets/plameneduardo/sarscov2-ctscan-dataset (2,482 slices, flat
class folders) or the multiclass patient-folder release by the same authors
(kaggle.com/datasets/plameneduardo/a-covid-multiclass-dataset-of-ct-scans).

Layout (root = the folder holding the class folders; a single wrapping folder, e.g.
New_Data_CoV2/, is entered automatically):
  <class>/<patient folder>/<slice>.png   slices grouped by patient (the volume); the
                                         patient id is <class>/<patient folder>
  <class>/<slice>.png                    flat class folder: slices without patient
                                         grouping (the original 2,482-slice release)
Flat class folders carry no patient ids, so slices of one patient could be put in
both train and test: the adapter refuses them unless allow_flat=true, which makes
every slice its own patient (scores may then be optimistic). unit=volume needs
patient folders.
Records: key = the path relative to root. Metadata: none in the source (no sex/age).
Uncertain: the exact folder names differ between releases; any folder names work.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Problems, PublicDataset, assign_splits, details,
                                            finish, folder_root, natural_key, split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.readers import read_image
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "sarscov2_ct"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_NEGATIVE = re.compile(r"^(non|normal|healthy|negative|no[-_ ])", re.IGNORECASE)


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: natural_key(p.name))


def _subdirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def _slices_below(folder: Path) -> list[Path]:
    out = _images(folder)
    for d in _subdirs(folder):
        out += _slices_below(d)
    return out


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[-1] == 3:
        if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]):
            return image[..., 0]
        return image.mean(axis=-1)
    return image


class CTSliceVolumes(PublicDataset):
    """unit=volume: a record's image_path is a patient folder; its slices are stacked."""

    def __init__(self, *args: Any, slices: list[list[str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slices = slices

    def read_image(self, index: int) -> np.ndarray:
        image = self._read(index)
        if self.value_range == (0.0, 255.0) and image.size and (image.max() > 255 or image.min() < 0):
            raise DataError(f"{self.records[index].image_path}: values {image.min():g}..{image.max():g} outside the "
                            f"8-bit range 0-255 that intensity=fixed assumes; use intensity=percentile")
        return image

    def _read(self, index: int) -> np.ndarray:
        if self.ndim == 2:
            return super().read_image(index)
        files = self.slices[index]
        stack = []
        for f in files:
            image = _gray(read_image(f))
            if image.ndim != 2:
                raise DataError(f"{f}: slice has shape {image.shape}; expected a 2D image")
            if stack and image.shape != stack[0].shape:
                raise DataError(f"{f}: slice shape {image.shape} differs from {files[0]} {stack[0].shape}; the "
                                f"slices of a volume must have one size (use unit=slice)")
            stack.append(image)
        return np.stack(stack).astype(np.float32)


def _class_order(names: list[str], classes: list[str] | None, root: Path) -> list[str]:
    if classes is not None:
        unknown = sorted(set(classes) - set(names))
        absent = sorted(set(names) - set(classes))
        if unknown or absent:
            raise ConfigError(f"option classes must name the class folders of {root} exactly: "
                              f"{'unknown ' + str(unknown) if unknown else ''} "
                              f"{'missing ' + str(absent) if absent else ''}".strip())
        return classes
    return sorted(names, key=lambda n: (not _NEGATIVE.match(n), n.lower()))


@register_adapter(NAME, "SARS-CoV-2 CT: per-class folders of CT slices (2D slices or stacked patient volumes)",
                  details(__doc__, official=False))
def build_sarscov2_ct(root: Path | None, unit: str = "slice", classes: Any = None, allow_flat: bool = False,
                      split: str = "systematic", split_seed: int = 0,
                      split_fractions: Any = DEFAULT_FRACTIONS, intensity: str = "fixed") -> ImageDataset:
    """Build the SARS-CoV-2 CT set from the folder ``root`` holding its class folders."""
    folder = folder_root(NAME, root, "the folder holding the class folders (e.g. COVID/, non-COVID/)")
    unit = option("unit", unit, str, choices=("slice", "volume"))
    intensity = option("intensity", intensity, str, choices=("fixed", "percentile"))
    allow_flat = option("allow_flat", allow_flat, bool)
    wanted = option("classes", classes, list[str] | None)
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    base = folder
    dirs = _subdirs(base)
    if len(dirs) == 1 and not _images(base) and len(_subdirs(dirs[0])) >= 2:
        base = dirs[0]
        dirs = _subdirs(base)
    dirs = [d for d in dirs if _slices_below(d)]
    if len(dirs) < 2:
        raise DataError(f"{base}: found {len(dirs)} class folder(s) with images; expected at least 2 (e.g. COVID/ "
                        f"and non-COVID/), each holding patient folders of slices or slice images")
    order = _class_order([d.name for d in dirs], wanted, base)
    class_index = {n: i for i, n in enumerate(order)}
    drafts, where, slices = [], [], []
    flat_total = 0
    for d in sorted(dirs, key=lambda d: class_index[d.name]):
        label = class_index[d.name]
        flat = _images(d)
        if flat:
            flat_total += len(flat)
            if not allow_flat:
                raise DataError(f"{d}: {len(flat)} slice image(s) directly in the class folder, without patient "
                                f"sub-folders: their patients are unknown, so a patient-level split is impossible "
                                f"and slices of one patient could land in both train and test. Put each patient's "
                                f"slices in a sub-folder, or pass allow_flat=true to treat every image as its own "
                                f"patient (scores may be optimistic)")
            if unit == "volume":
                raise ConfigError(f"{d}: unit=volume needs patient sub-folders of slices; this class folder has "
                                  f"flat slice images (use unit=slice)")
            for f in flat:
                key = f.relative_to(base).as_posix()
                drafts.append(Record(key, "", key, label, {}, str(f)))
                where.append(str(f))
                slices.append([str(f)])
        for pdir in _subdirs(d):
            files = _slices_below(pdir)
            if not files:
                problems.add(f"{pdir}: patient folder without slice images ({', '.join(IMAGE_SUFFIXES)})")
                continue
            patient = pdir.relative_to(base).as_posix()
            if unit == "volume":
                drafts.append(Record(patient, "", patient, label, {"slices": len(files)}, str(pdir)))
                where.append(str(pdir))
                slices.append([str(f) for f in files])
            else:
                for f in files:
                    drafts.append(Record(f.relative_to(base).as_posix(), "", patient, label, {}, str(f)))
                    where.append(str(f))
                    slices.append([str(f)])
    problems.check()
    records = assign_splits(drafts, policy)
    spec = TaskSpec("binary" if len(order) == 2 else "multiclass", tuple(order))
    ds = CTSliceVolumes(NAME, folder, records, spec, where=where, policy=policy, ndim=3 if unit == "volume" else 2,
                        value_range=(0.0, 255.0) if intensity == "fixed" else None,
                        notes=[f"unit={unit}", f"classes={','.join(order)}", f"intensity={intensity}",
                               f"allow_flat({flat_total} flat slices, each its own patient)" if flat_total else ""],
                        slices=slices)
    return finish(ds, problems)
