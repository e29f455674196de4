"""PadChest (Bustos et al., Medical Image Analysis 2020; Hospital San Juan, Alicante):
160,868 chest X-rays of 67,625 patients with 174 radiographic findings, 19 diagnoses
and 104 locations extracted from Spanish reports (27% by physicians, the rest by a
model).

Task: multilabel over the report labels. labels= a list of label names (as written in
the Labels column, e.g. [cardiomegaly, pleural effusion, pneumonia]); default: every
label (except "normal") with at least min_count positive images (default 100) among
the kept views, sorted by name. The chosen labels are kept in class_names and
dataset.source. labels=harmonised: the 18 torchxrayvision findings by torchxrayvision's
PadChest rule -- a finding is positive when one of the image's labels contains its name in
lower case or one of its synonyms (Infiltration: infiltrates, interstitial / ground glass /
reticular interstitial / reticulonodular interstitial / alveolar pattern, consolidation, air
bronchogram; Consolidation: air bronchogram; Pleural_Thickening: pleural thickening), else
negative; the 15 findings PadChest reports are labelled, Lung Lesion, Lung Opacity and Enlarged
Cardiomediastinum are missing (see medprobe.data.harmonise).
Modality: chest X-ray, 16-bit grayscale PNG (value_range None: scaled by percentiles).
Official split: none.
Licence: PadChest Dataset Research Use Agreement (BIMCV; the data are released under
CC BY-SA 4.0 according to the BIMCV page -- verify there).
Obtain: https://bimcv.cipf.es/bimcv-projects/padchest/ (zip files 0.zip ... 54.zip and
the CSV).

Layout (root = the folder holding the CSV and the extracted image folders):
  PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv (or .csv.gz)  columns ImageID,
      ImageDir, StudyDate_DICOM, StudyID, PatientID, PatientBirth, PatientSex_DICOM,
      ViewPosition_DICOM, Projection, MethodProjection, Labels, Localizations, ...
      Labels is a Python list literal such as ['pleural effusion', 'cardiomegaly']
      (entries are stripped; empty entries dropped).
  <ImageDir>/<ImageID>   e.g. 0/216840111366964012283393834152009027111812180_00-133-140.png
                         (also found anywhere under root)
Rows with an empty Labels cell (a few in the release) are left out and counted in
dataset.source; an unparseable Labels cell is an error naming the row.
Views (views=): frontal (default) = Projection PA, AP, AP_horizontal; lateral = L;
all = both. Other projections (COSTAL, EXCLUDE, UNK) are always left out.
Records: one per row; key = ImageID; patient = PatientID.
Metadata: sex (PatientSex_DICOM), age (year of StudyDate_DICOM minus PatientBirth,
whole years), age_bin, view (Projection: PA, AP, AP_HORIZONTAL, LATERAL),
method_projection, study (StudyID). Single site (Hospital San Juan).
"""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, FileIndex, Presence, Problems, PublicDataset,
                                            assign_splits, details, find_first, finish, folder_root, parse_float,
                                            read_table, split_policy)
from medprobe.data import harmonise
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "padchest"
CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
             "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
COLUMNS = ("ImageID", "ImageDir", "PatientID", "Projection", "Labels")
OPTIONAL = ("StudyDate_DICOM", "StudyID", "PatientBirth", "PatientSex_DICOM", "MethodProjection")
#: labels=harmonised: substrings of a PadChest label that make each finding positive (torchxrayvision's rule)
HARMONISED: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis",), "Consolidation": ("consolidation", "air bronchogram"),
    "Infiltration": ("infiltration", "infiltrates", "interstitial pattern", "ground glass pattern",
                     "reticular interstitial pattern", "reticulonodular interstitial pattern", "alveolar pattern",
                     "consolidation", "air bronchogram"),
    "Pneumothorax": ("pneumothorax",), "Edema": ("edema",), "Emphysema": ("emphysema",), "Fibrosis": ("fibrosis",),
    "Effusion": ("effusion",), "Pneumonia": ("pneumonia",), "Pleural_Thickening": ("pleural_thickening",
                                                                                   "pleural thickening"),
    "Cardiomegaly": ("cardiomegaly",), "Nodule": ("nodule",), "Mass": ("mass",), "Hernia": ("hernia",),
    "Fracture": ("fracture",)}
VIEWS = {"frontal": {"PA", "AP", "AP_horizontal"}, "lateral": {"L"}}


