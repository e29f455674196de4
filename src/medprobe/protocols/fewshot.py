"""Few-shot training subsets drawn by patient: n patients per class, all of their images."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medprobe.errors import ConfigError
from medprobe.options import option

TASKS = ("binary", "multiclass", "multilabel")


def sample_fewshot(labels: np.ndarray, patient_ids: Sequence[str], shots: int, seed: int, task: str) -> np.ndarray:
    """Indices (sorted) of the training images of ``shots`` patients per class.

    A patient is eligible for a class when any of its images has that label, and once drawn
    all of its images are used (with one image per patient this is ``shots`` images per class).
    Classes are visited in index order with one ``numpy.random.default_rng(seed)``; a patient
    already drawn counts for every class it is eligible for, so a class only draws the
    shortfall ``shots - (already drawn patients eligible for it)`` from its not-yet-drawn
    patients. Every class thus has at least ``shots`` patients (more when a patient drawn for a
    later class is eligible for it too). A class with fewer eligible patients than ``shots``
    takes all of them (no error).

    ``labels``: binary/multiclass (N,) class indices; multilabel (N, C) 0/1 (-1 = missing), where after the
    per-class draws ``shots`` further patients with no positive label at all are added when
    there are such patients (as many as exist, up to ``shots``). Patients are handled in
    sorted id order, so the draw depends only on the data and ``seed``.
    """
    option("task", task, str, choices=TASKS, what="task")
    if shots < 1:
        raise ConfigError(f"shots must be >= 1 patients per class, got {shots}")
    y = np.asarray(labels)
    if len(patient_ids) != y.shape[0]:
        raise ConfigError(f"{y.shape[0]} labels but {len(patient_ids)} patient ids; they must match one to one")
    if (task == "multilabel") != (y.ndim == 2) or y.ndim not in (1, 2):
        raise ConfigError(f"{task} labels must be {'(N, C) 0/1' if task == 'multilabel' else '(N,) class indices'}, "
                          f"got shape {y.shape}")
    if y.size and y.min() < (-1 if task == "multilabel" else 0):
        raise ConfigError(f"labels must be non-negative{' (or -1 = missing)' if task == 'multilabel' else ''}, "
                          f"got {int(y.min())}")
    patients, owner = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
    if task == "multilabel":
        onehot = y == 1  # a missing target (-1) makes no patient eligible
    else:
        onehot = np.zeros((y.shape[0], int(y.max()) + 1 if y.size else 0), dtype=bool)
        onehot[np.arange(y.shape[0]), y.astype(np.int64)] = True
    eligible = np.zeros((len(patients), onehot.shape[1]), dtype=bool)  # patient x class
    np.logical_or.at(eligible, owner, onehot)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(patients), dtype=bool)
    for c in range(eligible.shape[1]):
        need = shots - int((chosen & eligible[:, c]).sum())
        pool = np.flatnonzero(eligible[:, c] & ~chosen)
        if need > 0 and len(pool):
            chosen[rng.choice(pool, size=min(need, len(pool)), replace=False)] = True
    if task == "multilabel":  # patients with no positive, known to be negative somewhere (not all missing)
        negative = np.zeros(len(patients), dtype=bool)
        np.logical_or.at(negative, owner, (y == 0).any(1))
        pool = np.flatnonzero(~eligible.any(1) & negative)
        if len(pool):
            chosen[rng.choice(pool, size=min(shots, len(pool)), replace=False)] = True
    return np.flatnonzero(chosen[owner])
