"""ISIC 2019 Skin Lesion Analysis Towards Melanoma Detection (training set): 25,331
dermoscopic images (HAM10000, BCN_20000, MSK) in 8 diagnostic categories.

Task: multiclass, 8 classes (the ground-truth columns): MEL melanoma, NV melanocytic
nevus, BCC basal cell carcinoma, AK actinic keratosis, BKL benign keratosis, DF
dermatofibroma, VASC vascular lesion, SCC squamous cell carcinoma. The UNK column
(unknown, for the challenge test set) must be 0 in the training file.
Modality: dermoscopy, RGB JPEG of varying size (value_range (0, 255)).
Official split: none with public labels here (the challenge test set is not read).
Licence: CC BY-NC 4.0 (ISIC Archive; cite the HAM10000, BCN_20000 and MSK sources).
Obtain: https://challenge.isic-archive.com/data/#2019

Layout (root = the downloaded folder):
  ISIC_2019_Training_GroundTruth.csv  columns image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC,
                                      UNK; one-hot values 1.0 / 0.0 (exactly one 1 per row)
  ISIC_2019_Training_Metadata.csv     columns image, age_approx, anatom_site_general,
                                      lesion_id, sex (optional)
  ISIC_2019_Training_Input/<image>.jpg  (found anywhere under root; some names end in
                                        _downsampled, exactly as in the CSV)
Records: one per ground-truth row; key = image. Patient: ISIC 2019 has no patient ids;
images of one lesion (lesion_id, from the metadata file) are kept together, otherwise
each image is its own group (documented limitation: two lesions of one patient may be
split).
Metadata (from the metadata file): sex, age (age_approx, in 5-year steps), age_bin,
anatom_site, lesion_id.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, FileIndex, Presence, Problems, PublicDataset,
                                            assign_splits, details, finish, folder_root, parse_float, read_table,
                                            split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics

NAME = "isic2019"
CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
GT = "ISIC_2019_Training_GroundTruth.csv"
META = "ISIC_2019_Training_Metadata.csv"


@register_adapter(NAME, "ISIC 2019: dermoscopic images, 8 diagnostic classes (ground-truth CSV)",
                  details(__doc__, official=False))
def build_isic2019(root: Path | None, split: str = "systematic", split_seed: int = 0,
                   split_fractions: Any = DEFAULT_FRACTIONS, missing: str = "error") -> ImageDataset:
    """Build ISIC 2019 from the folder ``root`` holding the ground-truth CSV."""
    folder = folder_root(NAME, root, f"the ISIC 2019 folder holding {GT}")
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    gt = read_table(folder / GT, ("image",) + CLASSES + ("UNK",), problems,
                    what="the ISIC 2019 ground truth (image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK)")
    files = [gt.path]
    meta_rows: dict[str, dict[str, str]] = {}
    if (folder / META).is_file():
        mt = read_table(folder / META, ("image",), problems, what="the ISIC 2019 metadata file",
                        optional=("age_approx", "anatom_site_general", "lesion_id", "sex"))
        files.append(mt.path)
        meta_rows = {r["image"]: r.cells for r in mt.rows}
    index = FileIndex(folder, (".jpg", ".jpeg", ".png"))
    drafts, where = [], []
    seen: dict[str, int] = {}
    for row in gt.rows:
        at = gt.where(row)
        image = row["image"]
        if not image:
            problems.add(f"{at}: empty image")
            continue
        values = [parse_float(row[c]) for c in CLASSES + ("UNK",)]
        if any(v not in (0.0, 1.0) for v in values):
            bad = [f"{c}={row[c]!r}" for c, v in zip(CLASSES + ("UNK",), values) if v not in (0.0, 1.0)]
            problems.add(f"{at}: {', '.join(bad)}; expected one-hot values 1.0 / 0.0")
            continue
        if values[-1] == 1.0 or sum(values) != 1.0:
            problems.add(f"{at}: {int(sum(values))} classes set{' (UNK=1)' if values[-1] else ''}; expected exactly "
                         f"one of {', '.join(CLASSES)} to be 1.0 (UNK is for the test set only)")
            continue
        if image in seen:
            problems.add(f"{at}: image {image} is already listed in row {seen[image]}")
            continue
        seen[image] = row.number
        path = index.get(f"{image}.jpg") or index.get(f"{image}.jpeg") or index.get(f"{image}.png")
        if not presence.ok(path, at, f"{image}.jpg"):
            continue
        m = meta_rows.get(image, {})
        meta = demographics(sex=m.get("sex"), age=m.get("age_approx") or None) if meta_rows else {}
        if meta_rows:
            meta["anatom_site"] = m.get("anatom_site_general") or None
            meta["lesion_id"] = m.get("lesion_id") or None
        group = m.get("lesion_id") or image
        drafts.append(Record(image, "", group, values.index(1.0), meta, str(path)))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    ds = PublicDataset(NAME, folder, records, TaskSpec("multiclass", CLASSES), where=where, policy=policy,
                       annotation_files=files, value_range=(0.0, 255.0), notes=[presence.note()])
    return finish(ds, problems)
