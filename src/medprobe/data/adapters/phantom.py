"""The ``phantom`` adapter: deterministic synthetic chest radiographs or CT-like volumes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.base import ArrayDataset, ImageDataset, Record, TaskSpec
from medprobe.data.metadata import age_bin
from medprobe.data.phantom import CHEST_FINDINGS, make_chest_phantoms, make_volume_phantoms, volume_metadata
from medprobe.data.phantom_reports import chest_phantoms_with_reports
from medprobe.data.splits import patient_split
from medprobe.errors import ConfigError
from medprobe.options import option

DETAILS = """\
Synthetic data generated in memory (no download; root is ignored): the offline
demo dataset and a test fixture. Deterministic for a given seed.
ndim=2: chest-radiograph-like images (body, two lung fields, heart, spine, ribs,
smooth and fine noise, intensity jitter). task=binary: label 1 = a bright nodule
inside a lung (size and contrast vary: learnable, not trivial); with
finding=consolidation, a large opacity instead (visible even to a random-init
network; the demo's task).
task=segmentation: masks 0 background, 1 lungs, 2 heart.
ndim=3: CT/MRI-like volumes (depth = size // 2) with organ A (large ellipsoid)
and organ B (small, bright). task=binary: label 1 = a dark lesion in organ A.
task=segmentation: masks 0 background, 1 organ A, 2 organ B.
Splits: patient-level, stratified on the label, about 60/20/20 train/val/test.
About a fifth of the images are second images of the previous patient (same
anatomy, sex and age), so patient-level splitting matters. Metadata: sex (M/F),
age (1-95), age_bin (as the real adapters), view (PA/AP; "axial" for volumes). Intensities lie in [0, 1]
(value_range = (0, 1)).
task=multiclass: C classes (class_names, default 3) from image-visible factors
(code = lesion + 2 view (2D) / bright volume (3D) + 4 sex; classes merge codes when
C < 8; beyond 8 the extra classes are drawn at random, i.e. not learnable).
task=multilabel: C labels (default 3): lesion, AP view (2D) / bright volume (3D),
male; further labels random with probability 0.3 (not learnable). `medprobe run
--stand-in phantom` replaces real datasets by these.
Options: n (images, default 240), size (pixels, default 64, >= 16), seed (0),
task (binary | multiclass | multilabel | segmentation), ndim (2 | 3), class_names
(multiclass/multilabel: a list of names or a number of classes), finding
(nodule | consolidation; ndim=2), reports (false; ndim=2 only: also draw
support devices, a central line and ECG leads, and give every image a templated
findings report describing what was drawn: devices, the opacity's side, zone and
size, heart size; used by the report_generation protocol).
Licence: generated data, no restrictions."""


def _record_metadata(m: dict[str, Any]) -> dict[str, Any]:
    """A record's metadata: the phantom's sex, age and view, and age_bin from age (as the real adapters)."""
    out = {k: v for k, v in m.items() if k != "patient_id"}
    if "age" in out:
        out["age_bin"] = age_bin(out["age"])
    return out


@register_adapter("phantom", "Synthetic chest X-rays (2D) or CT-like volumes (3D); offline demo data", DETAILS)
def build_phantom(root: Path | None = None, n: int = 240, size: int = 64, seed: int = 0, task: str = "binary",
                  ndim: int = 2, reports: bool = False, class_names: Any = None, finding: str = "nodule"
                  ) -> ImageDataset:
    """Build the phantom dataset (``root`` is ignored)."""
    n = option("n", n, int, minimum=1)
    size = option("size", size, int, minimum=16)
    seed = option("seed", seed, int, minimum=0)
    ndim = option("ndim", ndim, int, choices=(2, 3))
    task = option("task", task, str, choices=("binary", "multiclass", "multilabel", "segmentation"))
    names = _class_names(task, class_names)
    finding = option("finding", finding, str, choices=tuple(CHEST_FINDINGS))
    if finding != "nodule" and (ndim != 2 or reports):
        raise ConfigError(f"option finding={finding} applies to the 2D chest phantoms without reports (ndim=2)")
    repeat = 0.25
    texts: list[str | None] = [None] * n
    if reports is not False and reports is not True:
        raise ConfigError(f"option reports must be true or false, got {reports!r}")
    if reports and ndim != 2:
        raise ConfigError("option reports: findings reports exist for the 2D chest phantoms only (ndim=2)")
    if reports:
        images, labels, masks, meta, texts = chest_phantoms_with_reports(n, size, seed, repeat_fraction=repeat)
    elif ndim == 2:
        images, labels, masks, meta = make_chest_phantoms(n, size=size, seed=seed, repeat_fraction=repeat,
                                                          finding=finding)
        seg_names = ("background", "lungs", "heart")
    else:
        images, labels, masks = make_volume_phantoms(n, size=size, depth=max(4, size // 2), seed=seed,
                                                     repeat_fraction=repeat)
        meta = volume_metadata(n, seed, repeat_fraction=repeat)
        seg_names = ("background", "organ_a", "organ_b")
    draft = [Record(f"phantom_{i:05d}", "", m["patient_id"], int(labels[i])) for i, m in enumerate(meta)]
    split = patient_split(draft, (0.6, 0.2, 0.2), seed=seed, method="stratified")
    seg = task == "segmentation"
    targets: list[Any] = [r.label for r in draft]
    if task in ("multiclass", "multilabel"):
        targets = _derived_labels(task, len(names), labels, meta, images, seed)
    records = [Record(r.key, split[r.key], r.patient_id, None if seg else y, _record_metadata(m), report=t)
               for r, m, t, y in zip(draft, meta, texts, targets)]
    positive = finding if ndim == 2 else "lesion"
    spec = TaskSpec("segmentation", seg_names) if seg else \
        TaskSpec(task, names) if names else TaskSpec("binary", ("normal", positive))
    ds = ArrayDataset(images, records, spec, masks=masks if seg else None, name="phantom", ndim=ndim,
                      source=f"phantom(n={n},size={size},seed={seed},task={task},ndim={ndim}"
                             f"{',reports' if reports else ''}{f',classes={list(names)}' if names else ''}"
                             f"{f',finding={finding}' if finding != 'nodule' else ''})")
    ds.value_range = (0.0, 1.0)  # type: ignore[attr-defined]
    return ds


def _class_names(task: str, value: Any) -> tuple[str, ...]:
    """The class names of a multiclass/multilabel phantom (``value``: names, a count or None = 3)."""
    if task not in ("multiclass", "multilabel"):
        if value is not None:
            raise ConfigError(f"option class_names applies to task=multiclass or multilabel, not task={task}")
        return ()
    if value is None:
        value = 3
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 2:
            raise ConfigError(f"option class_names: a phantom needs at least 2 classes, got {value}")
        return tuple(f"class_{i}" for i in range(value))
    if isinstance(value, (list, tuple)) and len(value) >= 2 and all(isinstance(v, str) and v for v in value) \
            and len(set(value)) == len(value):
        return tuple(value)
    raise ConfigError(f"option class_names: expected a number >= 2 or a list of >= 2 distinct names, got {value!r}")


def _derived_labels(task: str, c: int, lesion: np.ndarray, meta: list[dict[str, Any]], images: np.ndarray,
                    seed: int) -> list[Any]:
    """Multiclass codes or multi-hot rows from image-visible factors (then random ones; see DETAILS)."""
    n = len(lesion)
    if meta[0]["view"] == "axial":  # volumes: the second factor is the brightness of the volume (organ sizes)
        mean = images.reshape(n, -1).mean(axis=1)
        second = mean > np.median(mean)
    else:
        second = np.array([m["view"] == "AP" for m in meta])
    male = np.array([m["sex"] == "M" for m in meta])
    rng = np.random.default_rng([seed, 303])
    if task == "multiclass":
        code = lesion.astype(int) + 2 * second + 4 * male
        out = code * min(c, 8) // 8
        if c > 8:
            extra = rng.random(n) < (c - 8) / c
            out = np.where(extra, 8 + rng.integers(0, c - 8, n), out)
        return [int(v) for v in out]
    y = np.zeros((n, c), dtype=int)
    for j, col in enumerate((lesion.astype(bool), second, male)[:c]):
        y[:, j] = col
    if c > 3:
        y[:, 3:] = rng.random((n, c - 3)) < 0.3
    return [tuple(int(v) for v in row) for row in y]
