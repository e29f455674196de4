"""Batches for the training loop: images, volume slices or cached slice embeddings.

A *source* holds one split and yields :class:`Batch` objects. Images are read once, scaled
to [0, 1] and resized to the training size (kept in memory as float16 when they fit in
``cache_mb``, else re-read per batch in a background thread); every batch is augmented (train
only) and normalised with the backbone's mean/std on the model's device. For 3D datasets an
item is a volume: its slices are concatenated with those of the other volumes of the batch
and ``owners`` says which volume each slice belongs to, so volumes of any depth are batched
without padding.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medprobe.data.base import ImageDataset, record_metadata
from medprobe.data.preprocess import Preprocessor
from medprobe.errors import DataError
from medprobe.features.extract import prefetch
from medprobe.protocols.adapt.augment import Augmenter


@dataclass
class Batch:
    """Model inputs of ``size`` samples: ``inputs`` (N_items, ...) and, for volumes, ``owners`` (N_items,)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])


def targets_tensor(labels: np.ndarray, task: str) -> torch.Tensor:
    """Labels as the loss expects them: class indices (long) or multi-hot (float)."""
    return torch.from_numpy(np.asarray(labels, dtype=np.float32 if task == "multilabel" else np.int64))


class Source:
    """One split of samples with labels; subclasses implement :meth:`_rows`."""

    labels: np.ndarray
    task: str
    in_memory: bool = True  # False: batches are read from the dataset in a background thread
    #: per-sample record keys and patient ids in source order (None when unknown); predictions are stored by them
    sample_keys: list[str] | None = None
    patient_ids: list[str] | None = None
    metadata: dict[str, list] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def order(self, shuffle: bool, generator: torch.Generator | None) -> np.ndarray:
        n = len(self)
        return torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                device: torch.device = torch.device("cpu"), augment: Augmenter | None = None,
                drop_last: bool = False) -> Iterator[Batch]:
        order = self.order(shuffle, generator)
        stop = len(order) - len(order) % batch_size if drop_last and len(order) >= batch_size else len(order)
        yield from self.load([order[i:i + batch_size] for i in range(0, stop, batch_size)], device=device,
                             augment=augment, generator=generator)

    def load(self, chunks: Sequence[np.ndarray], *, device: torch.device = torch.device("cpu"),
             augment: Augmenter | None = None, generator: torch.Generator | None = None) -> Iterator[Batch]:
        """One batch per array of rows in ``chunks`` (read ahead in a background thread when not in memory)."""
        raw = (self._rows(rows) for rows in chunks)
        if not self.in_memory:
            raw = prefetch(raw)
        for rows, (x, owners) in zip(chunks, raw):
            yield self._finish(x, owners, rows, device, augment, generator)

    def _rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _finish(self, x: torch.Tensor, owners: torch.Tensor | None, rows: np.ndarray, device: torch.device,
                augment: Augmenter | None, generator: torch.Generator | None) -> Batch:
        y = targets_tensor(self.labels[rows], self.task).to(device)
        return Batch(x.to(device), y, None if owners is None else owners.to(device))


class ImageSource(Source):
    """Images or volumes of one split, prepared for a backbone's preprocessing at one size."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int], pre: Preprocessor, *,
                 cache_mb: float = 4096.0) -> None:
        self.dataset, self.pre = dataset, pre
        self.indices = np.asarray(indices, dtype=np.int64)
        self.task = dataset.task.kind
        self.labels = dataset.labels(self.indices)
        records = [dataset.records[i] for i in self.indices]
        self.sample_keys = [r.key for r in records]
        self.patient_ids = [r.patient_id for r in records]
        self.metadata = record_metadata(records)
        self.volumetric = dataset.ndim == 3
        self._cache: torch.Tensor | list[torch.Tensor] | None = None
        self.in_memory = False
        if len(self.indices) and self._estimate_mb() <= cache_mb:
            self._cache = self._load(np.arange(len(self.indices)), stack=not self.volumetric)
            self.in_memory = True

    def _estimate_mb(self) -> float:
        first = self.dataset.load_image(int(self.indices[0]))
        depth = first.shape[0] if self.volumetric else 1
        channels = 3 if first.ndim == (4 if self.volumetric else 3) else 1
        return len(self.indices) * depth * channels * self.pre.image_size ** 2 * 2 / 2**20

    def _prepare(self, image: np.ndarray, source: str) -> torch.Tensor:
        """(H, W[, 3]) native image -> (C, S, S) float16 in [0, 1] (C = 1 for grayscale)."""
        gray = image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1)
        return self.pre.scaled(image, source, expand=not gray).to(torch.float16)

    def _item(self, row: int) -> torch.Tensor:
        i = int(self.indices[row])
        image = self.dataset.load_image(i)
        src = self.dataset.records[i].image_path or self.dataset.records[i].key
        if not self.volumetric:
            return self._prepare(image, src)
        if image.ndim not in (3, 4) or image.shape[0] < 1:
            raise DataError(f"{src}: expected a volume (D, H, W), got shape {image.shape}")
        return torch.stack([self._prepare(image[z], f"{src}[slice {z}]") for z in range(image.shape[0])])

    def _load(self, rows: np.ndarray, stack: bool) -> torch.Tensor | list[torch.Tensor]:
        items = [self._item(int(r)) for r in rows]
        if not stack:
            return items
        if len({t.shape[0] for t in items}) > 1:  # grayscale and RGB images mixed: give all three channels
            items = [t.expand(3, -1, -1) for t in items]
        return torch.stack(items)

    def _rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._cache is not None:
            items = self._cache[torch.from_numpy(rows)] if not self.volumetric else [self._cache[r] for r in rows]
        else:
            items = self._load(rows, stack=not self.volumetric)
        if not self.volumetric:
            return items, None
        channels = max(t.shape[1] for t in items)
        x = torch.cat([t.expand(-1, channels, -1, -1) for t in items])
        owners = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([t.shape[0] for t in items]))
        return x, owners

    def _finish(self, x: torch.Tensor, owners: torch.Tensor | None, rows: np.ndarray, device: torch.device,
                augment: Augmenter | None, generator: torch.Generator | None) -> Batch:
        x = x.to(device).float()
        if augment is not None and generator is not None:
            x = augment(x, generator, groups=owners)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return super()._finish(self._normalize(x), owners, rows, device, None, None)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's normalisation (as :meth:`Preprocessor.normalize`) on ``x``'s device."""
        spec = self.pre.spec
        lo, span = spec.input_range[0], spec.input_range[1] - spec.input_range[0]
        mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
        return ((x * span + lo) - mean) / std


class EmbeddingSource(Source):
    """Cached per-slice embeddings of one split grouped into volumes (for frozen 3D probes)."""

    def __init__(self, x: np.ndarray, owner: np.ndarray, labels: np.ndarray, task: str) -> None:
        self.x = torch.from_numpy(np.array(x, dtype=np.float32, copy=True))
        owner = np.asarray(owner, dtype=np.int64)
        self.labels, self.task = np.asarray(labels), task
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=len(self.labels))
        if (counts == 0).any():
            raise DataError(f"volume(s) {np.flatnonzero(counts == 0)[:5].tolist()} have no slice embeddings")
        self._order = order
        self._start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._count = counts

    def _rows(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        picks = [self._order[self._start[r]:self._start[r] + self._count[r]] for r in rows]
        idx = torch.from_numpy(np.concatenate(picks))
        owners = torch.repeat_interleave(torch.arange(len(rows)), torch.from_numpy(self._count[rows]))
        return self.x[idx], owners
