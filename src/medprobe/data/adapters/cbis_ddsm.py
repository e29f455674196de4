"""CBIS-DDSM (Lee et al., Scientific Data 2017; TCIA): a curated subset of the Digital
Database for Screening Mammography, 1,566 patients, with pathology-verified masses and
calcifications (full mammograms, cropped regions of interest and ROI masks, DICOM).

Task: binary benign / malignant. pathology MALIGNANT -> 1; BENIGN and
BENIGN_WITHOUT_CALLBACK -> 0. unit=image (default): one record per full mammogram,
malignant if any of its abnormalities is; unit=roi: one record per abnormality, the
cropped ROI image. abnormality = mass (default) | calc | both selects the description
files (with both, a mammogram with a mass and a calcification appears once per file:
its two folders differ, and both stay with their patient).
Modality: mammography (DICOM, 16-bit; value_range None: scaled by percentiles).
Official split: the train / test description files (split=official uses test as the
test set and splits train by patient into train and val).
Licence: CC BY 3.0 (TCIA).
Obtain: https://www.cancerimagingarchive.net/collection/cbis-ddsm/ (images with the
NBIA Data Retriever, plus the four description CSVs).

Layout (root = the folder holding the CSVs and the CBIS-DDSM image tree):
  mass_case_description_train_set.csv, mass_case_description_test_set.csv,
  calc_case_description_train_set.csv, calc_case_description_test_set.csv
      columns patient_id, breast_density (calc: "breast density"), left or right
      breast, image view, abnormality id, abnormality type, (mass shape, mass margins |
      calc type, calc distribution), assessment, pathology, subtlety, image file path,
      cropped image file path, ROI mask file path
  CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/<study>/<series>/1-1.dcm ...
File paths in the CSVs (e.g. Mass-Training_P_00001_LEFT_CC/1.3.6.../1.3.6.../000000.dcm,
sometimes with a trailing newline) are used as they are when that file exists (under
root or root/CBIS-DDSM); otherwise, as with NBIA downloads whose sub-folders are named
differently, the first path component is looked up as a folder anywhere under root and
its DICOM file taken: the only one for a full mammogram; for a cropped ROI (folder
..._1) the file in a series folder named "cropped", else the one whose
SeriesDescription says cropped, else the smaller file (the ROI mask is full size).
Records: key = the image folder (unit=image) or folder + abnormality id (unit=roi);
patient = patient_id (P_00001).
Metadata: view (CC / MLO), laterality, breast_density, assessment (BI-RADS),
subtlety, abnormality_type. No sex/age in the source.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, DicomDataset, Presence, Problems, Row, Table,
                                            assign_splits, details, dicom_header, finish, folder_root, parse_int,
                                            read_table, split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.errors import DataError
from medprobe.options import option

NAME = "cbis_ddsm"
PATHOLOGY = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
COLUMNS = ("patient_id", "left or right breast", "image view", "abnormality id", "pathology", "image file path",
           "cropped image file path")
OPTIONAL = ("breast_density", "breast density", "assessment", "subtlety", "abnormality type")


def _folders(root: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, dirs, _ in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in dirs:
            out.setdefault(d, Path(folder) / d)
    return out


class _Resolver:
    """CSV file path -> DICOM file, for the CSV's own paths and for NBIA folder names."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[str, Path] | None = None

    def __call__(self, value: str, cropped: bool) -> tuple[Path | None, str]:
        rel = value.strip().strip('"').replace("\\", "/").strip("/")
        if not rel:
            return None, "empty path"
        for base in (self.root, self.root / "CBIS-DDSM"):
            if (base / rel).is_file():
                return base / rel, ""
        if self._dirs is None:
            self._dirs = _folders(self.root)
        top = rel.split("/")[0]
        folder = self._dirs.get(top)
        if folder is None:
            return None, f"neither {rel} nor a folder {top} exists under {self.root}"
        files = sorted(p for p in folder.rglob("*.dcm") if not p.name.startswith("."))
        if not cropped:
            if len(files) == 1:
                return files[0], ""
            return None, f"folder {folder} holds {len(files)} DICOM files; expected the one full mammogram"
        if len(files) == 1:
            return files[0], ""
        named = [p for p in files if "crop" in p.parent.name.lower()]
        if len(named) == 1:
            return named[0], ""
        if len(files) == 2:
            try:
                desc = [str(dicom_header(p, ("SeriesDescription",))["SeriesDescription"] or "").lower() for p in files]
            except DataError as e:
                return None, str(e)
            by_desc = [p for p, d in zip(files, desc) if "crop" in d]
            if len(by_desc) == 1:
                return by_desc[0], ""
            return min(files, key=lambda p: p.stat().st_size), ""
        return None, f"folder {folder} holds {len(files)} DICOM files; expected a cropped ROI image (and its mask)"