def parse_labels(text: str) -> list[str] | None:
    """The labels of a Labels cell ("['a', ' b']" -> ["a", "b"]); None when it is not a list literal."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    return sorted({v.strip() for v in value if v.strip()})


def _age(study_date: str, birth: str) -> float | None:
    year = parse_float(study_date[:4]) if len(study_date) >= 4 else None
    born = parse_float(birth)
    if year is None or born is None:
        return None
    return year - born


@register_adapter(NAME, "PadChest: 160k chest X-rays, multi-label report findings, frontal/lateral",
                  details(__doc__, official=False))
def build_padchest(root: Path | None, labels: Any = None, min_count: int = 100, views: str = "frontal",
                   split: str = "systematic", split_seed: int = 0, split_fractions: Any = DEFAULT_FRACTIONS,
                   missing: str = "error") -> ImageDataset:
    """Build PadChest from the folder ``root`` holding its CSV and image folders."""
    folder = folder_root(NAME, root, "the PadChest folder holding the labels CSV and the image folders")
    harmonised = labels == "harmonised"
    wanted = None if harmonised else option("labels", labels, list[str] | None)
    min_count = option("min_count", min_count, int, minimum=1)
    views = option("views", views, str, choices=("frontal", "lateral", "all"))
    keep = VIEWS["frontal"] | VIEWS["lateral"] if views == "all" else VIEWS[views]
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    csv_path = find_first(folder, CSV_NAMES, "the PadChest labels CSV")
    table = read_table(csv_path, COLUMNS, problems, what="the PadChest labels CSV", optional=OPTIONAL)
    index = FileIndex(folder, (".png",))
    rows = []
    no_labels = 0
    seen: dict[str, int] = {}
    for row in table.rows:
        at = table.where(row)
        image = row["ImageID"]
        if not image or not row["PatientID"]:
            problems.add(f"{at}: empty {'ImageID' if not image else 'PatientID'}")
            continue
        if row["Projection"] not in keep:
            continue
        if row["Labels"] in ("", "nan"):
            no_labels += 1
            continue
        found = parse_labels(row["Labels"])
        if found is None:
            problems.add(f"{at}: Labels {row['Labels'][:80]!r} is not a list of strings such as "
                         f"['pleural effusion', 'cardiomegaly'] (truncated row?)")
            continue
        if image in seen:
            problems.add(f"{at}: ImageID {image} is already listed in row {seen[image]}")
            continue
        seen[image] = row.number
        d = row["ImageDir"]
        d = str(int(float(d))) if parse_float(d) is not None else d
        path = folder / d / image
        path = path if path.is_file() else index.get(image)
        if not presence.ok(path, at, image):
            continue
        rows.append((row, at, found, path))
    problems.check()
    counts = Counter(label for _, _, found, _ in rows for label in found)
    if harmonised:
        classes = harmonise.CHEST_FINDINGS
    elif wanted is not None:
        classes = tuple(wanted)
    else:
        classes = tuple(sorted(c for c, n in counts.items() if n >= min_count and c != "normal"))
        if not classes and rows:
            raise ConfigError(f"no PadChest label reaches min_count={min_count} positive images among the "
                              f"{len(rows)} kept images; lower min_count or pass labels=[...]")
    drafts, where = [], []
    for row, at, found, path in rows:
        meta = demographics(sex=row["PatientSex_DICOM"] or None,
                            age=_age(row["StudyDate_DICOM"], row["PatientBirth"]), view=row["Projection"])
        meta["method_projection"] = row["MethodProjection"] or None
        meta["study"] = row["StudyID"] or None
        if harmonised:
            label = harmonise.harmonise({f: int(any(s in term for term in found for s in subs))
                                         for f, subs in HARMONISED.items()}, {f: (f,) for f in HARMONISED})
        else:
            label = tuple(int(c in found) for c in classes)
        drafts.append(Record(row["ImageID"], "", row["PatientID"], label, meta, str(path)))
        where.append(at)
    if not drafts:
        raise DataError(f"{csv_path}: no usable rows with views={views} (Projection in {sorted(keep)})")
    records = assign_splits(drafts, policy)
    ds = PublicDataset(NAME, folder, records, TaskSpec("multilabel", classes), where=where, policy=policy,
                       annotation_files=[csv_path],
                       notes=[f"views={views}", harmonise.note(HARMONISED) if harmonised
                              else f"labels={','.join(classes)}", f"no_labels={no_labels}",
                              presence.note()])
    return finish(ds, problems)
