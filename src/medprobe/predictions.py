"""Per-sample predictions of one unit: what its metrics were computed from, kept beside ``results.db``.

A :class:`Predictions` holds, per split, the sample keys and patient ids and any number of
named per-sample columns: ``target`` and ``score`` for classification (``(N,)`` binary,
``(N, C)`` multiclass/multilabel), per-case metrics such as ``dice`` ``(N, C)`` for
segmentation, ``reference``/``generated`` strings for report generation. Optional per-sample
``metadata`` columns (sex, age_bin, view, site...) let subgroup analyses run on finished
experiments; files written without them read back with an empty ``metadata``. It is written as
one ``.npz`` (no pickles) under a temporary name and renamed, and its SHA-256 is stored in
the unit's row, so a damaged or replaced file is detected.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.errors import DataError
from medprobe.fsutil import atomic_write

KINDS = ("classification", "segmentation", "text")


@dataclass
class SplitPredictions:
    """One split: ``keys[i]``/``patient_ids[i]`` name row ``i`` of every column and metadata column.

    ``metadata`` values are normalised by :func:`metadata_column`: numbers become float arrays
    (missing = NaN), anything else strings (missing = ``""``).
    """

    keys: list[str]
    patient_ids: list[str]
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.keys)
        if len(self.patient_ids) != n:
            raise ValueError(f"{len(self.patient_ids)} patient ids for {n} keys")
        self.metadata = {str(k): metadata_column(v) for k, v in self.metadata.items()}
        for what, cols in (("column", self.columns), ("metadata column", self.metadata)):
            for name, col in cols.items():
                if "/" in name:
                    raise ValueError(f"{what} name {name!r} may not contain '/'")
                if len(col) != n:
                    raise ValueError(f"{what} {name!r} has {len(col)} rows for {n} keys")

    def __len__(self) -> int:
        return len(self.keys)


_META = "__meta__/"  # file-name prefix of metadata columns inside a split


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and v == "")


def metadata_column(values: Any) -> np.ndarray:
    """Per-sample metadata values as an array: float (NaN = missing) when every present value is a
    number, else strings (``""`` = missing)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "fiu":
        return arr.astype(np.float64)
    if arr.dtype.kind == "U":
        return arr
    items = list(values)
    present = [v for v in items if not _missing(v)]
    if present and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                       for v in present):
        return np.array([np.nan if _missing(v) else float(v) for v in items], dtype=np.float64)
    return np.array(["" if _missing(v) else str(v) for v in items], dtype=str)


@dataclass
class Predictions:
    kind: str                       # one of KINDS
    task: str                       # binary | multiclass | multilabel | segmentation | text
    class_names: tuple[str, ...]
    splits: dict[str, SplitPredictions] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        self.class_names = tuple(self.class_names)

    # ------------------------------------------------------------------ file format
    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "__kind__": np.array(self.kind), "__task__": np.array(self.task),
            "__classes__": np.array(list(self.class_names), dtype=str)}
        for split, sp in self.splits.items():
            if "/" in split:
                raise ValueError(f"split name {split!r} may not contain '/'")
            arrays[f"{split}/__keys__"] = np.array(sp.keys, dtype=str)
            arrays[f"{split}/__patients__"] = np.array(sp.patient_ids, dtype=str)
            for name, col in sp.columns.items():
                col = np.asarray(col)
                if col.dtype == object:
                    col = col.astype(str)
                arrays[f"{split}/{name}"] = col
            for name, col in sp.metadata.items():
                arrays[f"{split}/{_META}{name}"] = col
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "predictions") -> "Predictions":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"{where} is not a medprobe predictions file ({e})") from None
        try:
            out = cls(str(arrays.pop("__kind__")), str(arrays.pop("__task__")),
                      tuple(str(c) for c in arrays.pop("__classes__")))
        except KeyError as e:
            raise DataError(f"{where} is not a medprobe predictions file (no {e.args[0]})") from None
        grouped: dict[str, dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            split, name = k.split("/", 1)
            grouped.setdefault(split, {})[name] = v
        for split, cols in grouped.items():
            keys = [str(x) for x in cols.pop("__keys__")]
            pids = [str(x) for x in cols.pop("__patients__")]
            meta = {k[len(_META):]: cols.pop(k) for k in [k for k in cols if k.startswith(_META)]}
            out.splits[split] = SplitPredictions(keys, pids, cols, meta)
        return out


def write_predictions(pred: Predictions, path: Path) -> str:
    """Write ``pred`` atomically (temporary file, fsync, rename); returns its SHA-256."""
    data = pred.to_bytes()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def read_predictions(path: Path, sha256: str | None = None) -> Predictions:
    """Read a predictions file; with ``sha256``, a DataError when the bytes differ from those recorded."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read predictions file {path}: {e.strerror or e}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"predictions file {path} was changed or damaged after it was written (checksum differs); "
                        "rerun the unit to rebuild it")
    return Predictions.from_bytes(data, str(path))


def classification_predictions(task: str, class_names: Any, splits: dict[str, tuple[list[str], list[str],
                               np.ndarray, np.ndarray]],
                               metadata: dict[str, dict[str, Any]] | None = None) -> Predictions:
    """Predictions of a classifier from ``{split: (keys, patient_ids, targets, scores)}``.

    Binary scores may be given as ``(N, 2)`` probabilities; the positive-class column is kept.
    ``metadata`` (optional): ``{split: {column: per-sample values}}`` in the same row order.
    """
    out = Predictions("classification", task, tuple(class_names))
    for split, (keys, pids, y, s) in splits.items():
        s = np.asarray(s, dtype=np.float64 if np.asarray(s).dtype == np.float64 else np.float32)
        if task == "binary" and s.ndim == 2:
            s = s[:, 1]
        out.splits[split] = SplitPredictions(list(map(str, keys)), list(map(str, pids)),
                                             {"target": np.asarray(y), "score": s},
                                             dict((metadata or {}).get(split, {})))
    return out
