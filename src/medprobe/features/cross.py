"""Cross-dataset evaluation on cached features: train on one dataset, test on another.

A :class:`CrossStore` reads like a feature store (the part of the API the frozen protocols
use): its ``train`` and ``val`` splits are the training dataset's, its ``test`` split is the
*evaluation rows* of the other dataset, extracted with the same backbone into that dataset's
own store. Evaluation rows (:func:`evaluation_splits`): the other dataset's ``test`` split
when it has a non-empty one, else all of its splits (a dataset without a test split is
external data used whole).

Labels are put onto the training dataset's classes (:func:`align_labels`): binary and
multiclass tasks must name the same classes in the same order; multi-label tasks are matched
by class name (use ``labels: harmonised`` on chest X-ray adapters to give them one
vocabulary), and a class the test dataset lacks, or one the training set never labels, is
missing (``-1``) in the test targets -- masked out of the metrics, never a negative.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medprobe.data.base import ImageDataset, TaskSpec
from medprobe.errors import ConfigError

CROSS_TASKS = ("binary", "multiclass", "multilabel")


def evaluation_splits(dataset: ImageDataset) -> list[str]:
    """The splits of ``dataset`` a model trained elsewhere is tested on: ``test`` if present, else all."""
    if "test" in dataset.splits() and len(dataset.indices("test")):
        return ["test"]
    return dataset.splits()


def check_compatible(train: TaskSpec, test: TaskSpec, where: str) -> None:
    """Refuse a pair of tasks a probe trained on ``train`` cannot be scored on (``where`` names the entry)."""
    if train.kind not in CROSS_TASKS or test.kind not in CROSS_TASKS:
        raise ConfigError(f"{where}: cross-dataset evaluation needs classification datasets, got {train.kind} "
                          f"and {test.kind}")
    if train.kind != test.kind:
        raise ConfigError(f"{where}: the task kinds differ ({train.kind} vs {test.kind}); give both datasets the same "
                          "task (chest X-ray adapters: labels: harmonised gives both the 18-finding multi-label task)")
    if train.kind != "multilabel" and tuple(train.class_names) != tuple(test.class_names):
        raise ConfigError(f"{where}: the classes differ ({list(train.class_names)} vs {list(test.class_names)}); "
                          f"a {train.kind} probe needs the same classes in the same order")
    if train.kind == "multilabel" and not set(train.class_names) & set(test.class_names):
        raise ConfigError(f"{where}: the two datasets share no class ({list(train.class_names)} vs "
                          f"{list(test.class_names)}); use labels: harmonised on chest X-ray adapters")


def align_labels(y: np.ndarray, task: str, source: Sequence[str], target: Sequence[str],
                 known: np.ndarray | None = None) -> np.ndarray:
    """Test labels ``y`` over ``source`` classes, put onto ``target`` classes.

    Multi-label: column ``target[i]`` is ``source``'s column of that name, or ``-1`` (missing) when
    ``source`` lacks it or ``known[i]`` is False (the training set never labels it). Binary and
    multiclass labels are returned as they are (their classes are checked to be identical).
    """
    if task != "multilabel":
        return np.asarray(y)
    y = np.asarray(y)
    out = np.full((y.shape[0], len(target)), -1, dtype=y.dtype if y.dtype.kind == "f" else np.float32)
    index = {c: j for j, c in enumerate(source)}
    for i, c in enumerate(target):
        if c in index and (known is None or known[i]):
            out[:, i] = y[:, index[c]]
    return out


class CrossStore:
    """Train/val of ``train_store`` and, as ``test``, the ``test_splits`` of ``test_store`` (labels aligned)."""

    def __init__(self, train_store: Any, test_store: Any, test_splits: Sequence[str]) -> None:
        for s in test_splits:
            if s not in test_store.splits:
                raise ConfigError(f"feature store {getattr(test_store, 'path', '')} has no split {s!r}")
        if bool(train_store.meta.get("volumetric")) != bool(test_store.meta.get("volumetric")):
            raise ConfigError("cross-dataset evaluation needs two 2D or two volumetric datasets")
        self.train, self.test, self.test_splits = train_store, test_store, list(test_splits)
        self.meta = {k: v for k, v in train_store.meta.items()}
        self.meta["test_on"] = {"store": str(getattr(test_store, "path", "")), "splits": self.test_splits}
        task, classes = train_store.meta["task"], list(train_store.meta["class_names"])
        known = None
        if task == "multilabel" and "train" in train_store.splits:
            known = (np.asarray(train_store.labels("train")) >= 0).any(0)
        self._test_labels = align_labels(
            np.concatenate([np.asarray(test_store.labels(s)) for s in self.test_splits]), task,
            list(test_store.meta["class_names"]), classes, known)

    @property
    def splits(self) -> list[str]:
        return [s for s in self.train.splits if s != "test"] + ["test"]

    @property
    def stored_blocks(self) -> list[int]:
        return self.train.stored_blocks

    def _cat(self, fn: str, *args: Any) -> list[Any]:
        return [getattr(self.test, fn)(s, *args) for s in self.test_splits]

    def labels(self, split: str) -> np.ndarray:
        return self._test_labels if split == "test" else self.train.labels(split)

    def keys(self, split: str) -> list[str]:
        return [k for part in self._cat("keys") for k in part] if split == "test" else self.train.keys(split)

    def patient_ids(self, split: str) -> list[str]:
        return [p for part in self._cat("patient_ids") for p in part] if split == "test" \
            else self.train.patient_ids(split)

    def metadata(self, split: str, column: str) -> list[Any]:
        return [v for part in self._cat("metadata", column) for v in part] if split == "test" \
            else self.train.metadata(split, column)

    def metadata_rows(self, split: str) -> list[dict[str, Any]]:
        """Per-row metadata dicts of ``split`` as the stores keep them (the test rows: the other dataset's)."""
        if split == "test":
            return [m for s in self.test_splits for m in self.test.split_info(s)["metadata"]]
        return list(self.train.split_info(split)["metadata"])

    def features(self, split: str, variant: str = "cls", last_blocks: int = 1, pooling: str = "mean") -> np.ndarray:
        if split != "test":
            return self.train.features(split, variant, last_blocks, pooling)
        parts = self._cat("features", variant, last_blocks, pooling)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
