"""MIMIC-CXR-JPG (Johnson et al., 2019; v2.0.0/2.1.0): 377,110 chest X-rays of 65,379 patients
(Beth Israel Deaconess, Boston) with 14 observations per study labelled from the reports by
the CheXpert labeler (or NegBio): positive (1), negative (0), uncertain (-1), not mentioned
(blank).

Task: multilabel, as CheXpert: labels=competition (default): Atelectasis, Cardiomegaly,
Consolidation, Edema, Pleural Effusion; all: the 14 observations; harmonised: the 18
torchxrayvision findings (Pleural Effusion -> Effusion, the other shared names as they are;
Infiltration, Emphysema, Fibrosis, Pleural_Thickening, Nodule, Mass, Hernia missing: see
medprobe.data.harmonise); or a list of column names. labeler = chexpert (default) | negbio
(mimic-cxr-2.0.0-chexpert.csv or -negbio.csv). Uncertainty (uncertain=): ones (default),
zeros, missing (a missing target, masked out of losses and metrics) or ignore (the image is
dropped; counted in dataset.source). Blank = 0 (as the CheXpert adapter). An image whose
study has no labeler row is left out and counted.
Modality: chest X-ray, 8-bit JPEG (value_range (0, 255)).
Official split: mimic-cxr-2.0.0-split.csv (train / validate / test by subject);
split=official maps validate to val.
Licence: PhysioNet Credentialed Health Data License 1.5.0 (credentialed access; DUA).
Obtain: https://physionet.org/content/mimic-cxr-jpg/ and, for sex and age,
https://physionet.org/content/mimiciv/ (hosp/patients.csv.gz).

Layout (root = the mimic-cxr-jpg/2.x.x folder):
  mimic-cxr-2.0.0-split.csv(.gz)     dicom_id, study_id, subject_id, split
  mimic-cxr-2.0.0-metadata.csv(.gz)  dicom_id, subject_id, study_id, ViewPosition, StudyDate (YYYYMMDD), ...
  mimic-cxr-2.0.0-chexpert.csv(.gz)  subject_id, study_id, then the 14 observation columns
  mimic-cxr-2.0.0-negbio.csv(.gz)    the same columns (labeler=negbio)
  files/p10/p10000032/s50414267/<dicom_id>.jpg
Metadata linkage (patients= the MIMIC-IV patients.csv(.gz), columns subject_id, gender,
anchor_age, anchor_year): sex = gender; age at the study = anchor_age + (year of StudyDate -
anchor_year) (MIMIC-CXR dates are shifted consistently with MIMIC-IV, so this is the
patient's age in the study's year); age_bin from it. Without patients= (or for a subject
missing there), sex and age are None. A patients file that does not exist is an error.
Records: one per image; key = dicom_id; patient = subject_id.
Metadata: sex, age, age_bin, view (ViewPosition), study (study_id).
Options: views = frontal (default: PA and AP) | all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medprobe.data import harmonise
from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Presence, Problems, PublicDataset, assign_splits,
                                            details, find_first, finish, folder_root, parse_float, read_table,
                                            split_policy)
from medprobe.data.adapters.chexpert import HARMONISED, _labels_option
from medprobe.data.adapters.mimic_cxr import FRONTAL, split_rows
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.errors import DataError
from medprobe.options import option

NAME = "mimic_cxr_jpg"
_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": 0}


def _file(folder: Path, stem: str, what: str) -> Path:
    return find_first(folder, (f"{stem}.csv.gz", f"{stem}.csv"), what)


def _patients(path: Path, problems: Problems) -> dict[str, tuple[str, float, float]]:
    """subject_id -> (gender, anchor_age, anchor_year) from MIMIC-IV's patients table."""
    table = read_table(path, ("subject_id", "gender", "anchor_age", "anchor_year"), problems,
                       what="the MIMIC-IV patients table (subject_id, gender, anchor_age, anchor_year)")
    out = {}
    for row in table.rows:
        age, year = parse_float(row["anchor_age"]), parse_float(row["anchor_year"])
        if age is None or year is None:
            problems.add(f"{table.where(row)}: anchor_age {row['anchor_age']!r} / anchor_year {row['anchor_year']!r} "
                         "are not numbers")
            continue
        out[row["subject_id"]] = (row["gender"], age, year)
    return out


@register_adapter(NAME, "MIMIC-CXR-JPG: 377k chest X-rays, CheXpert/NegBio labels, official split, sex/age linkage",
                  details(__doc__, official=True))
