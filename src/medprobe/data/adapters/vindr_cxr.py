"""VinDr-CXR (Nguyen et al., Scientific Data 2022): 18,000 posterior-anterior chest X-rays
from two Vietnamese hospitals, image-level labels for 22 local findings and 6 global
diagnoses. Each training image was labelled independently by 3 radiologists (one CSV
row per radiologist, rad_id R1..R17); the 3,000 test images by the consensus of 5.

Task: multilabel. labels=all (default): every label column except "No finding"; global:
the global diagnoses (COPD, Lung tumor, Pneumonia, Tuberculosis, Other disease(s));
local: the local findings (Aortic enlargement, Atelectasis, ..., Pulmonary fibrosis,
Rib fracture, Other lesion); harmonised: the 18 torchxrayvision findings (Pulmonary
fibrosis -> Fibrosis, Pleural effusion -> Effusion, Pleural thickening ->
Pleural_Thickening, Rib fracture | Clavicle fracture -> Fracture, the other shared names as
they are; Nodule and Mass are missing since VinDr labels them together as Nodule/Mass, and so
are Hernia, Lung Lesion and Enlarged Cardiomediastinum: see medprobe.data.harmonise); or a
list of column names.
Aggregation of the radiologists' rows (aggregate=): majority (default; positive when
more than half of the image's rows are 1), any (positive when at least one is).
Test rows (one per image) are used as they are.
Modality: chest X-ray, DICOM (.dicom files; value_range None: scaled by percentiles).
Official split: train (15,000) / test (3,000).
Licence: PhysioNet Credentialed Health Data License 1.5.0 (credentialed access; DUA).
Obtain: https://physionet.org/content/vindr-cxr/1.0.0/

Layout (root = the vindr-cxr/1.0.0 folder):
  annotations/image_labels_train.csv  columns image_id, rad_id, then one 0/1 column per
                                      label (Aortic enlargement, ..., No finding)
  annotations/image_labels_test.csv   the same labels, one row per image (a rad_id
                                      column is allowed)
  train/<image_id>.dicom, test/<image_id>.dicom   (.dcm also accepted; any sub-folder)
The two CSVs may also sit directly in root. Label columns are taken from the train
header; the test file must have the same ones.
Records: one per image_id; patient = image_id (the release has no patient ids: each
image is treated as its own patient).
Metadata: with read_dicom_tags=true the DICOM headers are read at build time (slow
for the full set) for sex (PatientSex), age (PatientAge), age_bin, view
(ViewPosition) and site (InstitutionName) where present; otherwise none.
Uncertain: the global label names are matched case-insensitively ("Other disease"
and "Other diseases" both count as global).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, DicomDataset, FileIndex, Presence, Problems, Table,
                                            assign_splits, details, dicom_header, finish, folder_root, read_table,
                                            split_policy)
from medprobe.data import harmonise
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "vindr_cxr"
GLOBAL = {"copd", "lung tumor", "pneumonia", "tuberculosis", "other disease", "other diseases"}
NO_FINDING = "no finding"
ID_COLUMNS = ("image_id", "rad_id")


#: labels=harmonised: the VinDr-CXR columns each of the 18 findings is mapped from (matched case-insensitively)
HARMONISED: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",), "Consolidation": ("Consolidation",), "Infiltration": ("Infiltration",),
    "Pneumothorax": ("Pneumothorax",), "Edema": ("Edema",), "Emphysema": ("Emphysema",),
    "Fibrosis": ("Pulmonary fibrosis",), "Effusion": ("Pleural effusion",), "Pneumonia": ("Pneumonia",),
    "Pleural_Thickening": ("Pleural thickening",), "Cardiomegaly": ("Cardiomegaly",),
    "Fracture": ("Rib fracture", "Clavicle fracture"), "Lung Opacity": ("Lung Opacity",)}


def _csv(folder: Path, name: str) -> Path:
    for p in (folder / "annotations" / name, folder / name):
        if p.is_file():
            return p
    return folder / "annotations" / name


def _classes(header: list[str], labels: Any) -> tuple[str, ...]:
    columns = [h for h in header if h and h not in ID_COLUMNS]
    if labels in ("all", None):
        return tuple(c for c in columns if c.lower() != NO_FINDING)
    if labels == "harmonised":
        used = {n for names in harmonise.resolve(HARMONISED, columns, case_insensitive=True).values() for n in names}
        return tuple(c for c in columns if c in used)
    if labels == "global":
        return tuple(c for c in columns if c.lower() in GLOBAL)
    if labels == "local":
        return tuple(c for c in columns if c.lower() not in GLOBAL and c.lower() != NO_FINDING)
    names = option("labels", labels, list[str] | None) or []
    bad = [n for n in names if n not in columns]
    if bad:
        raise ConfigError(f"option labels: unknown label column(s) {bad}; use all, global, local, harmonised or "
                          f"names from "
                          f"{', '.join(columns)}")
    return tuple(names)


def _votes(table: Table, classes: tuple[str, ...], problems: Problems
           ) -> tuple[dict[str, list[tuple[int, ...]]], dict[str, str]]:
    votes: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    first: dict[str, str] = {}
    for row in table.rows:
        at = table.where(row)
        image_id = row["image_id"]
        if not image_id:
            problems.add(f"{at}: empty image_id")
            continue
        values = []
        for c in classes:
            v = row[c]
            if v not in ("0", "1", "0.0", "1.0"):
                problems.add(f"{at}: column {c!r} has {v!r}; expected 0 or 1")
                break
            values.append(int(float(v)))
        else:
            votes[image_id].append(tuple(values))
            first.setdefault(image_id, at)
    return votes, first


@register_adapter(NAME, "VinDr-CXR: chest X-ray DICOMs, 28 image-level labels from several radiologists",
                  details(__doc__, official=True))
def build_vindr_cxr(root: Path | None, labels: Any = "all", aggregate: str = "majority",
                    read_dicom_tags: bool = False, split: str = "official", split_seed: int = 0,
                    split_fractions: Any = DEFAULT_FRACTIONS, val_fraction: float = 0.1,
                    missing: str = "error") -> ImageDataset:
    """Build VinDr-CXR from the folder ``root`` (physionet vindr-cxr/1.0.0)."""
    folder = folder_root(NAME, root, "the VinDr-CXR folder holding annotations/image_labels_train.csv")
    aggregate = option("aggregate", aggregate, str, choices=("majority", "any"))
    tags = option("read_dicom_tags", read_dicom_tags, bool)
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    train_path, test_path = _csv(folder, "image_labels_train.csv"), _csv(folder, "image_labels_test.csv")
    what = "a VinDr-CXR label file (image_id, rad_id, one 0/1 column per label)"
    head = read_table(train_path, ("image_id",), problems, what=what, all_columns=True)
    classes = _classes(head.header, labels)
    if not classes:
        raise ConfigError(f"option labels={labels!r} selects no label column of {train_path}")
    tables = [("train", head)]
    if test_path.is_file() or policy.method == "official":
        test = read_table(test_path, ("image_id",) + classes, problems, what=what, all_columns=True)
        extra = sorted(set(h for h in test.header if h) - set(h for h in head.header if h) - set(ID_COLUMNS))
        if extra:
            raise DataError(f"{test_path}: label column(s) {extra} are not in {train_path}; the two files must have "
                            f"the same labels")
        tables.append(("test", test))
    index = FileIndex(folder, (".dicom", ".dcm"))
    drafts, where = [], []
    split_of: dict[str, str] = {}
    for official, table in tables:
        votes, first = _votes(table, classes, problems)
        for image_id, rows in votes.items():
            at = first[image_id]
            if image_id in split_of:
                problems.add(f"{at}: image {image_id} is also in the {split_of[image_id]} file")
                continue
            split_of[image_id] = official
            n = len(rows)
            sums = [sum(r[k] for r in rows) for k in range(len(classes))]
            label = tuple(int(s * 2 > n) if aggregate == "majority" else int(s > 0) for s in sums)
            path = index.get(f"{image_id}.dicom") or index.get(f"{image_id}.dcm")
            if not presence.ok(path, at, f"{image_id}.dicom"):
                continue
            meta: dict[str, Any] = {"radiologists": n}
            if tags:
                try:
                    h = dicom_header(path)  # type: ignore[arg-type]
                except DataError as e:
                    problems.add(f"{e} [listed in {at}]")
                    continue
                meta.update(demographics(sex=h["PatientSex"], age=h["PatientAge"], view=h["ViewPosition"],
                                         site=h["InstitutionName"]))
            drafts.append(Record(image_id, official, image_id, label, meta, str(path)))
            where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    task = TaskSpec("multilabel", classes)
    label_note = f"labels={','.join(classes)}"
    if labels == "harmonised":
        mapping = harmonise.resolve(HARMONISED, classes, case_insensitive=True)
        records, task = harmonise.harmonise_records(records, classes, mapping), harmonise.harmonised_task()
        label_note = harmonise.note(mapping)
    ds = DicomDataset(NAME, folder, records, task, where=where, policy=policy,
                      annotation_files=[t.path for _, t in tables],
                      notes=[label_note, f"aggregate={aggregate}", presence.note()])
    return finish(ds, problems)
