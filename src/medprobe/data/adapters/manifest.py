"""The ``manifest`` adapter: your own images (any readable format) listed in a CSV file."""
from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter, require_root
from medprobe.data.adapters._common import Problems, collecting
from medprobe.data.base import SPLITS, ImageDataset, Record, TaskSpec
from medprobe.data.readers import file_kind, nifti_affine, read_image, read_mask, read_nifti
from medprobe.data.volume import (PLANES, VolumeGeometry, describe_intensity, read_volume, spacing_option,
                                  volume_kind, window_range)
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

DETAILS = """\
Your own data listed in a CSV file (root = the CSV path), one row per image or
volume. Columns:
  image       required; path relative to the CSV file (or absolute): PNG, JPEG,
              TIFF, BMP, DICOM, NIfTI (.nii/.nii.gz), .npy/.npz
  split       required; train, val or test
  label       the class: integers 0..C-1 (0/1 = binary) or names (mapped to the
              sorted names, kept as class_names; two names = binary, the second
              one positive). Several 0/1 columns named with labels=[a, b, ...]
              make a multi-label task; -1 there marks a missing target (the
              finding is not labelled for that image: masked out of losses and
              metrics, never a negative).
  mask        optional label map (PNG/TIFF/NIfTI/.npy, values 0..C-1); a mask
              column makes the task segmentation unless task=classification
  patient_id  optional; defaults to the image path. Keep each patient's images
              in one split.
  report      optional free text (e.g. the findings section) for report
              generation; an empty cell = no report
  other       metadata (numbers parsed as numbers), e.g. sex, age, site, view
Options: labels (label column(s)); class_names (names in label order, or the
order in which to map string labels); task (auto | classification |
segmentation | none); ndim (2 | 3; default from the first image); num_classes
(segmentation classes including background; default: the largest mask value + 1,
found by reading every mask); slice_axis (the slicing plane of volumes: 2 axial,
default; 1 coronal; 0 sagittal).
Volumes (NIfTI, MHA/MHD/NRRD with SimpleITK, a folder of DICOM slices, .npy) are
brought to one canonical orientation (orientation=canonical, default): reoriented
from their affine to RAS and laid out as (D, H, W) slices in the radiological
display convention (axial: D inferior->superior, anterior at the top, the
patient's right on the viewer's left), so the same scan stored with other axes
gives the same slices; orientation=file keeps the file's axis order (slice_axis =
the file axis used as depth). spacing=[d, h, w] (mm) resamples every volume
(images linear, masks nearest). window=[center, width] (Hounsfield units) or a
preset (lung, mediastinum, abdomen, bone, brain) scales CT by that window instead
of per-image percentiles (leave it out for MR). dataset.affine(i) and
dataset.geometry(i) give row i's voxel-to-world affine in the returned axis order
(predictions are written back on the file's own grid); masks must share their
image's grid. All listed files
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
        #: where each record is listed (``<csv> row N``); read errors and ``data check`` name it
        self.where = [f"{csv_path} row {n}" for n in self.rows]
        self.slice_axis = slice_axis
        self.num_classes = num_classes
        self.value_range = None
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._affines: dict[int, np.ndarray] = {}

    def _where(self, index: int) -> str:
        return self.where[index]

    def load_image(self, index: int) -> np.ndarray:
        path = self.records[index].image_path
        assert path is not None
        try:
            if file_kind(path) == "nifti":
                image, self._affines[index] = read_nifti(path, self.slice_axis)
            else:
                image = read_image(path)
        except DataError as e:
            raise DataError(f"{e} [listed in {self._where(index)}]") from None
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
        try:
            mask = read_mask(rec.mask_path, self.slice_axis)
        except DataError as e:
            raise DataError(f"{e} [listed in {self._where(index)}]") from None
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


class CanonicalVolumes(ManifestDataset):
    """A 3D manifest whose volumes are read in the canonical layout, with their geometry (orientation=canonical).

    Images and masks go through :func:`~medprobe.data.volume.read_volume` (canonical orientation,
    optional ``spacing`` resampling); a mask must lie on its image's grid. The orientation,
    spacing and intensity policy (``window``) are part of ``source`` and so of the fingerprint.
    """

    orientation = "canonical"

    def __init__(self, *args: Any, spacing: tuple[float, float, float] | None = None, window: Any = None) -> None:
        super().__init__(*args)
        self.spacing = spacing
        self.window = window
        self.value_range = window_range(window, "option window")
        self.source += (f"|orientation=canonical({PLANES[self.slice_axis]})"
                        f"|spacing={list(spacing) if spacing else 'native'}|intensity={describe_intensity(window)}")
        self._geometry: dict[int, VolumeGeometry] = {}

    def _volume(self, index: int, path: str, mask: bool) -> tuple[np.ndarray, VolumeGeometry]:
        try:
            return read_volume(path, slice_axis=self.slice_axis, spacing=self.spacing, mask=mask)
        except DataError as e:
            raise DataError(f"{e} [listed in {self._where(index)}]") from None

    def load_image(self, index: int) -> np.ndarray:
        path = self.records[index].image_path
        assert path is not None
        if volume_kind(path) == "unknown" or file_kind(path) == "pil":
            return super().load_image(index)  # a 2D file: the base class says what is wrong
        image, self._geometry[index] = self._volume(index, path, mask=False)
        self._affines[index] = self._geometry[index].affine
        self._shapes[index] = image.shape
        return image

    def geometry(self, index: int) -> VolumeGeometry:
        """Affine, spacing and orientation of row ``index``, and the way back to its file's grid."""
        if index not in self._geometry:
            self.load_image(index)
        return self._geometry[index]

    def affine(self, index: int) -> np.ndarray:
        return self.geometry(index).affine.copy()

    def load_mask(self, index: int) -> np.ndarray:
        rec = self.records[index]
        if rec.mask_path is None or volume_kind(rec.mask_path) == "unknown" or file_kind(rec.mask_path) == "pil":
            return super().load_mask(index)
        mask, geom = self._volume(index, rec.mask_path, mask=True)
        image = self.geometry(index)
        if not geom.agrees(image):
            raise DataError(f"{rec.mask_path}: mask grid {geom.shape} (affine {np.round(geom.affine, 3).tolist()}) "
                            f"differs from its image {rec.image_path} {image.shape} (affine "
                            f"{np.round(image.affine, 3).tolist()}) [listed in {self._where(index)}]")
        if self.num_classes is not None and mask.size and (mask.min() < 0 or mask.max() >= self.num_classes):
            vals = np.unique(mask[(mask < 0) | (mask >= self.num_classes)])[:10]
            raise DataError(f"{rec.mask_path}: mask has values {', '.join(str(int(v)) for v in vals)} outside "
                            f"0..{self.num_classes - 1} (num_classes={self.num_classes})")
        return mask


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


