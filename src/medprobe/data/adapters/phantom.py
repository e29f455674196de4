"""The ``phantom`` adapter: deterministic synthetic chest radiographs or CT-like volumes."""
from __future__ import annotations

from pathlib import Path

from medprobe.data.adapters import choice_option, int_option, register_adapter
from medprobe.data.base import ArrayDataset, ImageDataset, Record, TaskSpec
from medprobe.data.phantom import make_chest_phantoms, make_volume_phantoms, volume_metadata
from medprobe.data.splits import patient_split

DETAILS = """\
Synthetic data generated in memory (no download; root is ignored): the offline
demo dataset and a test fixture. Deterministic for a given seed.
ndim=2: chest-radiograph-like images (body, two lung fields, heart, spine, ribs,
smooth and fine noise, intensity jitter). task=binary: label 1 = a bright nodule
inside a lung (size and contrast vary: learnable, not trivial).
task=segmentation: masks 0 background, 1 lungs, 2 heart.
ndim=3: CT/MRI-like volumes (depth = size // 2) with organ A (large ellipsoid)
and organ B (small, bright). task=binary: label 1 = a dark lesion in organ A.
task=segmentation: masks 0 background, 1 organ A, 2 organ B.
Splits: patient-level, stratified on the label, about 60/20/20 train/val/test.
About a fifth of the images are second images of the previous patient (same
anatomy, sex and age), so patient-level splitting matters. Metadata: sex (M/F),
age (1-95), view (PA/AP; "axial" for volumes). Intensities lie in [0, 1]
(value_range = (0, 1)).
Options: n (images, default 240), size (pixels, default 64, >= 16), seed (0),
task (binary | segmentation), ndim (2 | 3).
Licence: generated data, no restrictions."""


@register_adapter("phantom", "Synthetic chest X-rays (2D) or CT-like volumes (3D); offline demo data", DETAILS)
def build_phantom(root: Path | None = None, n: int = 240, size: int = 64, seed: int = 0, task: str = "binary",
                  ndim: int = 2) -> ImageDataset:
    """Build the phantom dataset (``root`` is ignored)."""
    n = int_option("n", n, minimum=1)
    size = int_option("size", size, minimum=16)
    seed = int_option("seed", seed, minimum=0)
    ndim = int_option("ndim", ndim, choices=(2, 3))
    task = choice_option("task", task, ("binary", "segmentation"))
    repeat = 0.25
    if ndim == 2:
        images, labels, masks, meta = make_chest_phantoms(n, size=size, seed=seed, repeat_fraction=repeat)
        seg_names = ("background", "lungs", "heart")
    else:
        images, labels, masks = make_volume_phantoms(n, size=size, depth=max(4, size // 2), seed=seed,
                                                     repeat_fraction=repeat)
        meta = volume_metadata(n, seed, repeat_fraction=repeat)
        seg_names = ("background", "organ_a", "organ_b")
    draft = [Record(f"phantom_{i:05d}", "", m["patient_id"], int(labels[i])) for i, m in enumerate(meta)]
    split = patient_split(draft, (0.6, 0.2, 0.2), seed=seed, method="stratified")
    seg = task == "segmentation"
    records = [Record(r.key, split[r.key], r.patient_id, None if seg else r.label,
                      {k: v for k, v in m.items() if k != "patient_id"}) for r, m in zip(draft, meta)]
    positive = "nodule" if ndim == 2 else "lesion"
    spec = TaskSpec("segmentation", seg_names) if seg else TaskSpec("binary", ("normal", positive))
    ds = ArrayDataset(images, records, spec, masks=masks if seg else None, name="phantom", ndim=ndim,
                      source=f"phantom(n={n},size={size},seed={seed},task={task},ndim={ndim})")
    ds.value_range = (0.0, 1.0)  # type: ignore[attr-defined]
    return ds
