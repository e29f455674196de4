"""Patient-level splitting and leakage checks.

Images of one patient must all sit in the same split, otherwise a model is tested on
patients it was trained on and its scores are inflated. :func:`patient_split` assigns
whole patients, :func:`resplit` applies a new assignment to a dataset and
:func:`check_no_leakage` verifies an existing one.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from medprobe.data.base import SPLITS, ImageDataset, Record
from medprobe.errors import ConfigError, DataError

SPLIT_METHODS = ("stratified", "systematic")


def check_no_leakage(dataset: ImageDataset | Sequence[Record]) -> None:
    """Raise :class:`DataError` when a patient id appears in more than one split."""
    records = dataset.records if isinstance(dataset, ImageDataset) else list(dataset)
    where: dict[str, set[str]] = defaultdict(set)
    for r in records:
        where[r.patient_id].add(r.split)
    bad = sorted((p for p, s in where.items() if len(s) > 1), key=_natural_key)
    if not bad:
        return
    order = {s: i for i, s in enumerate(SPLITS)}
    shown = "; ".join(f"{p!r} in {', '.join(sorted(where[p], key=lambda s: (order.get(s, 99), s)))}"
                      for p in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    name = dataset.name if isinstance(dataset, ImageDataset) else "records"
    raise DataError(f"{name}: {len(bad)} patient(s) appear in more than one split (patient-level leakage): "
                    f"{shown}{more}. Put all images of a patient in one split, e.g. with "
                    f"medprobe.data.resplit(dataset) or by fixing the split column.")


def _natural_key(text: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(text)) if t)


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    try:
        f = np.asarray([float(x) for x in fractions], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"split fractions must be numbers, got {fractions!r}") from None
    if len(f) not in (2, 3) or (f < 0).any() or abs(f.sum() - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be 2 (train, test) or 3 (train, val, test) non-negative numbers "
                          f"summing to 1, got {list(fractions)}")
    return f


def _allocate(n: int, fractions: np.ndarray) -> np.ndarray:
    """Split index for positions 0..n-1; every prefix holds each split in proportion (+-1)."""
    credit = np.zeros(len(fractions))
    out = np.empty(n, dtype=np.int64)
    for j in range(n):
        credit += fractions
        k = int(np.argmax(credit))
        out[j] = k
        credit[k] -= 1.0
    return out


def _patient_stratum(labels: list[Any]) -> Any:
    """One label per patient: any-positive for 0/1 and multi-label (-1 = missing, not positive), else the
    majority class."""
    vals = [v for v in labels if v is not None]
    if not vals:
        return None
    if isinstance(vals[0], (tuple, list, np.ndarray)):
        return int(any(any(int(x) == 1 for x in v) for v in vals))
    if all(v in (0, 1) for v in vals):
        return int(max(vals))
    counts = Counter(vals)
    best = max(counts.values())
    return sorted((v for v, c in counts.items() if c == best), key=str)[0]


def patient_split(records: Sequence[Record], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
                  method: str = "stratified") -> dict[str, str]:
    """Assign every record a split so that each patient lies in exactly one split.

    Returns ``{record key: split}``. ``fractions`` are of patients (train, val, test; or
    train, test). ``stratified``: patients are shuffled (``seed``) within strata of their
    label (any-positive for binary/multi-label, majority class for multiclass) and dealt
    out so that every stratum is split in the given proportions. ``systematic``: patients
    sorted by id are dealt out in a fixed rotating pattern (every k-th patient to test,
    ...), as in systematic sampling; ``seed`` shifts the pattern.
    """
    if method not in SPLIT_METHODS:
        from medprobe.errors import suggest
        raise ConfigError(suggest(str(method), SPLIT_METHODS, "split method"))
    f = _check_fractions(fractions)
    names = SPLITS if len(f) == 3 else ("train", "test")
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    patients = sorted(by_patient, key=_natural_key)
    if method == "systematic":
        alloc = np.roll(_allocate(len(patients), f), int(seed))
        ordered = patients
    else:
        rng = np.random.default_rng(seed)
        strata: dict[str, list[str]] = defaultdict(list)
        for p in patients:
            strata[repr(_patient_stratum([r.label for r in by_patient[p]]))].append(p)
        ordered = []
        for key in sorted(strata):
            members = strata[key]
            ordered.extend(members[i] for i in rng.permutation(len(members)))
        alloc = _allocate(len(ordered), f)
    assign: dict[str, str] = {}
    for p, k in zip(ordered, alloc):
        for r in by_patient[p]:
            assign[r.key] = names[int(k)]
    return assign


class ResplitDataset(ImageDataset):
    """The same images as ``parent`` with new split assignments (pixels are shared)."""

    def __init__(self, parent: ImageDataset, records: Sequence[Record], note: str) -> None:
        self.parent = parent
        super().__init__(records, parent.task, name=parent.name, ndim=parent.ndim,
                         source=f"{parent.source}|{note}")
        if hasattr(parent, "value_range"):
            self.value_range = parent.value_range

    def load_image(self, index: int) -> np.ndarray:
        return self.parent.load_image(index)

    def load_mask(self, index: int) -> np.ndarray:
        return self.parent.load_mask(index)

    def affine(self, index: int) -> np.ndarray:
        """The parent's voxel-to-world affine (datasets with NIfTI volumes)."""
        return self.parent.affine(index)  # type: ignore[attr-defined]

    def _content_digest(self) -> str:
        return self.parent._content_digest()


def resplit(dataset: ImageDataset, fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0,
            method: str = "stratified") -> ImageDataset:
    """A dataset with the same images and a new patient-level split (see :func:`patient_split`)."""
    assign = patient_split(dataset.records, fractions, seed, method)
    records = [replace(r, split=assign[r.key], metadata=dict(r.metadata))
               for r in dataset.records]
    note = f"resplit({method},{','.join(f'{x:g}' for x in _check_fractions(fractions))},seed={seed})"
    return ResplitDataset(dataset, records, note)
