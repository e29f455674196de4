"""What a dataset is: a list of light records plus a way to read pixels for one of them.

Adapters (``medmnist``, ``manifest``, ``phantom``, the public benchmarks) produce an
:class:`ImageDataset`. Records are cheap (paths, labels, patient id, metadata); pixels are
read on demand by :meth:`ImageDataset.load_image`, so a dataset of any size costs little
memory until it is iterated.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

TaskKind = Literal["binary", "multiclass", "multilabel", "segmentation", "none"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """The prediction target of a dataset.

    ``kind`` is binary (labels 0/1), multiclass (labels 0..C-1), multilabel (multi-hot
    vectors of length C; ``-1`` marks a missing target -- a finding the dataset does not label,
    masked out of every loss and metric, never a negative; see :mod:`medprobe.data.harmonise`), segmentation (masks with values 0..C-1, 0 = background) or none
    (unlabelled images, e.g. for self-supervised pretraining).
    """

    kind: TaskKind
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Record:
    """One image or volume: where it is, its label, patient and metadata (no pixels)."""

    key: str
    split: str
    patient_id: str
    label: Any = None  # int, tuple of 0/1 with -1 = missing (multi-label) or None
    metadata: dict[str, Any] = field(default_factory=dict)
    image_path: str | None = None
    mask_path: str | None = None
    report: str | None = None  # free-text report (e.g. the findings section) for report generation


class ImageDataset:
    """Base class of every dataset adapter.

    Subclasses fill ``records`` and implement :meth:`load_image` (and :meth:`load_mask`
    for segmentation). Images come back as float32 arrays, (H, W) for 2D images or
    (D, H, W) for volumes, in their native intensity units (no normalisation).
    """

    name: str = "dataset"
    ndim: int = 2
    #: known range of native intensities (e.g. (0, 255) for 8-bit files); None = scale each image by percentiles
    value_range: tuple[float, float] | None = None

    def __init__(self, records: Sequence[Record], task: TaskSpec, *, name: str | None = None,
                 ndim: int | None = None, source: str = "") -> None:
        self.records: list[Record] = list(records)
        self.task = task
        if name is not None:
            self.name = name
        if ndim is not None:
            self.ndim = ndim
        self.source = source

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def load_mask(self, index: int) -> np.ndarray:
        raise NotImplementedError(f"dataset {self.name!r} has no masks")

    # ------------------------------------------------------------------ helpers
    def splits(self) -> list[str]:
        """Split names present, in the canonical order train, val, test, then others."""
        present = {r.split for r in self.records}
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))

    def indices(self, split: str) -> np.ndarray:
        return np.array([i for i, r in enumerate(self.records) if r.split == split], dtype=np.int64)

    def labels(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """Labels as an array: (N,) ints for binary/multiclass, (N, C) for multilabel."""
        idx = range(len(self.records)) if indices is None else indices
        vals = [self.records[i].label for i in idx]
        if self.task.kind == "multilabel":
            return np.asarray(vals, dtype=np.float32).reshape(len(vals), self.task.num_classes)
        return np.asarray(vals, dtype=np.int64)

    def metadata_column(self, column: str, indices: Sequence[int] | None = None) -> list[Any]:
        idx = range(len(self.records)) if indices is None else indices
        return [self.records[i].metadata.get(column) for i in idx]

    def fingerprint(self) -> str:
        """Digest of the dataset's identity: source, records and labels (not pixels)."""
        h = hashlib.sha256()
        h.update(json.dumps({"name": self.name, "source": self.source, "task": [self.task.kind, list(self.task.class_names)],
                             "ndim": self.ndim}, sort_keys=True).encode())
        for r in self.records:
            h.update(f"{r.key}|{r.split}|{r.patient_id}|{r.label}|{r.image_path}|{r.mask_path}\n".encode())
            if r.report is not None:
                h.update(hashlib.sha256(r.report.encode()).digest())
        h.update(self._content_digest().encode())
        return h.hexdigest()[:16]

    def _content_digest(self) -> str:
        """Extra identity of the pixel source (file size/mtime, array digest); override."""
        return ""

    def subset(self, indices: Sequence[int]) -> "SubsetDataset":
        return SubsetDataset(self, indices)


class SubsetDataset(ImageDataset):
    """A view on some records of another dataset."""

    def __init__(self, parent: ImageDataset, indices: Sequence[int]) -> None:
        self.parent = parent
        self._map = [int(i) for i in indices]
        super().__init__([parent.records[i] for i in self._map], parent.task, name=parent.name,
                         ndim=parent.ndim, source=parent.source)
        self.value_range = parent.value_range

    def load_image(self, index: int) -> np.ndarray:
        return self.parent.load_image(self._map[index])

    def load_mask(self, index: int) -> np.ndarray:
        return self.parent.load_mask(self._map[index])

    def _content_digest(self) -> str:
        return self.parent._content_digest()


class ArrayDataset(ImageDataset):
    """A dataset whose pixels are in memory (MedMNIST npz, phantom)."""

    def __init__(self, images: np.ndarray | Sequence[np.ndarray], records: Sequence[Record], task: TaskSpec, *,
                 masks: np.ndarray | Sequence[np.ndarray] | None = None, name: str = "arrays", ndim: int = 2,
                 source: str = "") -> None:
        super().__init__(records, task, name=name, ndim=ndim, source=source)
        self.images = images
        self.masks = masks
        if len(images) != len(self.records):
            raise ValueError(f"{len(images)} images for {len(self.records)} records")

    def load_image(self, index: int) -> np.ndarray:
        return np.asarray(self.images[index], dtype=np.float32)

    def load_mask(self, index: int) -> np.ndarray:
        if self.masks is None:
            return super().load_mask(index)
        return np.asarray(self.masks[index], dtype=np.int64)

    def _content_digest(self) -> str:
        h = hashlib.sha256()
        if isinstance(self.images, np.ndarray):
            h.update(np.ascontiguousarray(self.images).view(np.uint8).data)
        else:
            for im in self.images:
                h.update(np.ascontiguousarray(im).view(np.uint8).data)
        return h.hexdigest()


def record_metadata(records: Sequence[Record]) -> dict[str, list[Any]]:
    """Per-sample metadata columns (sex, age, view...) of ``records``, in order (missing = None)."""
    names = list(dict.fromkeys(k for r in records for k in r.metadata))
    return {k: [r.metadata.get(k) for r in records] for k in names}