def build_mimic_cxr_jpg(root: Path | None, labels: Any = "competition", labeler: str = "chexpert",
                        uncertain: str = "ones", views: str = "frontal", patients: str | None = None,
                        split: str = "official", split_seed: int = 0, split_fractions: Any = DEFAULT_FRACTIONS,
                        val_fraction: float = 0.0, missing: str = "error") -> ImageDataset:
    """Build MIMIC-CXR-JPG (image-level multi-label) from the folder ``root``."""
    folder = folder_root(NAME, root, "the mimic-cxr-jpg/2.x.x folder holding mimic-cxr-2.0.0-split.csv.gz")
    harmonised = labels == "harmonised"
    classes = _labels_option(labels)
    labeler = option("labeler", labeler, str, choices=("chexpert", "negbio"))
    uncertain = option("uncertain", uncertain, str, choices=("ones", "zeros", "missing", "ignore"))
    views = option("views", views, str, choices=("frontal", "all"))
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    split_file = _file(folder, "mimic-cxr-2.0.0-split", "the official split file mimic-cxr-2.0.0-split.csv(.gz)")
    meta_file = _file(folder, "mimic-cxr-2.0.0-metadata", "the metadata file mimic-cxr-2.0.0-metadata.csv(.gz)")
    label_file = _file(folder, f"mimic-cxr-2.0.0-{labeler}", f"the {labeler} label file "
                                                               f"mimic-cxr-2.0.0-{labeler}.csv(.gz)")
    files = [split_file, meta_file, label_file]
    people: dict[str, tuple[str, float, float]] | None = None
    if patients:
        ppath = Path(patients).expanduser()
        if not ppath.is_file():
            raise DataError(f"{ppath}: patients table not found; expected MIMIC-IV hosp/patients.csv(.gz) "
                            "(option patients)")
        people = _patients(ppath, problems)
        files.append(ppath)
    split_table = read_table(split_file, ("dicom_id", "study_id", "subject_id", "split"), problems,
                             what="the MIMIC-CXR split file")
    meta_table = read_table(meta_file, ("dicom_id", "ViewPosition"), problems, what="the MIMIC-CXR metadata file",
                            optional=("StudyDate",))
    label_table = read_table(label_file, ("subject_id", "study_id") + classes, problems,
                             what=f"the MIMIC-CXR {labeler} label file (subject_id, study_id, observations)")
    problems.check()
    meta = {row["dicom_id"]: (row["ViewPosition"], row["StudyDate"] if "StudyDate" in row.cells else "")
            for row in meta_table.rows}
    study_labels: dict[str, tuple[int, ...] | None] = {}
    for row in label_table.rows:
        values = [_VALUES.get(row[c]) for c in classes]
        if any(v is None for v in values):
            bad = next(c for c, v in zip(classes, values) if v is None)
            problems.add(f"{label_table.where(row)}: column {bad!r} has {row[bad]!r}; expected 1.0, 0.0, -1.0 or blank")
            continue
        if row["study_id"] in study_labels:
            problems.add(f"{label_table.where(row)}: study {row['study_id']} is labelled twice")
            continue
        study_labels[row["study_id"]] = tuple(v for v in values if v is not None)
    drafts: list[Record] = []
    where: list[str] = []
    unlabelled = dropped = 0
    for at, dicom, study, subject, official in split_rows(split_table, meta, meta_file.name, problems):
        view, date = meta[dicom]
        if views == "frontal" and view not in FRONTAL:
            continue
        values = study_labels.get(study)
        if values is None:
            unlabelled += 1
            continue
        if -1 in values and uncertain != "missing":
            if uncertain == "ignore":
                dropped += 1
                continue
            values = tuple((1 if uncertain == "ones" else 0) if v == -1 else v for v in values)
        image = folder / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        if not presence.ok(image, at, f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"):
            continue
        sex = age = None
        if people is not None and subject in people:
            gender, anchor_age, anchor_year = people[subject]
            year = parse_float(date[:4]) if len(date) >= 8 else None
            sex, age = gender, (anchor_age + year - anchor_year) if year is not None else None
        info = demographics(sex=sex, age=age, view=view)
        info["study"] = study
        drafts.append(Record(dicom, official, subject, values, info, str(image)))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    task = TaskSpec("multilabel", classes)
    if harmonised:
        records, task = harmonise.harmonise_records(records, classes, HARMONISED), harmonise.harmonised_task()
    notes = [harmonise.note(HARMONISED) if harmonised else f"labels={','.join(classes)}", f"labeler={labeler}",
             f"uncertain={uncertain}", f"views={views}", f"no_label_row={unlabelled}",
             f"dropped_uncertain={dropped}" if uncertain == "ignore" else "",
             f"patients={Path(patients).expanduser().resolve()}" if patients else "", presence.note()]
    ds = PublicDataset(NAME, folder, records, task, where=where, policy=policy, annotation_files=files,
                       value_range=(0.0, 255.0), notes=notes)
    return finish(ds, problems)
