"""Shared pieces of the public-benchmark adapters.

* problem collection: every problem with user data names its file (and CSV row). A
  builder gathers them in a :class:`Problems` and raises one :class:`DataError` listing
  them; under :func:`collect_problems` (used by ``medprobe data check``) they are
  recorded instead and the bad rows skipped, so a check lists them all;
* :func:`read_table`: a strict CSV reader (truncated rows, missing columns, bad quoting);
* :class:`FileIndex`: find files by name anywhere under a dataset folder;
* split policies: official splits, or patient-level systematic / stratified splits
  chosen by the ``split``, ``split_seed``, ``split_fractions`` (and ``val_fraction``)
  options and recorded in ``dataset.split_policy`` and ``dataset.source``;
* :class:`PublicDataset`: a file-backed dataset whose read errors name the listing row.
"""
from __future__ import annotations

import contextvars
import csv
import gzip
import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import require_root
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.readers import read_image, read_mask
from medprobe.data.splits import check_no_leakage, patient_split
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

# --------------------------------------------------------------------------- problems
_COLLECTOR: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("medprobe_data_problems",
                                                                               default=None)
#: How many problems a DataError message shows before "... and N more".
SHOWN = 10


@contextmanager
def collect_problems() -> Iterator[list[str]]:
    """Within this block adapters record user-data problems in the yielded list and skip
    the bad rows instead of raising (fatal problems, e.g. a missing CSV, still raise)."""
    token = _COLLECTOR.set([])
    try:
        yield _COLLECTOR.get()  # type: ignore[misc]
    finally:
        _COLLECTOR.reset(token)


def collecting() -> bool:
    """True inside :func:`collect_problems`."""
    return _COLLECTOR.get() is not None


