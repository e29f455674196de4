"""Shenzhen chest X-ray set (Jaeger et al., QIMS 2014; Shenzhen No.3 People's Hospital with
the U.S. National Library of Medicine): 662 frontal chest X-rays (326 normal, 336
tuberculosis), plus lung masks released separately for 566 of them (Stirenko et al. 2018).

Task: task=classification (default): binary normal / tuberculosis from the file name
suffix (_0 normal, _1 TB). task=segmentation: classes background, lungs, only for the
images that have a mask (the others are left out; their number is recorded in
dataset.source).
Modality: chest X-ray, PNG (about 3000 x 3000; value_range None: scaled by percentiles).
Official split: none.
Licence: public, free for research with citation (NLM LHNCBC release); the masks are
from the Kaggle "Chest Xray Masks and Labels" set (see its page for terms).
Obtain: https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets
(ChinaSet_AllFiles.zip); masks: kaggle.com/datasets/nikhilpandey360/chest-xray-masks-and-labels.

Layout (root = the ChinaSet_AllFiles folder):
  CXR_png/CHNCXR_0001_0.png ...        images, CHNCXR_<number>_<0|1>.png
  ClinicalReadings/CHNCXR_0001_0.txt   first line like "male 45yrs" or "female 64days"
                                       (optional; read for metadata)
  mask/CHNCXR_0001_0_mask.png          lung masks (0 / 255) as in the Kaggle release; the
                                       folder may also be masks/, or given by mask_dir=
                                       (absolute, or relative to root); names with or
                                       without the _mask suffix are accepted.
Records: one per image; key = the file stem; patient = CHNCXR_<number> (one image per
patient in this set).
Metadata: sex, age, age_bin, view ("PA"), site ("Shenzhen, China").
Uncertain: the mask release is not part of the NLM archive; its folder name differs
between copies, hence mask_dir.
labels = native (only); labels=harmonised is refused: tuberculosis is not one of the 18
harmonised chest findings (see medprobe.data.harmonise).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Problems, PublicDataset, assign_splits,
                                            details, finish, folder_root, split_policy)
from medprobe.data.adapters.montgomery import TB_CLASSES, read_reading, tb_images
from medprobe.data import harmonise
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.errors import DataError
from medprobe.options import option

NAME = "shenzhen"
MASK_DIRS = ("mask", "masks")


class ShenzhenDataset(PublicDataset):
    """Lung masks stored as 0/255 PNGs become 0/1 label maps."""

    def read_mask(self, index: int) -> np.ndarray:
        return (super().read_mask(index) > 0).astype(np.int64)


@register_adapter(NAME, "Shenzhen chest X-rays: TB classification, or lung segmentation with the released masks",
                  details(__doc__, official=False))
def build_shenzhen(root: Path | None, task: str = "classification", mask_dir: str | None = None,
                   split: str = "systematic", split_seed: int = 0, split_fractions: Any = DEFAULT_FRACTIONS,
                   labels: str = "native") -> ImageDataset:
    """Build the Shenzhen set from the ChinaSet_AllFiles folder ``root``."""
    harmonise.refuse_tuberculosis(labels, NAME)
    folder = folder_root(NAME, root, "the ChinaSet_AllFiles folder holding CXR_png/")
    task = option("task", task, str, choices=("classification", "segmentation"))
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    masks_at: Path | None = None
    if task == "segmentation":
        candidates = [Path(mask_dir) if Path(mask_dir).is_absolute() else folder / mask_dir] if mask_dir \
            else [folder / d for d in MASK_DIRS]
        masks_at = next((c for c in candidates if c.is_dir()), None)
        if masks_at is None:
            raise DataError(f"{folder}: no lung mask folder found (looked for {', '.join(map(str, candidates))}); "
                            f"task=segmentation needs the Shenzhen lung masks (CHNCXR_0001_0_mask.png ...); "
                            f"pass mask_dir=... or use task=classification")
    drafts, where = [], []
    without_mask = 0
    for path, patient, tb in tb_images(folder / "CXR_png", "CHNCXR", problems):
        at = str(path)
        mask = None
        if masks_at is not None:
            mask = next((m for m in (masks_at / f"{path.stem}_mask.png", masks_at / path.name) if m.is_file()), None)
            if mask is None:
                without_mask += 1
                continue
        sex, age = read_reading(folder / "ClinicalReadings" / f"{path.stem}.txt")
        meta = demographics(sex=sex, age=age, view="PA", site="Shenzhen, China")
        meta["tuberculosis"] = tb
        drafts.append(Record(path.stem, "", patient, tb if task == "classification" else None, meta, str(path),
                             str(mask) if mask else None))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    spec = TaskSpec("binary", TB_CLASSES) if task == "classification" else TaskSpec("segmentation",
                                                                                 ("background", "lungs"))
    ds = ShenzhenDataset(NAME, folder, records, spec, where=where, policy=policy,
                         notes=[f"task={task}", f"no_mask={without_mask}" if task == "segmentation" else ""])
    return finish(ds, problems)
