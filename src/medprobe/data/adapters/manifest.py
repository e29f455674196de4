"""The ``manifest`` adapter: your own images (any readable format) listed in a CSV file."""
from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import choice_option, int_option, register_adapter, require_root
from medprobe.data.adapters._common import options_list
from medprobe.data.base import SPLITS, ImageDataset, Record, TaskSpec
from medprobe.data.readers import file_kind, nifti_affine, read_image, read_mask, read_nifti
from medprobe.errors import ConfigError, DataError

DETAILS = """\
Your own data listed in a CSV file (root = the CSV path), one row per image or
volume. Columns:
  image       required; path relative to the CSV file (or absolute): PNG, JPEG,
              TIFF, BMP, DICOM, NIfTI (.nii/.nii.gz), .npy/.npz
  split       required; train, val or test
  label       the class: integers 0..C-1 (0/1 = binary) or names (mapped to the
              sorted names, kept as class_names; two names = binary, the second
              one positive). Several 0/1 columns named with labels=[a, b, ...]
              make a multi-label task.
  mask        optional label map (PNG/TIFF/NIfTI/.npy, values 0..C-1); a mask
              column makes the task segmentation unless task=classification
  patient_id  optional; defaults to the image path. Keep each patient's images
              in one split.
  other       metadata (numbers parsed as numbers), e.g. sex, age, site, view
Options: labels (label column(s)); class_names (names in label order, or the
order in which to map string labels); task (auto | classification |
segmentation | none); ndim (2 | 3; default from the first image); num_classes
(segmentation classes including background; default: the largest mask value + 1,
found by reading every mask); slice_axis (NIfTI axis used as depth D, default 2).
NIfTI rows give volumes (D, H, W); dataset.affine(i) is the voxel-to-world affine
of row i in that axis order (for writing predictions as NIfTI). All listed files
must exist when the dataset is built; errors name the CSV row (header = row 1).
Licence and provenance: your own data."""


def _is_empty(value: str | None) -> bool:
    return value is None or value.strip() == ""


def _number(value: str) -> int | float | None:
    try:
        f = float(value)
    except ValueError:
        return None
    if not np.isfinite(f):
        return None
    return int(f) if f == int(f) and not any(c in value.lower() for c in ".e") else f


def _parse_metadata(values: list[str]) -> list[Any]:
    present = [v.strip() for v in values if not _is_empty(v)]
    nums = [_number(v) for v in present]
    if present and all(x is not None for x in nums):
        return [None if _is_empty(v) else _number(v.strip()) for v in values]
    return [None if _is_empty(v) else v.strip() for v in values]