class Problems:
    """The problems found while building one dataset (each message names file and row)."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.items: list[str] = []

    def add(self, message: str) -> None:
        bucket = _COLLECTOR.get()
        (bucket if bucket is not None else self.items).append(message)

    def __len__(self) -> int:
        return len(self.items)

    def check(self) -> None:
        """Raise one DataError listing the problems so far (none are kept when collecting)."""
        if not self.items:
            return
        items, self.items = self.items, []
        if len(items) == 1:
            raise DataError(items[0])
        shown = "\n  ".join(items[:SHOWN])
        more = f"\n  ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
        raise DataError(f"{self.adapter}: {len(items)} problems in the dataset files:\n  {shown}{more}\n"
                        f"Run `medprobe data check {self.adapter} --root ...` to list them all.")


# --------------------------------------------------------------------------- CSV files
@dataclass
class Row:
    """One CSV data row: its row number in the file (the header is row 1) and its cells."""

    number: int
    cells: dict[str, str]

    def __getitem__(self, column: str) -> str:
        return self.cells.get(column, "")


@dataclass
class Table:
    """The selected columns of a CSV file, row by row."""

    path: Path
    header: list[str]
    rows: list[Row]

    def where(self, row: Row | int) -> str:
        return f"{self.path} row {row.number if isinstance(row, Row) else row}"


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"{path}: not found; expected {what}" if not path.exists() else
                        f"{path}: is a folder; expected {what}")
    try:
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read {what}: {e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (undecodable byte at line {line}); expected {what}") from None


def read_table(path: Path, required: Sequence[str], problems: Problems, *, what: str,
               optional: Sequence[str] = (), all_columns: bool = False) -> Table:
    """Read a CSV file, keeping ``required`` + ``optional`` columns (or all of them).

    Fatal (raised at once): the file is missing, unreadable or empty, or a required column
    is absent. Per row (recorded in ``problems``, the row skipped): fewer fields than the
    header names (a truncated file or row), extra non-empty fields. A quoting error (e.g.
    a file cut inside a quoted field) is recorded and ends the table at that row.
    Trailing unnamed header columns (as in NIH's ``Data_Entry_2017.csv``) may be absent.
    """
    text = _read_text(path, what)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file; expected {what} with a header row") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV header: {e}") from None
    header = [h.strip() for h in header]
    named = max((i + 1 for i, h in enumerate(header) if h), default=0)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; expected {what} with "
                        f"columns {', '.join(required)}; columns present: {', '.join(h for h in header if h)}")
    wanted = [h for h in header if h] if all_columns else [c for c in list(required) + list(optional) if c in header]
    index = {c: header.index(c) for c in wanted}
    rows: list[Row] = []
    number = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            problems.add(f"{path} line {reader.line_num} (after row {number}): malformed CSV ({e}); the file may be "
                         f"truncated or have an unbalanced quote; rows from here on were not read")
            break
        number += 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) < named:
            problems.add(f"{path} row {number}: {len(cells)} field(s) but the header has {named} columns (truncated "
                         f"file or row?); expected {', '.join(header[:named])}")
            continue
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
            problems.add(f"{path} row {number}: {len(cells)} fields but the header has {len(header)} columns "
                         f"(an unquoted comma?)")
            continue
        rows.append(Row(number, {c: cells[i].strip() for c, i in index.items()}))
    return Table(path, header, rows)


def read_list(path: Path, what: str) -> list[tuple[int, str]]:
    """Non-empty lines of a text file as (line number, stripped text)."""
    text = _read_text(path, what)
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def parse_float(text: str) -> float | None:
    """A finite float from a CSV cell, else None."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def parse_int(text: str) -> int | None:
    """An integer from "3", "3.0"; None for anything else."""
    v = parse_float(text)
    return int(v) if v is not None and v == int(v) else None


# --------------------------------------------------------------------------- files
class FileIndex:
    """Every file under ``root`` by name (one walk, on first use; hidden and ``._`` files skipped).

    When a name occurs in several folders the first in sorted walk order wins.
    """

    def __init__(self, root: Path, suffixes: Iterable[str] | None = None) -> None:
        self.root = root
        self.suffixes = tuple(s.lower() for s in suffixes) if suffixes is not None else None
        self._by_name: dict[str, Path] | None = None

    def _build(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.startswith(".") or (self.suffixes is not None and not f.lower().endswith(self.suffixes)):
                    continue
                out.setdefault(f, Path(folder) / f)
        return out

    def get(self, name: str) -> Path | None:
        if self._by_name is None:
            self._by_name = self._build()
        return self._by_name.get(name)

    def names(self) -> list[str]:
        if self._by_name is None:
            self._by_name = self._build()
        return list(self._by_name)


def folder_root(adapter: str, root: Path | None, what: str) -> Path:
    """``root`` as an existing folder, else an error saying what the adapter expects."""
    path = require_root(adapter, root, what)
    if not path.is_dir():
        raise DataError(f"{path}: {'not found' if not path.exists() else 'is a file'}; dataset adapter "
                        f"{adapter!r} expects {what}")
    return path


def find_first(root: Path, names: Sequence[str], what: str) -> Path:
    """The first of ``names`` (relative to ``root``) that exists, else a DataError listing them."""
    for n in names:
        if (root / n).is_file():
            return root / n
    raise DataError(f"{root}: none of {', '.join(names)} found; expected {what}")


MISSING_CHOICES = ("error", "skip")


class Presence:
    """Checks that listed files exist; ``missing=skip`` drops absent ones (counted) instead."""

    def __init__(self, missing: str, problems: Problems) -> None:
        self.skip = option("missing", missing, str, choices=MISSING_CHOICES) == "skip"
        self.problems = problems
        self.skipped = 0

    def ok(self, path: Path | None, where: str, name: str, what: str = "image") -> bool:
        """True if ``path`` is an existing file; otherwise record a problem (or count a skip)."""
        if path is not None and path.is_file():
            return True
        if self.skip:
            self.skipped += 1
        else:
            self.problems.add(f"{where}: {what} {name} is listed but not found"
                              f"{f' (looked for {path})' if path is not None else ''}")
        return False

    def note(self) -> str:
        return f"missing=skip dropped {self.skipped}" if self.skip else ""


# --------------------------------------------------------------------------- splits
SPLIT_METHODS = ("official", "systematic", "stratified")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass(frozen=True)
class SplitPolicy:
    """How records were assigned to train/val/test (recorded with every result).

    ``official``: the dataset's own split; records of the official training part are
    split by patient into train and val (``val_fraction`` of the patients, stratified
    random with ``seed``). ``systematic`` / ``stratified``: patient-level splits of
    all records with ``fractions`` (see :func:`medprobe.data.splits.patient_split`).
    """

    method: str
    seed: int
    fractions: tuple[float, ...]
    val_fraction: float | None = None

    def describe(self) -> str:
        if self.method == "official":
            return f"official(val_fraction={self.val_fraction:g},seed={self.seed})"
        return f"{self.method}({','.join(f'{f:g}' for f in self.fractions)},seed={self.seed})"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "seed": self.seed}
        if self.method == "official":
            out["val_fraction"] = self.val_fraction
        else:
            out["fractions"] = list(self.fractions)
        return out


def _fractions(value: Any) -> tuple[float, ...]:
    items = value.replace(";", ",").split(",") if isinstance(value, str) else value
    try:
        out = tuple(float(v) for v in items)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"option split_fractions must be 2 (train, test) or 3 (train, val, test) numbers, "
                          f"got {value!r}") from None
    if len(out) not in (2, 3) or any(f < 0 for f in out) or abs(sum(out) - 1.0) > 1e-6:
        raise ConfigError(f"option split_fractions must be 2 (train, test) or 3 (train, val, test) non-negative "
                          f"numbers summing to 1, got {list(out)}")
    return out


