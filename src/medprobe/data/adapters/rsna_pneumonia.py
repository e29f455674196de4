"""RSNA Pneumonia Detection Challenge 2018 (Shih et al., Radiology: AI 2019): 26,684
chest X-rays (a subset of NIH ChestX-ray14) labelled for lung opacities suggestive of
pneumonia, with boxes.

Task: task=binary (default): Target 0 / 1 (no opacity / lung opacity); task=multiclass:
the 3 classes of stage_2_detailed_class_info.csv: Normal, No Lung Opacity / Not
Normal, Lung Opacity (needs that file; it must agree with Target). labels=harmonised (with
task=binary): the 18 torchxrayvision findings, Target giving both Pneumonia and Lung Opacity
(as torchxrayvision's RSNA dataset does); the 16 others are missing (see
medprobe.data.harmonise).
Modality: chest X-ray, DICOM 1024 x 1024 (value_range None: scaled by percentiles).
Official split: none with labels (the stage 2 test images have no public labels and are
not used).
Licence: RSNA Pneumonia Detection Challenge data: Kaggle competition rules / RSNA terms
(non-commercial research); the images come from NIH ChestX-ray14.
Obtain: kaggle.com/competitions/rsna-pneumonia-detection-challenge/data.

Layout (root = the downloaded folder):
  stage_2_train_labels.csv          columns patientId, x, y, width, height, Target; one row
                                    per box (Target 1) or one row with empty box (Target 0)
  stage_2_detailed_class_info.csv   columns patientId, class (optional; task=multiclass)
  stage_2_train_images/<patientId>.dcm   (any sub-folder of root)
Rows of one patientId must agree on Target; Target 1 rows need numeric x, y, width,
height, Target 0 rows empty ones.
Records: one per patientId (the name is historical: it identifies an image; the
challenge has one image per patient).
Metadata: boxes (number of boxes). With read_dicom_tags=true the DICOM headers are read
at build time (slow for the full set): sex (PatientSex), age (PatientAge), age_bin, view
(ViewPosition, PA/AP).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, DicomDataset, FileIndex, Presence, Problems, Row,
                                            assign_splits, details, dicom_header, finish, folder_root, parse_float,
                                            read_table, split_policy)
from medprobe.data import harmonise
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "rsna_pneumonia"
LABELS_CSV = "stage_2_train_labels.csv"
#: labels=harmonised: Target (lung opacity suggestive of pneumonia) gives both findings
HARMONISED: dict[str, tuple[str, ...]] = {"Pneumonia": ("Target",), "Lung Opacity": ("Target",)}
CLASS_CSV = "stage_2_detailed_class_info.csv"
DETAILED = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")
BOX = ("x", "y", "width", "height")


def _target(row: Row, at: str, problems: Problems) -> int | None:
    t = row["Target"]
    if t not in ("0", "1"):
        problems.add(f"{at}: Target {t!r}; expected 0 or 1")
        return None
    box = [row[c] for c in BOX]
    if t == "1" and any(parse_float(v) is None for v in box):
        problems.add(f"{at}: Target 1 needs numeric x, y, width, height; got {box}")
        return None
    if t == "0" and any(v for v in box):
        problems.add(f"{at}: Target 0 with a box {box}; expected empty x, y, width, height")
        return None
    return int(t)


@register_adapter(NAME, "RSNA Pneumonia Detection (stage 2): chest X-ray DICOMs, opacity yes/no (or 3 classes)",
                  details(__doc__, official=False))
def build_rsna_pneumonia(root: Path | None, task: str = "binary", read_dicom_tags: bool = False,
                         split: str = "systematic", split_seed: int = 0, split_fractions: Any = DEFAULT_FRACTIONS,
                         missing: str = "error", labels: str = "native") -> ImageDataset:
    """Build the RSNA pneumonia set from the folder ``root`` holding stage_2_train_labels.csv."""
    folder = folder_root(NAME, root, f"the folder holding {LABELS_CSV} and stage_2_train_images/")
    task = option("task", task, str, choices=("binary", "multiclass"))
    labels = harmonise.labels_option(labels, NAME)
    if labels == "harmonised" and task != "binary":
        raise ConfigError("option labels=harmonised maps the binary Target; use it with task=binary")
    tags = option("read_dicom_tags", read_dicom_tags, bool)
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    table = read_table(folder / LABELS_CSV, ("patientId", "Target") + BOX, problems,
                       what="the RSNA label file (patientId, x, y, width, height, Target)")
    files = [table.path]
    targets: dict[str, int] = {}
    boxes: dict[str, int] = defaultdict(int)
    first: dict[str, str] = {}
    bad: set[str] = set()
    for row in table.rows:
        at = table.where(row)
        pid = row["patientId"]
        if not pid:
            problems.add(f"{at}: empty patientId")
            continue
        t = _target(row, at, problems)
        if t is None:
            bad.add(pid)
            continue
        if pid in targets and targets[pid] != t:
            problems.add(f"{at}: Target {t} for {pid} contradicts {first[pid]} (Target {targets[pid]})")
            bad.add(pid)
            continue
        targets.setdefault(pid, t)
        first.setdefault(pid, at)
        boxes[pid] += t
    detailed: dict[str, int] = {}
    if task == "multiclass":
        info = read_table(folder / CLASS_CSV, ("patientId", "class"), problems,
                          what="the RSNA detailed class file (patientId, class)")
        files.append(info.path)
        for row in info.rows:
            at = info.where(row)
            pid, cls = row["patientId"], row["class"]
            if cls not in DETAILED:
                problems.add(f"{at}: class {cls!r}; expected one of {', '.join(DETAILED)}")
                bad.add(pid)
                continue
            k = DETAILED.index(cls)
            if pid in detailed and detailed[pid] != k:
                problems.add(f"{at}: class {cls!r} for {pid} contradicts an earlier row ({DETAILED[detailed[pid]]})")
                bad.add(pid)
            elif pid in targets and (k == 2) != (targets[pid] == 1):
                problems.add(f"{at}: class {cls!r} for {pid} contradicts Target {targets[pid]} in {first[pid]}")
                bad.add(pid)
            detailed[pid] = k
    index = FileIndex(folder, (".dcm",))
    drafts, where = [], []
    for pid, t in targets.items():
        at = first[pid]
        if pid in bad:
            continue
        if task == "multiclass" and pid not in detailed:
            problems.add(f"{at}: {pid} has no row in {CLASS_CSV}")
            continue
        path = index.get(f"{pid}.dcm")
        if not presence.ok(path, at, f"{pid}.dcm"):
            continue
        meta: dict[str, Any] = {"boxes": boxes[pid]}
        if tags:
            try:
                h = dicom_header(path)  # type: ignore[arg-type]
            except DataError as e:
                problems.add(f"{e} [listed in {at}]")
                continue
            meta.update(demographics(sex=h["PatientSex"], age=h["PatientAge"], view=h["ViewPosition"]))
        drafts.append(Record(pid, "", pid, detailed[pid] if task == "multiclass" else t, meta, str(path)))
        where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    spec = TaskSpec("binary", ("no opacity", "lung opacity")) if task == "binary" else TaskSpec("multiclass", DETAILED)
    if labels == "harmonised":
        records, spec = harmonise.harmonise_records(records, ("Target",), HARMONISED), harmonise.harmonised_task()
    ds = DicomDataset(NAME, folder, records, spec, where=where, policy=policy, annotation_files=files,
                      notes=[f"task={task}", presence.note(),
                             harmonise.note(HARMONISED) if labels == "harmonised" else ""])
    return finish(ds, problems)