def _rows(table: Table, problems: Problems) -> list[tuple[Row, str, int]]:
    out = []
    for row in table.rows:
        at = table.where(row)
        label = PATHOLOGY.get(row["pathology"])
        if label is None:
            problems.add(f"{at}: pathology {row['pathology']!r}; expected MALIGNANT, BENIGN or "
                         f"BENIGN_WITHOUT_CALLBACK")
            continue
        if not row["patient_id"]:
            problems.add(f"{at}: empty patient_id")
            continue
        out.append((row, at, label))
    return out


def _meta(row: Row) -> dict[str, Any]:
    meta = demographics(view=row["image view"])
    meta["laterality"] = row["left or right breast"] or None
    meta["breast_density"] = parse_int(row["breast_density"] or row["breast density"])
    meta["assessment"] = parse_int(row["assessment"])
    meta["subtlety"] = parse_int(row["subtlety"])
    meta["abnormality_type"] = row["abnormality type"] or None
    return meta


@register_adapter(NAME, "CBIS-DDSM: mammograms (DICOM), benign vs malignant masses/calcifications, official split",
                  details(__doc__, official=True))
def build_cbis_ddsm(root: Path | None, abnormality: str = "mass", unit: str = "image", split: str = "official",
                    split_seed: int = 0, split_fractions: Any = DEFAULT_FRACTIONS, val_fraction: float = 0.1,
                    missing: str = "error") -> ImageDataset:
    """Build CBIS-DDSM from the folder ``root`` holding the description CSVs and the images."""
    folder = folder_root(NAME, root, "the folder holding mass_case_description_train_set.csv and the images")
    abnormality = option("abnormality", abnormality, str, choices=("mass", "calc", "both"))
    unit = option("unit", unit, str, choices=("image", "roi"))
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    resolve = _Resolver(folder)
    kinds = ("mass", "calc") if abnormality == "both" else (abnormality,)
    files = []
    groups: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        for part, official in (("train", "train"), ("test", "test")):
            table = read_table(folder / f"{kind}_case_description_{part}_set.csv", COLUMNS, problems,
                               what=f"the CBIS-DDSM {kind} description file", optional=OPTIONAL)
            files.append(table.path)
            for row, at, label in _rows(table, problems):
                column = "cropped image file path" if unit == "roi" else "image file path"
                top = row[column].strip().replace("\\", "/").split("/")[0]
                key = top if unit == "image" else f"{top}#{row['abnormality id']}"
                g = groups.get(key)
                if g is not None:
                    if g["patient"] != row["patient_id"]:
                        problems.add(f"{at}: patient_id {row['patient_id']} differs from {g['where']} "
                                     f"({g['patient']}) for the same image {top}")
                        g["bad"] = True
                    elif unit == "roi":
                        problems.add(f"{at}: abnormality {row['abnormality id']} of {top} is already listed in "
                                     f"{g['where']}")
                    g["label"] = max(g["label"], label)
                    continue
                groups[key] = {"row": row, "where": at, "label": label, "patient": row["patient_id"],
                               "split": official, "column": column, "bad": False}
    drafts, where = [], []
    for key, g in groups.items():
        if g["bad"]:
            continue
        row, at = g["row"], g["where"]
        path, why = resolve(row[g["column"]], cropped=unit == "roi")
        if path is None and not presence.skip:
            problems.add(f"{at}: {g['column']} {row[g['column']].strip()!r}: {why}")
            continue
        if not presence.ok(path, at, row[g["column"]].strip()):
            continue
        drafts.append(Record(key, g["split"], g["patient"], g["label"], _meta(row), str(path)))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    ds = DicomDataset(NAME, folder, records, TaskSpec("binary", ("benign", "malignant")), where=where, policy=policy,
                      annotation_files=files, notes=[f"abnormality={abnormality}", f"unit={unit}", presence.note()])
    return finish(ds, problems)