def split_policy(split: str, split_seed: Any, split_fractions: Any, val_fraction: Any = None,
                 official: bool = False) -> SplitPolicy:
    """Validate the split options of an adapter (``official`` only where the dataset has one)."""
    choices = SPLIT_METHODS if official else SPLIT_METHODS[1:]
    if split == "official" and not official:
        raise ConfigError("option split: this dataset has no official split with labels; use split=systematic "
                          "(patient-level systematic sampling) or split=stratified")
    method = option("split", split, str, choices=choices)
    seed = option("split_seed", split_seed, int, minimum=0)
    fractions = _fractions(split_fractions)
    vf = None
    if method == "official":
        try:
            vf = float(val_fraction if val_fraction is not None else 0.0)
        except (TypeError, ValueError):
            raise ConfigError(f"option val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
        if not 0.0 <= vf < 1.0:
            raise ConfigError(f"option val_fraction must be a number in [0, 1), got {val_fraction!r}")
    return SplitPolicy(method, seed, fractions, vf)


def assign_splits(drafts: Sequence[Record], policy: SplitPolicy) -> list[Record]:
    """Records with their final split. For ``official``, ``drafts`` carry the official split
    ("train" or "test", maybe "val"); otherwise their split is ignored."""
    if policy.method == "official":
        assign = {r.key: r.split for r in drafts}
        pool = [r for r in drafts if r.split == "train"]
        if pool and policy.val_fraction:
            inner = patient_split(pool, (1.0 - policy.val_fraction, policy.val_fraction), seed=policy.seed,
                                  method="stratified")
            assign.update({k: ("val" if s == "test" else "train") for k, s in inner.items()})
    else:
        assign = patient_split(drafts, policy.fractions, seed=policy.seed, method=policy.method)
    return [replace(r, split=assign[r.key]) for r in drafts]


# --------------------------------------------------------------------------- the dataset
class PublicDataset(ImageDataset):
    """Records of a public benchmark; pixels read on demand from the files they name.

    ``where[i]`` says where record ``i`` is listed (e.g. ``.../train.csv row 17``); read
    errors append it to the file's own message. Subclasses override :meth:`read_image` /
    :meth:`read_mask` for special formats. ``split_policy`` (a dict) records how the
    splits were made; the same text is part of ``source`` and so of the fingerprint.
    """

    def __init__(self, adapter: str, root: Path, records: Sequence[Record], task: TaskSpec, *, where: Sequence[str],
                 policy: SplitPolicy | None, annotation_files: Sequence[Path] = (), ndim: int = 2,
                 value_range: tuple[float, float] | None = None, notes: Sequence[str] = (),
                 name: str | None = None) -> None:
        extra = "|".join(n for n in notes if n)
        source = f"{adapter}:{root.resolve()}|split={policy.describe() if policy else 'none'}" + \
            (f"|{extra}" if extra else "")
        super().__init__(records, task, name=name or adapter, ndim=ndim, source=source)
        self.root = root
        self.where = list(where)
        self.split_policy: dict[str, Any] = policy.as_dict() if policy else {}
        self.annotation_files = list(annotation_files)
        self.value_range = value_range
        if len(self.where) != len(self.records):
            raise ValueError("one 'where' per record")

    # ------------------------------------------------------------------ reading
    def read_image(self, index: int) -> np.ndarray:
        path = self.records[index].image_path
        assert path is not None
        return read_image(path)

    def read_mask(self, index: int) -> np.ndarray:
        path = self.records[index].mask_path
        if path is None:
            raise DataError(f"{self.records[index].image_path or self.records[index].key}: no mask for this image")
        return read_mask(path)

    def load_image(self, index: int) -> np.ndarray:
        try:
            image = self.read_image(index)
        except DataError as e:
            raise DataError(f"{e} [listed in {self.where[index]}]") from None
        if self.ndim == 3 and image.ndim != 3:
            raise DataError(f"{self.records[index].image_path}: expected a volume (D, H, W), got shape {image.shape} "
                            f"[listed in {self.where[index]}]")
        if self.ndim == 2 and not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
            raise DataError(f"{self.records[index].image_path}: expected a 2D image, got shape {image.shape} "
                            f"[listed in {self.where[index]}]")
        return image

    def load_mask(self, index: int) -> np.ndarray:
        if self.task.kind != "segmentation":
            return super().load_mask(index)
        try:
            mask = self.read_mask(index)
        except DataError as e:
            raise DataError(f"{e} [listed in {self.where[index]}]") from None
        c = self.task.num_classes
        if mask.size and (mask.min() < 0 or mask.max() >= c):
            bad = np.unique(mask[(mask < 0) | (mask >= c)])[:10]
            src = self.records[index].mask_path or self.where[index]
            raise DataError(f"{src}: mask has values {', '.join(str(int(v)) for v in bad)} outside the classes "
                            f"0..{c - 1} ({', '.join(self.task.class_names)}) [listed in {self.where[index]}]")
        return mask

    def _content_digest(self) -> str:
        h = hashlib.sha256()
        for p in self.annotation_files:
            try:
                st = Path(p).stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}|missing\n".encode())
        return h.hexdigest()