#: cell values that mean "no value" in CSV exports (pandas' default NA strings): never a class by accident
MISSING_TOKENS = frozenset({"nan", "-nan", "na", "n/a", "#n/a", "<na>", "null", "none"})


class _RowProblems:
    """Problems of single manifest rows. Building normally, the first one is raised at once;
    under ``medprobe data check`` (:func:`collect_problems`) every one is recorded and its row
    left out, so the check lists them all."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bad: set[int] = set()
        self._problems = Problems("manifest")

    def add(self, row: int, message: str) -> None:
        text = f"{self.path}: row {row}: {message}"
        if not collecting():
            raise DataError(text)
        self.bad.add(row)
        self._problems.add(text)


def _class_labels(path: Path, column: str, cells: list[tuple[int, str]], class_names: list[str] | None,
                  problems: _RowProblems) -> tuple[dict[int, int], str, tuple[str, ...]]:
    """Parse one label column into ({row: label}, kind, class names); bad rows go to ``problems``."""
    good: list[tuple[int, str]] = []
    for row, v in cells:
        if _is_empty(v):
            problems.add(row, f"empty value in label column {column!r}")
        elif v.strip().lower() in MISSING_TOKENS and v.strip() not in (class_names or ()):
            problems.add(row, f"label {v.strip()!r} in column {column!r} is a missing value, not a class; every "
                              f"row needs a label (remove the row, or use task=none for unlabelled images)")
        else:
            good.append((row, v.strip()))
    if not good:
        raise DataError(f"{path}: no row has a usable label in column {column!r}")
    nums = [_number(v) for _, v in good]
    labels: dict[int, int] = {}
    if all(x is not None for x in nums):
        ints: dict[int, int] = {}
        for (row, v), x in zip(good, nums):
            if x != int(x):  # type: ignore[arg-type]
                problems.add(row, f"label {v!r} in column {column!r} is not an integer class (0..C-1) or a class "
                                  f"name")
            else:
                ints[row] = int(x)  # type: ignore[arg-type]
        values = set(ints.values())
        if class_names:
            names = tuple(class_names)
        elif values <= {0, 1}:
            names = ("0", "1")
        else:
            if min(values) > 0:
                raise DataError(f"{path}: labels in column {column!r} are {min(values)}..{max(values)}; class labels "
                                f"must be 0..C-1 (renumber them, or pass class_names to declare all classes)")
            names = tuple(str(i) for i in range(max(values) + 1))
        for row, x in ints.items():
            if not 0 <= x < len(names):
                problems.add(row, f"label {x} in column {column!r} outside 0..{len(names) - 1}"
                                  f"{' for class_names ' + str(list(names)) if class_names else ''}")
            else:
                labels[row] = x
    else:
        names = tuple(class_names) if class_names else tuple(sorted({v for _, v in good}))
        index = {n: i for i, n in enumerate(names)}
        for row, v in good:
            if v not in index:
                problems.add(row, f"label {v!r} in column {column!r} is not one of the class_names {list(names)}")
            else:
                labels[row] = index[v]
        if len(names) < 2:
            raise DataError(f"{path}: column {column!r} has a single class {names[0]!r}; pass class_names to declare "
                            f"all classes")
    if len(names) < 2:
        raise ConfigError(f"class_names must name at least 2 classes, got {list(names)}")
    return labels, ("binary" if len(names) == 2 else "multiclass"), names


def _multilabel(columns: list[str], cols: dict[str, list[tuple[int, str]]], problems: _RowProblems
                ) -> dict[int, tuple[int, ...]]:
    """{row: multi-hot tuple} from several 0/1 columns (-1 = missing); bad rows go to ``problems``."""
    out: dict[int, list[int]] = {row: [] for row, _ in cols[columns[0]]}
    for c in columns:
        for row, v in cols[c]:
            if _is_empty(v):
                problems.add(row, f"empty value in label column {c!r}")
                continue
            x = _number(v.strip())
            if x not in (0, 1, -1):
                problems.add(row, f"value {v.strip()!r} in label column {c!r}; multi-label columns must hold 0 or 1 "
                                  f"(or -1 = missing)")
                continue
            out[row].append(int(x))  # type: ignore[arg-type]
    return {row: tuple(v) for row, v in out.items() if len(v) == len(columns)}


@register_adapter("manifest", "Your own images listed in a CSV (2D/3D; classification or segmentation)", DETAILS)
def build_manifest(root: Path | None, labels: list[str] | str | None = None, class_names: list[str] | None = None,
                   task: str = "auto", ndim: int | None = None, num_classes: int | None = None,
                   slice_axis: int = 2, orientation: str = "canonical", spacing: Any = None,
                   window: Any = None) -> ImageDataset:
    """Build a dataset from the manifest CSV ``root``."""
    path = require_root("manifest", root, "the path of a CSV file listing images (columns image, split, label, ...)")
    if not path.is_file():
        raise DataError(f"{path}: manifest CSV not found" if not path.exists() else
                        f"{path}: is a folder; expected the path of a manifest CSV file")
    label_cols = option("labels", labels, list[str] | None)
    names_opt = option("class_names", class_names, list[str] | None)
    task = option("task", task, str, choices=("auto", "classification", "segmentation", "none"))
    slice_axis = option("slice_axis", slice_axis, int, choices=(0, 1, 2))
    orientation = option("orientation", orientation, str, choices=("canonical", "file"))
    spacing = spacing_option(spacing, "option spacing")
    window_range(window, "option window")  # checked now; a volume dataset applies it as its value_range
    if ndim is not None:
        ndim = option("ndim", ndim, int, choices=(2, 3))
    if num_classes is not None:
        num_classes = option("num_classes", num_classes, int, minimum=2)

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

    # paths, splits, duplicates, existence (row by row; see _RowProblems)
    problems = _RowProblems(path)
    images: dict[int, Path] = {}
    masks: dict[int, Path | None] = {}
    splits: dict[int, str] = {}
    missing: list[tuple[int, str, Path]] = []
    seen: dict[str, int] = {}
    for k, (n, _) in enumerate(rows):
        raw = col["image"][k][1].strip()
        if not raw:
            problems.add(n, "empty 'image' value")
            continue
        if raw in seen:
            problems.add(n, f"image {raw!r} is already listed in row {seen[raw]}")
            continue
        seen[raw] = n
        split = col["split"][k][1].strip().lower()
        if split not in SPLITS:
            problems.add(n, f"unknown split {col['split'][k][1].strip()!r}; expected train, val or test")
            continue
        img = Path(raw).expanduser()
        img = img if img.is_absolute() else base / img
        if not (img.is_file() or (img.is_dir() and ndim != 2)):  # a folder: a DICOM series
            missing.append((n, f"image {raw}", img))
        mask = None
        if "mask" in header:
            mraw = col["mask"][k][1].strip()
            if mraw:
                mask = Path(mraw).expanduser()
                mask = mask if mask.is_absolute() else base / mask
                if not mask.is_file():
                    missing.append((n, f"mask {mraw}", mask))
            elif task == "segmentation":
                problems.add(n, "empty 'mask' value (segmentation needs a mask for every row)")
                continue
        images[n], masks[n], splits[n] = img, mask, split
    if missing and not collecting():
        shown = "; ".join(f"row {n} {what}" for n, what, _ in missing[:10])
        more = f"; and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(f"{path}: {len(missing)} listed file(s) not found (paths are relative to the CSV folder "
                        f"{base}): {shown}{more}")
    for n, what, where in missing:
        problems.add(n, f"{what} is listed but not found (looked for {where})")

    # labels and task (rows that passed the checks above)
    listed = {n: k for k, (n, _) in enumerate(rows) if n in images}
    cells = {c: [(n, col[c][k][1]) for n, k in listed.items()] for c in label_cols}
    label_values: dict[int, Any]
    if task == "classification":
        if len(label_cols) == 1:
            label_values, kind, names = _class_labels(path, label_cols[0], cells[label_cols[0]], names_opt, problems)
        else:
            label_values = _multilabel(label_cols, cells, problems)
            kind, names = "multilabel", tuple(names_opt or label_cols)
            if len(names) != len(label_cols):
                raise ConfigError(f"class_names has {len(names)} names for {len(label_cols)} label columns")
        spec = TaskSpec(kind, names)  # type: ignore[arg-type]
    else:
        label_values = {n: None for n in listed}
        spec = TaskSpec("none")
    keep = [(n, k) for n, k in listed.items() if n not in problems.bad and n in label_values]
    if not keep:
        raise DataError(f"{path}: no usable rows (every row has a problem)")
    meta_cols = [c for c in header if c not in {"image", "mask", "split", "patient_id", "report"} and c
                 and not (task == "classification" and c in label_cols)]
    meta = {c: _parse_metadata([col[c][k][1] for _, k in keep]) for c in meta_cols}
    records = []
    for j, (n, k) in enumerate(keep):
        raw = col["image"][k][1].strip()
        pid = col["patient_id"][k][1].strip() if "patient_id" in header else ""
        report = col["report"][k][1].strip() if "report" in header else ""
        records.append(Record(raw, splits[n], pid or raw, label_values[n], {c: meta[c][j] for c in meta_cols},
                              str(images[n]), str(masks[n]) if masks[n] is not None else None,
                              report=report or None))

    # dimensionality from the first image
    if ndim is None:
        first = images[keep[0][0]]
        if file_kind(first) in ("nifti", "itk") or first.is_dir():
            ndim = 3
        else:
            arr = read_image(first)
            ndim = 3 if arr.ndim == 3 and arr.shape[-1] not in (3, 4) else 2
    if task == "segmentation":
        if num_classes is None and names_opt:
            num_classes = len(names_opt)
        if num_classes is None:  # read every mask once to find the largest label
            top = max(int(read_mask(m, slice_axis).max()) for m in (masks[n] for n, _ in keep) if m is not None)
            num_classes = max(2, top + 1)
        if names_opt and len(names_opt) != num_classes:
            raise ConfigError(f"class_names has {len(names_opt)} names but num_classes is {num_classes}")
        spec = TaskSpec("segmentation", tuple(names_opt or ["background"] + [f"class_{i}"
                                                                         for i in range(1, num_classes)]))
    args = (path, records, spec, [n for n, _ in keep], ndim, slice_axis, num_classes if task == "segmentation" else None)
    if ndim == 3 and orientation == "canonical":
        return CanonicalVolumes(*args, spacing=spacing, window=window)
    if spacing is not None:
        raise ConfigError(f"option spacing resamples volumes read with orientation=canonical "
                          f"(this manifest: ndim={ndim}, orientation={orientation})")
    ds = ManifestDataset(*args)
    if window is not None:  # e.g. 2D CT DICOM slices in Hounsfield units
        ds.value_range = window_range(window, "option window")
        ds.source += f"|intensity={describe_intensity(window)}"
    return ds
