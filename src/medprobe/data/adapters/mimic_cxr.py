"""MIMIC-CXR (Johnson et al., Scientific Data 2019; MIMIC-CXR-JPG v2.0.0/2.1.0): 377,110 chest
X-rays of 65,379 patients (Beth Israel Deaconess), with the free-text radiology report of
every study. Used here for report generation (RAD-DINO): image -> the report's Findings
section.

Task: none (no labels); every record carries its study's findings text (Record.report),
read by the report_generation protocol.
Findings: the text after the "FINDINGS:" header up to the next section header (e.g.
"IMPRESSION:") of files/pXX/pSUBJECT/sSTUDY.txt, whitespace collapsed (as the MIMIC-CXR
section splitter does for the findings section). Studies without a Findings section are
dropped (RAD-DINO: 146,909 / 7,250 / 2,461 pairs); the number dropped is recorded in
dataset.source.
Views: views=frontal (default) keeps PA and AP images (ViewPosition of the metadata file);
views=all keeps every image.
Modality: chest X-ray, 8-bit JPEG (value_range (0, 255)).
Official split: mimic-cxr-2.0.0-split.csv(.gz) (train / validate / test by subject).
Licence: PhysioNet Credentialed Health Data License 1.5.0 (credentialed access, data use
agreement).
Obtain: https://physionet.org/content/mimic-cxr-jpg/ (images, split and metadata files)
and https://physionet.org/content/mimic-cxr/ (mimic-cxr-reports.zip).

Layout (root = the mimic-cxr-jpg/2.x.x folder):
  mimic-cxr-2.0.0-split.csv(.gz)     dicom_id, study_id, subject_id, split
  mimic-cxr-2.0.0-metadata.csv(.gz)  dicom_id, ViewPosition (PA, AP, LATERAL, LL...)
  files/p10/p10000032/s50414267/<dicom_id>.jpg
  reports: files/p10/p10000032/s50414267.txt (unzip mimic-cxr-reports.zip into root, or
      pass reports=<the folder holding files/>)
Records: one per image; key = dicom_id; patient = subject_id.
Metadata: view, study.
Options: reports (folder of the report files; default root), views (frontal | all).
"""
from __future__ import annotations

import re
from collections.abc import Container, Iterator
from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Presence, Problems, PublicDataset, assign_splits,
                                            details, find_first, finish, folder_root, read_table, split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.errors import DataError
from medprobe.options import option

NAME = "mimic_cxr"
FRONTAL = ("PA", "AP")
SPLITS = {"train": "train", "validate": "val", "test": "test"}


def split_rows(split_table: Any, known: Container[str], meta_name: str, problems: Problems
               ) -> Iterator[tuple[str, str, str, str, str]]:
    """``(where, dicom_id, study_id, subject_id, split)`` of every valid row of the official split file
    (MIMIC-CXR and MIMIC-CXR-JPG share it): the split known, ids numeric, the image in the metadata
    file (``known``); each bad row is a problem naming it."""
    for row in split_table.rows:
        at = split_table.where(row)
        dicom, study, subject = row["dicom_id"], row["study_id"], row["subject_id"]
        official = SPLITS.get(row["split"])
        if official is None:
            problems.add(f"{at}: split {row['split']!r}; expected train, validate or test")
            continue
        if not subject.isdigit() or not study.isdigit():
            problems.add(f"{at}: subject_id {subject!r} / study_id {study!r} are not numbers")
            continue
        if dicom not in known:
            problems.add(f"{at}: dicom_id {dicom} is not in {meta_name}")
            continue
        yield at, dicom, study, subject, official
_HEADER = re.compile(r"^\s*([A-Z][A-Z /&()-]{2,}):", re.MULTILINE)


def findings_section(text: str) -> str | None:
    """The Findings section of a MIMIC-CXR report (whitespace collapsed), or None when it has none."""
    headers = list(_HEADER.finditer(text))
    for i, m in enumerate(headers):
        if m.group(1).strip() == "FINDINGS":
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            body = " ".join(text[m.end():end].split())
            return body or None
    return None


@register_adapter(NAME, "MIMIC-CXR: chest X-rays with the Findings section of their reports (report generation)",
                  details(__doc__, official=True))
def build_mimic_cxr(root: Path | None, reports: str | None = None, views: str = "frontal", split: str = "official",
                    split_seed: int = 0, split_fractions: object = DEFAULT_FRACTIONS, val_fraction: float = 0.0,
                    missing: str = "error") -> ImageDataset:
    """Build MIMIC-CXR (JPG) with findings text from the folder ``root``."""
    folder = folder_root(NAME, root, "the mimic-cxr-jpg/2.x.x folder holding mimic-cxr-2.0.0-split.csv.gz and files/")
    report_root = Path(reports).expanduser() if reports else folder
    if not report_root.is_dir():
        raise DataError(f"{report_root}: reports folder not found; expected the folder holding files/pXX/pSUBJECT/"
                        f"sSTUDY.txt (unzip mimic-cxr-reports.zip)")
    views = option("views", views, str, choices=("frontal", "all"))
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    split_file = find_first(folder, ("mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-split.csv"),
                            "the official split file mimic-cxr-2.0.0-split.csv(.gz)")
    meta_file = find_first(folder, ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-metadata.csv"),
                           "the metadata file mimic-cxr-2.0.0-metadata.csv(.gz) (ViewPosition of each image)")
    split_table = read_table(split_file, ("dicom_id", "study_id", "subject_id", "split"), problems,
                             what="the MIMIC-CXR split file")
    meta_table = read_table(meta_file, ("dicom_id", "ViewPosition"), problems, what="the MIMIC-CXR metadata file")
    problems.check()
    view_of = {row["dicom_id"]: row["ViewPosition"] for row in meta_table.rows}
    findings: dict[tuple[str, str], str | None] = {}
    drafts: list[Record] = []
    where: list[str] = []
    no_findings = 0
    for at, dicom, study, subject, official in split_rows(split_table, view_of, meta_file.name, problems):
        view = view_of[dicom]
        if views == "frontal" and view not in FRONTAL:
            continue
        rel = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        if (subject, study) not in findings:
            report_path = report_root / rel / f"s{study}.txt"
            if not presence.ok(report_path, at, f"report {rel}/s{study}.txt", what="report"):
                findings[(subject, study)] = None
                continue
            try:
                text = report_path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                problems.add(f"{report_path}: cannot read report: {e}")
                continue
            findings[(subject, study)] = findings_section(text)
        text = findings[(subject, study)]
        if text is None:
            no_findings += 1
            continue
        image = folder / rel / f"s{study}" / f"{dicom}.jpg"
        if not presence.ok(image, at, f"{rel}/s{study}/{dicom}.jpg"):
            continue
        drafts.append(Record(dicom, official, subject, None, {"view": view, "study": study}, str(image), report=text))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    ds = PublicDataset(NAME, folder, records, TaskSpec("none"), where=where, policy=policy,
                       annotation_files=[split_file, meta_file], value_range=(0.0, 255.0),
                       notes=[f"views={views}", f"reports={report_root.resolve()}",
                              f"dropped_no_findings={no_findings}", presence.note()])
    return finish(ds, problems)