class DicomDataset(PublicDataset):
    """Images that are DICOM files whatever their extension (.dicom, .dcm, none, or a UID suffix)."""

    def read_image(self, index: int) -> np.ndarray:
        from medprobe.data.readers import read_dicom
        return read_dicom(self.records[index].image_path or "")


def finish(dataset: PublicDataset, problems: Problems) -> PublicDataset:
    """Raise the collected problems, refuse an empty dataset, run the leakage guard."""
    problems.check()
    if not dataset.records:
        raise DataError(f"{dataset.root}: no usable images found for dataset adapter {problems.adapter!r}; see "
                        f"`medprobe list datasets --details {problems.adapter}` for the expected layout")
    if not collecting():  # `data check` reports leakage itself, with the other problems
        check_no_leakage(dataset)
    return dataset


# --------------------------------------------------------------------------- small helpers
def natural_key(text: str) -> tuple:
    """Sort key putting "img2" before "img10"."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", str(text)) if t)


def dicom_header(path: Path, tags: Sequence[str] = ("PatientSex", "PatientAge", "ViewPosition",
                                                   "InstitutionName")) -> dict[str, Any]:
    """Selected DICOM header values (strings; None when absent), without reading pixels."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():  # e.g. RSNA's PatientAge "51" is not a valid DICOM AS value; it is parsed anyway
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=list(tags))
        except InvalidDicomError:
            raise DataError(f"{path}: not a valid DICOM file (no DICOM header; corrupt or not DICOM)") from None
        except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: cannot read DICOM header (corrupt or truncated?): {e}") from None
        out: dict[str, Any] = {}
        for t in tags:
            v = ds.get(t)
            out[t] = str(v).strip() if v is not None and str(v).strip() else None
    return out


# --------------------------------------------------------------------------- shared documentation
SPLITS_WITH_OFFICIAL = """\
Splits: split=official (default) keeps the official test set and splits the
official training part by patient into train and val (val_fraction of its
patients, default 0.1; stratified random with split_seed; val_fraction=0: no
val). split=systematic | stratified ignores the official split: patient-level
split of all images by split_fractions (train, val, test; default 0.7, 0.1, 0.2),
systematic sampling over the sorted patient ids (split_seed shifts the pattern)
or stratified random (split_seed)."""

SPLITS_WITHOUT_OFFICIAL = """\
Splits: no official labelled test split exists. split=systematic (default):
patient-level systematic sampling over the sorted patient ids (as in the
DINOv2-for-radiology study; split_seed shifts the pattern); split=stratified:
stratified random patient-level split (split_seed). Fractions: split_fractions
(train, val, test; default 0.7, 0.1, 0.2)."""

COMMON_NOTES = """\
The split policy is kept in dataset.split_policy and in dataset.source (so in the
fingerprint recorded with every result). Leakage guard: building fails, listing up
to 10 patient ids and their splits, when a patient is in more than one split.
missing=error (default): listed files that are absent are errors, each named
with its listing row; missing=skip drops them (the count is kept in
dataset.source). Problems name the file and CSV row (header = row 1);
`medprobe data check` lists all of them."""


def details(text: str, official: bool) -> str:
    """An adapter's --details text: its own description plus the shared split notes."""
    import inspect
    return "\n".join([inspect.cleandoc(text), SPLITS_WITH_OFFICIAL if official else SPLITS_WITHOUT_OFFICIAL,
                      COMMON_NOTES])
