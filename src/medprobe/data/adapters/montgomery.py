"""Montgomery County chest X-ray set (Jaeger et al., QIMS 2014; U.S. National Library of
Medicine): 138 posterior-anterior chest X-rays (80 normal, 58 tuberculosis) from the
Montgomery County TB programme, with manual left and right lung masks.

Task: task=segmentation (default): masks=lungs -> classes background, lungs (both
lungs, union of the two masks); masks=left_right -> background, left_lung, right_lung
(as named by the ManualMask folders). task=classification: binary normal /
tuberculosis from the file name suffix (_0 normal, _1 TB).
Modality: chest X-ray, grayscale PNG (about 4020 x 4892; higher bit depth than 8, so
value_range is None: images are scaled by percentiles).
Official split: none.
Licence: public, free for research with citation (NLM Open-i / LHNCBC release).
Obtain: https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets
(NLM-MontgomeryCXRSet.zip).

Layout (root = the MontgomerySet folder):
  CXR_png/MCUCXR_0001_0.png ...           images, MCUCXR_<number>_<0|1>.png
  ManualMask/leftMask/MCUCXR_0001_0.png   left-lung mask (0 / 255), same name
  ManualMask/rightMask/MCUCXR_0001_0.png  right-lung mask
  ClinicalReadings/MCUCXR_0001_0.txt      "Patient's Sex: F", "Patient's Age: 027Y",
                                          then the finding (optional; read for metadata)
Records: one per image; key = the file stem; patient = MCUCXR_<number> (one image per
patient in this set).
Metadata: sex, age, age_bin, view ("PA"), site ("Montgomery County, MD").
labels = native (only); labels=harmonised is refused: tuberculosis is not one of the 18
harmonised chest findings (see medprobe.data.harmonise).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Presence, Problems, PublicDataset, assign_splits,
                                            details, finish, folder_root, natural_key, split_policy)
from medprobe.data import harmonise
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics, parse_age
from medprobe.data.readers import read_mask
from medprobe.errors import DataError
from medprobe.options import option

NAME = "montgomery"
TB_CLASSES = ("normal", "tuberculosis")


def tb_images(folder: Path, prefix: str, problems: Problems) -> list[tuple[Path, str, int]]:
    """(path, patient, TB label) of the ``<prefix>_<number>_<0|1>.png`` files in ``folder``."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; expected the images {prefix}_0001_0.png ... in it")
    out = []
    for p in sorted(folder.iterdir(), key=lambda x: natural_key(x.name)):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() != ".png":
            continue
        m = re.fullmatch(rf"({re.escape(prefix)}_\d+)_([01])", p.stem)
        if not m:
            problems.add(f"{p}: unexpected file name; expected {prefix}_<number>_<0|1>.png "
                         f"(0 normal, 1 tuberculosis)")
            continue
        out.append((p, m.group(1), int(m.group(2))))
    if not out and not len(problems):
        raise DataError(f"{folder}: no {prefix}_<number>_<0|1>.png images found")
    return out


def read_reading(path: Path) -> tuple[str | None, float | None]:
    """(sex, age) from an NLM ClinicalReadings text file; (None, None) when absent/unparsed.

    Montgomery: "Patient's Sex: F" / "Patient's Age: 027Y". Shenzhen: a first line such
    as "male 45yrs", "female 64days", "male 16month" (also the typo "femal").
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    sex = re.search(r"Patient's Sex:\s*([A-Za-z]+)", text)
    age = re.search(r"Patient's Age:\s*([0-9]+\s*[A-Za-z]*)", text)
    if sex or age:
        return (sex.group(1) if sex else None), (parse_age(age.group(1)) if age else None)
    m = re.search(r"\b(female|femal|male)\b[\s,]*(\d+\s*[a-z]*)?", text, flags=re.IGNORECASE)
    if not m:
        return None, None
    return m.group(1), (parse_age(m.group(2)) if m.group(2) else None)


class MontgomeryDataset(PublicDataset):
    """Masks are the union (or left=1 / right=2) of the two ManualMask files."""

    def __init__(self, *args: Any, mask_files: list[tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mask_files = mask_files

    def read_mask(self, index: int) -> np.ndarray:
        left_path, right_path = self.mask_files[index]
        left, right = read_mask(left_path) > 0, read_mask(right_path) > 0
        if left.shape != right.shape:
            raise DataError(f"{right_path}: mask shape {right.shape} differs from {left_path} {left.shape}")
        out = np.zeros(left.shape, dtype=np.int64)
        if self.task.num_classes == 2:
            out[left | right] = 1
        else:
            out[left] = 1
            out[right] = 2
        return out


@register_adapter(NAME, "Montgomery County chest X-rays: lung segmentation (left/right masks) or TB classification",
                  details(__doc__, official=False))
def build_montgomery(root: Path | None, task: str = "segmentation", masks: str = "lungs", split: str = "systematic",
                     split_seed: int = 0, split_fractions: Any = DEFAULT_FRACTIONS,
                     missing: str = "error", labels: str = "native") -> ImageDataset:
    """Build the Montgomery County set from the MontgomerySet folder ``root``."""
    harmonise.refuse_tuberculosis(labels, NAME)
    folder = folder_root(NAME, root, "the MontgomerySet folder holding CXR_png/ and ManualMask/")
    task = option("task", task, str, choices=("segmentation", "classification"))
    masks = option("masks", masks, str, choices=("lungs", "left_right"))
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    drafts, where, mask_files = [], [], []
    for path, patient, tb in tb_images(folder / "CXR_png", "MCUCXR", problems):
        at = str(path)
        if task == "segmentation":
            left = folder / "ManualMask" / "leftMask" / path.name
            right = folder / "ManualMask" / "rightMask" / path.name
            if not (presence.ok(left, at, left.name, "left-lung mask")
                    and presence.ok(right, at, right.name, "right-lung mask")):
                continue
            mask_files.append((str(left), str(right)))
        sex, age = read_reading(folder / "ClinicalReadings" / f"{path.stem}.txt")
        meta = demographics(sex=sex, age=age, view="PA", site="Montgomery County, MD")
        meta["tuberculosis"] = tb
        drafts.append(Record(path.stem, "", patient, tb if task == "classification" else None, meta, str(path),
                             mask_files[-1][0] if task == "segmentation" else None))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    spec = TaskSpec("binary", TB_CLASSES) if task == "classification" else \
        TaskSpec("segmentation", ("background", "lungs") if masks == "lungs" else
                 ("background", "left_lung", "right_lung"))
    ds = MontgomeryDataset(NAME, folder, records, spec, where=where, policy=policy,
                           notes=[f"task={task}", f"masks={masks}" if task == "segmentation" else "",
                                  presence.note()],
                           mask_files=mask_files if task == "segmentation" else [("", "")] * len(records))
    return finish(ds, problems)