class ManifestDataset(ImageDataset):
    """Images read on demand from the paths in a manifest CSV."""

    def __init__(self, csv_path: Path, records: Sequence[Record], task: TaskSpec, rows: Sequence[int], ndim: int,
                 slice_axis: int, num_classes: int | None) -> None:
        super().__init__(records, task, name=csv_path.stem, ndim=ndim, source=f"manifest:{csv_path.resolve()}")
        self.csv_path = csv_path
        self.rows = list(rows)
        self.slice_axis = slice_axis
        self.num_classes = num_classes
        self.value_range = None
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._affines: dict[int, np.ndarray] = {}

    def _where(self, index: int) -> str:
        return f"{self.csv_path} row {self.rows[index]}"

    def load_image(self, index: int) -> np.ndarray:
        path = self.records[index].image_path
        assert path is not None
        if file_kind(path) == "nifti":
            image, self._affines[index] = read_nifti(path, self.slice_axis)
        else:
            image = read_image(path)
        rgb = image.ndim == 3 and image.shape[-1] == 3
        if self.ndim == 3 and image.ndim != 3:
            raise DataError(f"{self._where(index)}: {path} is a 2D image {image.shape} but the dataset is 3D "
                            f"(ndim=3); list only volumes or build with ndim=2")
        if self.ndim == 2 and (image.ndim not in (2, 3) or (image.ndim == 3 and not rgb)):
            raise DataError(f"{self._where(index)}: {path} is a volume {image.shape} but the dataset is 2D; "
                            f"build with ndim=3")
        self._shapes[index] = image.shape
        return image

    def _image_shape(self, index: int) -> tuple[int, ...]:
        if index not in self._shapes:
            self.load_image(index)
        shape = self._shapes[index]
        return shape[:2] if self.ndim == 2 and len(shape) == 3 else shape

    def load_mask(self, index: int) -> np.ndarray:
        rec = self.records[index]
        if rec.mask_path is None:
            raise DataError(f"{self._where(index)}: no mask listed for {rec.image_path}")
        mask = read_mask(rec.mask_path, self.slice_axis)
        shape = self._image_shape(index)
        if len(shape) == 3 and mask.ndim == 2:
            raise DataError(f"{rec.mask_path}: 2D mask {mask.shape} for the 3D image {rec.image_path} {shape}; "
                            f"expected a mask volume of the same shape")
        if mask.shape != shape:
            raise DataError(f"{rec.mask_path}: mask shape {mask.shape} differs from the shape {shape} of its image "
                            f"{rec.image_path}")
        bad = mask < 0
        if self.num_classes is not None:
            bad |= mask >= self.num_classes
        if bad.any():
            vals = np.unique(mask[bad])
            shown = ", ".join(str(int(v)) for v in vals[:10]) + (", ..." if len(vals) > 10 else "")
            limit = f"0..{self.num_classes - 1} (num_classes={self.num_classes})" if self.num_classes else ">= 0"
            raise DataError(f"{rec.mask_path}: mask has values {shown} outside {limit}")
        return mask

    def affine(self, index: int) -> np.ndarray:
        """Voxel-to-world 4x4 affine of row ``index`` in (D, H, W) order; identity for non-NIfTI files."""
        if index not in self._affines:
            path = self.records[index].image_path
            self._affines[index] = nifti_affine(path, self.slice_axis) if path and file_kind(path) == "nifti" \
                else np.eye(4)
        return self._affines[index].copy()

    def _content_digest(self) -> str:
        h = hashlib.sha256()
        for r in self.records:
            for p in (r.image_path, r.mask_path):
                if p is not None:
                    try:
                        st = Path(p).stat()
                        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                    except OSError:
                        h.update(f"{p}|missing\n".encode())
        return h.hexdigest()


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text CSV file ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read CSV file: {e}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        all_rows = list(reader)
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV at row {reader.line_num}: {e}") from None
    if not all_rows or not any(c.strip() for c in all_rows[0]):
        raise DataError(f"{path}: empty CSV; expected a header row with at least the columns image and split")
    header = [c.strip() for c in all_rows[0]]
    dup = sorted({c for c in header if header.count(c) > 1 and c})
    if dup:
        raise DataError(f"{path}: duplicate column(s) {', '.join(dup)} in the header")
    rows = []
    for n, cells in enumerate(all_rows[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            raise DataError(f"{path}: row {n} has {len(cells)} fields but the header has {len(header)} columns")
        rows.append((n, cells + [""] * (len(header) - len(cells))))
    if not rows:
        raise DataError(f"{path}: the CSV has a header but no rows")
    return header, rows


def _class_labels(path: Path, column: str, cells: list[tuple[int, str]], class_names: list[str] | None
                  ) -> tuple[list[int], str, tuple[str, ...]]:
    """Parse one label column into (labels, kind, class names)."""
    for row, v in cells:
        if _is_empty(v):
            raise DataError(f"{path}: row {row}: empty value in label column {column!r}")
    values = [v.strip() for _, v in cells]
    nums = [_number(v) for v in values]
    if all(x is not None for x in nums):
        for (row, v), x in zip(cells, nums):
            if x != int(x):  # type: ignore[arg-type]
                raise DataError(f"{path}: row {row}: label {v.strip()!r} in column {column!r} is not an integer class "
                                f"(0..C-1) or a class name")
        ints = [int(x) for x in nums]  # type: ignore[arg-type]
        if class_names:
            names = tuple(class_names)
        elif set(ints) <= {0, 1}:
            names = ("0", "1")
        else:
            if min(ints) > 0:
                raise DataError(f"{path}: labels in column {column!r} are {min(ints)}..{max(ints)}; class labels must "
                                f"be 0..C-1 (renumber them, or pass class_names to declare all classes)")
            names = tuple(str(i) for i in range(max(ints) + 1))
        for (row, v), x in zip(cells, ints):
            if not 0 <= x < len(names):
                raise DataError(f"{path}: row {row}: label {x} in column {column!r} outside 0..{len(names) - 1}"
                                f"{' for class_names ' + str(list(names)) if class_names else ''}")
        labels = ints
    else:
        names = tuple(class_names) if class_names else tuple(sorted(set(values)))
        index = {n: i for i, n in enumerate(names)}
        for row, v in cells:
            if v.strip() not in index:
                raise DataError(f"{path}: row {row}: label {v.strip()!r} in column {column!r} is not one of the "
                                f"class_names {list(names)}")
        if len(names) < 2:
            raise DataError(f"{path}: column {column!r} has a single class {names[0]!r}; pass class_names to declare "
                            f"all classes")
        labels = [index[v] for v in values]
    if len(names) < 2:
        raise ConfigError(f"class_names must name at least 2 classes, got {list(names)}")
    return labels, ("binary" if len(names) == 2 else "multiclass"), names


def _multilabel(path: Path, columns: list[str], cols: dict[str, list[tuple[int, str]]]) -> list[tuple[int, ...]]:
    out: list[list[int]] = [[] for _ in cols[columns[0]]]
    for c in columns:
        for k, (row, v) in enumerate(cols[c]):
            if _is_empty(v):
                raise DataError(f"{path}: row {row}: empty value in label column {c!r}")
            x = _number(v.strip())
            if x not in (0, 1):
                raise DataError(f"{path}: row {row}: value {v.strip()!r} in label column {c!r}; multi-label columns "
                                f"must hold 0 or 1")
            out[k].append(int(x))  # type: ignore[arg-type]
    return [tuple(v) for v in out]


@register_adapter("manifest", "Your own images listed in a CSV (2D/3D; classification or segmentation)", DETAILS)
def build_manifest(root: Path | None, labels: list[str] | str | None = None, class_names: list[str] | None = None,
                   task: str = "auto", ndim: int | None = None, num_classes: int | None = None,
                   slice_axis: int = 2) -> ImageDataset:
    """Build a dataset from the manifest CSV ``root``."""
    path = require_root("manifest", root, "the path of a CSV file listing images (columns image, split, label, ...)")
    if not path.is_file():
        raise DataError(f"{path}: manifest CSV not found" if not path.exists() else
                        f"{path}: is a folder; expected the path of a manifest CSV file")
    label_cols = options_list(labels, "labels")
    names_opt = options_list(class_names, "class_names")
    task = choice_option("task", task, ("auto", "classification", "segmentation", "none"))
    slice_axis = int_option("slice_axis", slice_axis, choices=(0, 1, 2))
    if ndim is not None:
        ndim = int_option("ndim", ndim, choices=(2, 3))
    if num_classes is not None:
        num_classes = int_option("num_classes", num_classes, minimum=2)

    header, rows = _read_csv(path)
    present = ", ".join(header)
    for col in ("image", "split"):
        if col not in header:
            raise DataError(f"{path}: missing required column {col!r}; columns present: {present}")
    if task == "auto":
        task = "segmentation" if "mask" in header else "classification"
    if task == "segmentation" and "mask" not in header:
        raise DataError(f"{path}: task segmentation needs a 'mask' column; columns present: {present}")
    if label_cols is None:
        label_cols = ["label"] if "label" in header else []
    for c in label_cols:
        if c not in header:
            raise DataError(f"{path}: missing label column {c!r}; columns present: {present}")
    if task == "classification" and not label_cols:
        raise DataError(f"{path}: missing label column 'label'; columns present: {present}. Name the label "
                        f"column(s) with labels=[...], or use task=none for unlabelled images")
    col = {c: [(n, cells[i]) for n, cells in rows] for i, c in enumerate(header)}
    base = path.parent

    # paths, splits, duplicates, existence
    images, masks, splits, missing = [], [], [], []
    seen: dict[str, int] = {}
    for k, (n, _) in enumerate(rows):
        raw = col["image"][k][1].strip()
        if not raw:
            raise DataError(f"{path}: row {n}: empty 'image' value")
        if raw in seen:
            raise DataError(f"{path}: row {n}: image {raw!r} is already listed in row {seen[raw]}")
        seen[raw] = n
        split = col["split"][k][1].strip().lower()
        if split not in SPLITS:
            raise DataError(f"{path}: row {n}: unknown split {col['split'][k][1].strip()!r}; expected train, val or "
                            f"test")
        splits.append(split)
        img = Path(raw).expanduser()
        img = img if img.is_absolute() else base / img
        images.append(img)
        if not img.is_file():
            missing.append(f"row {n} image {raw}")
        mask = None
        if "mask" in header:
            mraw = col["mask"][k][1].strip()
            if mraw:
                mask = Path(mraw).expanduser()
                mask = mask if mask.is_absolute() else base / mask
                if not mask.is_file():
                    missing.append(f"row {n} mask {mraw}")
            elif task == "segmentation":
                raise DataError(f"{path}: row {n}: empty 'mask' value (segmentation needs a mask for every row)")
        masks.append(mask)
    if missing:
        more = f"; and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{path}: {len(missing)} listed file(s) not found (paths are relative to the CSV folder "
                        f"{base}): {'; '.join(missing[:10])}{more}")

    # labels and task
    label_values: list[Any]
    if task == "classification":
        if len(label_cols) == 1:
            label_values, kind, names = _class_labels(path, label_cols[0], col[label_cols[0]], names_opt)
        else:
            label_values = _multilabel(path, label_cols, col)
            kind, names = "multilabel", tuple(names_opt or label_cols)
            if len(names) != len(label_cols):
                raise ConfigError(f"class_names has {len(names)} names for {len(label_cols)} label columns")
        spec = TaskSpec(kind, names)  # type: ignore[arg-type]
    else:
        label_values = [None] * len(rows)
        spec = TaskSpec("none")
    meta_cols = [c for c in header if c not in {"image", "mask", "split", "patient_id"} and c
                 and not (task == "classification" and c in label_cols)]
    meta = {c: _parse_metadata([v for _, v in col[c]]) for c in meta_cols}
    records = []
    for k, (n, _) in enumerate(rows):
        raw = col["image"][k][1].strip()
        pid = col["patient_id"][k][1].strip() if "patient_id" in header else ""
        records.append(Record(raw, splits[k], pid or raw, label_values[k], {c: meta[c][k] for c in meta_cols},
                              str(images[k]), str(masks[k]) if masks[k] is not None else None))

    # dimensionality from the first image
    if ndim is None:
        first = images[0]
        if file_kind(first) == "nifti":
            ndim = 3
        else:
            arr = read_image(first)
            ndim = 3 if arr.ndim == 3 and arr.shape[-1] not in (3, 4) else 2
    if task == "segmentation":
        if num_classes is None and names_opt:
            num_classes = len(names_opt)
        if num_classes is None:  # read every mask once to find the largest label
            top = max(int(read_mask(m, slice_axis).max()) for m in masks if m is not None)
            num_classes = max(2, top + 1)
        if names_opt and len(names_opt) != num_classes:
            raise ConfigError(f"class_names has {len(names_opt)} names but num_classes is {num_classes}")
        spec = TaskSpec("segmentation", tuple(names_opt or ["background"] + [f"class_{i}"
                                                                         for i in range(1, num_classes)]))
    return ManifestDataset(path, records, spec, [n for n, _ in rows], ndim, slice_axis,
                           num_classes if task == "segmentation" else None)
