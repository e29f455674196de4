"""APTOS 2019 Blindness Detection (Asia Pacific Tele-Ophthalmology Society, Kaggle 2019):
3,662 labelled colour fundus photographs graded for diabetic retinopathy.

Task: multiclass, 5 ordinal grades: 0 No DR, 1 Mild, 2 Moderate, 3 Severe,
4 Proliferative DR. The challenge metric is the quadratic weighted kappa (medprobe's
"kappa" metric is quadratic-weighted); AUROC/accuracy are reported as well.
Modality: fundus photography, RGB PNG of varying size (value_range (0, 255)).
Official split: none with labels (test.csv has no diagnosis; not used).
Licence: Kaggle competition rules (APTOS 2019): non-commercial research use.
Obtain: kaggle.com/competitions/aptos2019-blindness-detection/data.

Layout (root = the downloaded folder):
  train.csv                   columns id_code, diagnosis (integer 0-4)
  train_images/<id_code>.png  (found anywhere under root)
Records: one per train.csv row; key and patient = id_code. The release has no patient
ids: both eyes of one person may be separate images, which a patient-level split
cannot keep together (scores may be slightly optimistic).
Metadata: none in the source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, FileIndex, Presence, Problems, PublicDataset,
                                            assign_splits, details, finish, folder_root, parse_int, read_table,
                                            split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec

NAME = "aptos2019"
GRADES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")


@register_adapter(NAME, "APTOS 2019: fundus photographs, diabetic retinopathy grade 0-4 (quadratic kappa)",
                  details(__doc__, official=False))
def build_aptos2019(root: Path | None, split: str = "systematic", split_seed: int = 0,
                    split_fractions: Any = DEFAULT_FRACTIONS, missing: str = "error") -> ImageDataset:
    """Build APTOS 2019 from the folder ``root`` holding train.csv and train_images/."""
    folder = folder_root(NAME, root, "the APTOS 2019 folder holding train.csv and train_images/")
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    table = read_table(folder / "train.csv", ("id_code", "diagnosis"), problems,
                       what="the APTOS label file train.csv (id_code, diagnosis)")
    index = FileIndex(folder, (".png", ".jpg", ".jpeg"))
    drafts, where = [], []
    seen: dict[str, int] = {}
    for row in table.rows:
        at = table.where(row)
        code, grade = row["id_code"], parse_int(row["diagnosis"])
        if not code:
            problems.add(f"{at}: empty id_code")
            continue
        if grade is None or not 0 <= grade < len(GRADES):
            problems.add(f"{at}: diagnosis {row['diagnosis']!r} outside 0..4; expected an integer grade 0 (No DR) to "
                         f"4 (Proliferative DR)")
            continue
        if code in seen:
            problems.add(f"{at}: id_code {code} is already listed in row {seen[code]}")
            continue
        seen[code] = row.number
        path = index.get(f"{code}.png") or index.get(f"{code}.jpg") or index.get(f"{code}.jpeg")
        if not presence.ok(path, at, f"{code}.png"):
            continue
        drafts.append(Record(code, "", code, grade, {}, str(path)))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    ds = PublicDataset(NAME, folder, records, TaskSpec("multiclass", GRADES), where=where, policy=policy,
                       annotation_files=[table.path], value_range=(0.0, 255.0), notes=[presence.note()])
    return finish(ds, problems)
