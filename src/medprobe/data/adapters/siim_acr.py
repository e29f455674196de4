"""SIIM-ACR Pneumothorax Segmentation (Kaggle 2019; images from NIH ChestX-ray14, masks by
SIIM/ACR/STR radiologists): 12,089 chest X-ray DICOMs with run-length-encoded pneumothorax
masks (stage 2 labels; 10,675 in the stage 1 training file).

Task: task=segmentation (default): background, pneumothorax (an image's masks are merged);
task=classification: binary, positive when the image has a mask. labels=harmonised (with
task=classification): the 18 torchxrayvision findings with Pneumothorax from the masks, the
17 others missing (see medprobe.data.harmonise).
Modality: chest X-ray, DICOM 1024 x 1024 (value_range None: scaled by percentiles).
Official split: none with labels (the stage 2 test masks were not released).
Licence: SIIM-ACR Pneumothorax Segmentation competition data (Kaggle competition rules;
non-commercial research); the images are NIH ChestX-ray14 images.
Obtain: kaggle.com/competitions/siim-acr-pneumothorax-segmentation (stage 2 files) or the
stage 1 mirrors (dicom-images-train/, train-rle.csv).

Layout (root = the downloaded folder):
  stage_2_train.csv  columns ImageId, EncodedPixels (stage 2: every labelled image; standard
                     RLE, rle=absolute) -- used when present, else
  train-rle.csv      columns ImageId, " EncodedPixels" (stage 1; relative RLE, rle=relative)
  dicom-images-train/<study>/<series>/<ImageId>.dcm (and dicom-images-test/ for the
                     stage 1 test images labelled in stage 2): found by name anywhere under root
EncodedPixels: -1 for no pneumothorax; an image with several masks has several rows. The RLE
forms are those of CANDID-PTX (the SIIM encoding; see `medprobe list datasets --details
candid_ptx`): rle=auto (default) is absolute for stage_2_train.csv and relative for
train-rle.csv.
Records: one per ImageId; key = ImageId; patient = ImageId (every image its own patient:
the DICOM PatientID is read only with read_dicom_tags=true, which also gives sex (PatientSex),
age (PatientAge) and view (ViewPosition) and makes PatientID the patient).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from medprobe.data import harmonise
from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, FileIndex, Presence, Problems, assign_splits, details,
                                            dicom_header, finish, folder_root, read_table, split_policy)
from medprobe.data.adapters.candid_ptx import CandidDataset, row_rle
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "siim_acr"
FILES = {"stage_2_train.csv": "absolute", "train-rle.csv": "relative"}
#: labels=harmonised: the masks give Pneumothorax
HARMONISED: dict[str, tuple[str, ...]] = {"Pneumothorax": ("pneumothorax",)}


@register_adapter(NAME, "SIIM-ACR pneumothorax: chest X-ray DICOMs with RLE pneumothorax masks (or yes/no)",
                  details(__doc__, official=False))
def build_siim_acr(root: Path | None, task: str = "segmentation", rle: str = "auto", labels: str = "native",
                   read_dicom_tags: bool = False, split: str = "systematic", split_seed: int = 0,
                   split_fractions: Any = DEFAULT_FRACTIONS, missing: str = "error") -> ImageDataset:
    """Build SIIM-ACR pneumothorax from the folder ``root`` holding stage_2_train.csv or train-rle.csv."""
    folder = folder_root(NAME, root, "the SIIM-ACR folder holding stage_2_train.csv or train-rle.csv")
    task = option("task", task, str, choices=("segmentation", "classification"))
    rle = option("rle", rle, str, choices=("auto", "relative", "absolute"))
    labels = harmonise.labels_option(labels, NAME)
    tags = option("read_dicom_tags", read_dicom_tags, bool)
    if labels == "harmonised" and task != "classification":
        raise ConfigError("option labels=harmonised gives image-level findings; use it with task=classification")
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    name = next((n for n in FILES if (folder / n).is_file()), None)
    if name is None:
        raise DataError(f"{folder}: neither stage_2_train.csv nor train-rle.csv found; expected the SIIM-ACR label "
                        "file (ImageId, EncodedPixels)")
    mode = FILES[name] if rle == "auto" else rle
    table = read_table(folder / name, ("ImageId", "EncodedPixels"), problems,
                       what="the SIIM-ACR label file (ImageId, EncodedPixels)")
    runs: dict[str, list[tuple[str, list[int]]]] = defaultdict(list)
    first: dict[str, str] = {}
    for row in table.rows:
        at = table.where(row)
        uid = row["ImageId"]
        if not uid:
            problems.add(f"{at}: empty ImageId")
            continue
        values = row_rle(row, "EncodedPixels", at, problems)
        if values is None:
            continue
        first.setdefault(uid, at)
        if values:
            runs[uid].append((at, values))
    index = FileIndex(folder, (".dcm",))
    drafts, where, kept = [], [], []
    for uid, at in first.items():
        path = index.get(f"{uid}.dcm")
        if not presence.ok(path, at, f"{uid}.dcm"):
            continue
        positive = int(bool(runs.get(uid)))
        meta: dict[str, Any] = {"pneumothorax": positive}
        patient = uid
        if tags:
            try:
                h = dicom_header(path, ("PatientID", "PatientSex", "PatientAge", "ViewPosition"))  # type: ignore
            except DataError as e:
                problems.add(f"{e} [listed in {at}]")
                continue
            meta.update(demographics(sex=h["PatientSex"], age=h["PatientAge"], view=h["ViewPosition"]))
            patient = str(h["PatientID"] or uid)
        seg = task == "segmentation"
        drafts.append(Record(uid, "", patient, None if seg else positive, meta, str(path),
                             str(table.path) if seg else None))
        where.append(at)
        kept.append(runs.get(uid, []))
    problems.check()
    records = assign_splits(drafts, policy)
    spec = TaskSpec("segmentation", ("background", "pneumothorax")) if task == "segmentation" else \
        TaskSpec("binary", ("no pneumothorax", "pneumothorax"))
    if labels == "harmonised":
        records, spec = harmonise.harmonise_records(records, ("pneumothorax",), HARMONISED), harmonise.harmonised_task()
    ds = CandidDataset(NAME, folder, records, spec, where=where, policy=policy, annotation_files=[table.path],
                       notes=[f"labels_file={name}", f"rle={mode}", f"task={task}", presence.note(),
                              harmonise.note(HARMONISED) if labels == "harmonised" else ""],
                       runs=kept, rle=mode)
    return finish(ds, problems)
