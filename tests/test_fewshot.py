"""Few-shot sampling by patient."""
from __future__ import annotations

import numpy as np
import pytest

from medprobe.errors import ConfigError
from medprobe.protocols.fewshot import sample_fewshot


def patients_of(idx, pids):
    return {pids[i] for i in idx}


def test_one_image_per_patient_gives_shots_images_per_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 90)
    pids = [f"p{i}" for i in range(90)]
    idx = sample_fewshot(labels, pids, 4, seed=0, task="multiclass")
    assert np.array_equal(idx, np.sort(idx)) and len(set(idx)) == len(idx)
    assert np.bincount(labels[idx], minlength=3).tolist() == [4, 4, 4]


def test_all_images_of_a_drawn_patient_are_included():
    # 30 patients with 1-4 images each, one label per patient
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 5, 30)
    pids = [f"pat{p:02d}" for p, n in enumerate(counts) for _ in range(n)]
    patient_label = np.arange(30) % 2
    labels = np.array([patient_label[int(p[3:])] for p in pids])
    idx = sample_fewshot(labels, pids, 3, seed=7, task="binary")
    chosen = patients_of(idx, pids)
    assert len(chosen) == 6
    assert sorted(patient_label[int(p[3:])] for p in chosen) == [0, 0, 0, 1, 1, 1]
    assert sorted(idx.tolist()) == [i for i, p in enumerate(pids) if p in chosen]  # every image of each patient


def test_patient_with_images_of_two_classes_counts_for_both():
    # patient "a" has a class-0 and a class-1 image; all other patients one class only
    pids = ["a", "a", "b", "c", "d", "e"]
    labels = np.array([0, 1, 0, 0, 1, 1])
    draws = [patients_of(sample_fewshot(labels, pids, 1, seed=s, task="binary"), pids) for s in range(20)]
    for chosen in draws:
        # class 0 draws one patient; class 1 draws one only if that patient is not "a" (which counts for both)
        assert len(chosen & {"a", "b", "c"}) >= 1 and len(chosen & {"a", "d", "e"}) >= 1
        assert len(chosen) == (1 if chosen == {"a"} else 2)
    assert {"a"} in draws and any(len(d) == 2 for d in draws)


def test_fewer_eligible_patients_than_shots_takes_all():
    labels = np.array([0] * 10 + [1] * 2)
    pids = [str(i) for i in range(12)]
    idx = sample_fewshot(labels, pids, 5, seed=0, task="binary")
    assert np.bincount(labels[idx]).tolist() == [5, 2]


def test_deterministic_and_seed_dependent():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    pids = [f"p{i // 2}" for i in range(200)]
    a = sample_fewshot(labels, pids, 4, seed=3, task="binary")
    assert np.array_equal(a, sample_fewshot(labels, pids, 4, seed=3, task="binary"))
    assert not np.array_equal(a, sample_fewshot(labels, pids, 4, seed=4, task="binary"))
    # the draw depends on the data, not on the order the rows come in
    order = rng.permutation(200)
    b = sample_fewshot(labels[order], [pids[i] for i in order], 4, seed=3, task="binary")
    assert patients_of(order[b], pids) == patients_of(a, pids)


def test_multilabel_positives_per_class_and_negatives():
    rng = np.random.default_rng(3)
    y = (rng.random((120, 3)) < [0.3, 0.2, 0.1]).astype(int)
    y[100:] = 0  # plenty of all-negative patients
    pids = [f"p{i}" for i in range(120)]
    idx = sample_fewshot(y, pids, 2, seed=0, task="multilabel")
    positives = y[idx].sum(0)
    assert (positives >= 2).all()
    negatives = int((y[idx].sum(1) == 0).sum())
    assert negatives == 2
    assert len(idx) <= 3 * 2 + 2


def test_multilabel_patient_counts_for_every_positive_class():
    y = np.array([[1, 1]] * 5 + [[0, 0]] * 5)
    pids = [str(i) for i in range(10)]
    for seed in range(5):
        idx = sample_fewshot(y, pids, 1, seed=seed, task="multilabel")
        assert len(idx) == 2 and y[idx].sum(0).tolist() == [1, 1]  # one [1, 1] patient + one negative


def test_multilabel_without_negative_patients():
    y = np.array([[1, 0], [0, 1], [1, 1], [1, 0]])
    idx = sample_fewshot(y, ["a", "b", "c", "d"], 1, seed=0, task="multilabel")
    assert (y[idx].sum(0) >= 1).all() and (y[idx].sum(1) > 0).all()


def test_errors():
    labels = np.array([0, 1, 1])
    with pytest.raises(ConfigError, match="shots must be >= 1.*got 0"):
        sample_fewshot(labels, ["a", "b", "c"], 0, seed=0, task="binary")
    with pytest.raises(ConfigError, match="3 labels but 2 patient ids"):
        sample_fewshot(labels, ["a", "b"], 1, seed=0, task="binary")
    with pytest.raises(ConfigError, match="'segmentation'.*multilabel"):
        sample_fewshot(labels, ["a", "b", "c"], 1, seed=0, task="segmentation")
    with pytest.raises(ConfigError, match=r"\(N, C\)"):
        sample_fewshot(labels, ["a", "b", "c"], 1, seed=0, task="multilabel")
