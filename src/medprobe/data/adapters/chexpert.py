"""CheXpert (Irvin et al., AAAI 2019): 224,316 chest X-rays of 65,240 patients (Stanford),
14 observations labelled from reports as positive (1), negative (0), uncertain (-1) or
not mentioned (blank).

Task: multilabel. labels=competition (default): the 5 competition observations
Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion; labels=all: all 14
(No Finding, Enlarged Cardiomediastinum, Cardiomegaly, Lung Opacity, Lung Lesion, Edema,
Consolidation, Pneumonia, Atelectasis, Pneumothorax, Pleural Effusion, Pleural Other,
Fracture, Support Devices); harmonised: the 18 torchxrayvision findings (Pleural Effusion ->
Effusion; the other CheXpert observations among the 18 keep their names; Infiltration,
Emphysema, Fibrosis, Pleural_Thickening, Nodule, Mass, Hernia are missing; No Finding,
Pleural Other and Support Devices are left out: see medprobe.data.harmonise); or a list of
column names.
Uncertainty policy (uncertain=): ones (U-Ones, default: -1 -> 1), zeros (U-Zeros:
-1 -> 0), missing (an uncertain label is a missing target, -1, masked out of losses and
metrics, as torchxrayvision does) or ignore (U-Ignore: images with an uncertain value in
any selected label are dropped; the number dropped is recorded in dataset.source).
Blank (not mentioned) = 0.
Modality: chest X-ray, 8-bit JPEG (value_range (0, 255)); frontal and lateral views.
Official split: train.csv (training) and valid.csv (234 images, 200 patients,
radiologist consensus labels). The competition test set is not public (its labels
were released later with CheXlocalize, not read here), so split=official uses
valid.csv as the test set and splits train.csv by patient into train and val.
Licence: Stanford University School of Medicine CheXpert Dataset Research Use Agreement
(non-commercial research).
Obtain: https://stanfordmlgroup.github.io/competitions/chexpert/ (CheXpert-v1.0 or
CheXpert-v1.0-small; also the Stanford AIMI shared datasets site).

Layout (root = the CheXpert-v1.0-small or CheXpert-v1.0 folder):
  train.csv, valid.csv  columns Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14
      observations; Path like CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg
      (resolved against the folder above root, or root itself with or without the
      first path component)
  train/patient00001/study1/view1_frontal.jpg ...
Records: one per CSV row; key = Path; patient = the patientNNNNN part of Path.
Metadata: sex (M/F; "Unknown" -> None), age, age_bin, view (the AP/PA column: AP, PA,
LL, RL; "LATERAL" for lateral images without it), frontal_lateral, study.
Options: views = frontal (default) | lateral | all (the Frontal/Lateral column).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Presence, Problems, PublicDataset, assign_splits,
                                            details, finish, folder_root, read_table, split_policy)
from medprobe.data import harmonise
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.metadata import demographics
from medprobe.errors import ConfigError
from medprobe.options import option

NAME = "chexpert"
ALL_LABELS: tuple[str, ...] = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                               "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                               "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")
COMPETITION: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
#: labels=harmonised: the CheXpert observations among the 18 findings
HARMONISED: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",), "Consolidation": ("Consolidation",), "Pneumothorax": ("Pneumothorax",),
    "Edema": ("Edema",), "Effusion": ("Pleural Effusion",), "Pneumonia": ("Pneumonia",),
    "Cardiomegaly": ("Cardiomegaly",), "Lung Lesion": ("Lung Lesion",), "Fracture": ("Fracture",),
    "Lung Opacity": ("Lung Opacity",), "Enlarged Cardiomediastinum": ("Enlarged Cardiomediastinum",)}
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": 0}


def _resolve(root: Path, rel: str) -> Path:
    """The image file for a CSV Path (first existing candidate; else the first candidate)."""
    p = Path(rel.replace("\\", "/"))
    candidates = [root.parent / p, root / p]
    if len(p.parts) > 1:
        candidates.append(root / Path(*p.parts[1:]))
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def _labels_option(labels: Any) -> tuple[str, ...]:
    if labels in ("competition", None):
        return COMPETITION
    if labels == "all":
        return ALL_LABELS
    if labels == "harmonised":  # the observations the 18 findings are mapped from
        return tuple(c for c in ALL_LABELS if any(c in names for names in HARMONISED.values()))
    names = option("labels", labels, list[str] | None) or []
    bad = [n for n in names if n not in ALL_LABELS]
    if bad:
        raise ConfigError(f"option labels: unknown CheXpert observation(s) {bad}; use competition, all, harmonised "
                          f"or names "
                          f"from {', '.join(ALL_LABELS)}")
    return tuple(names)


@register_adapter(NAME, "CheXpert: chest X-rays, 5 competition (or 14) labels, uncertainty policies",
                  details(__doc__, official=True))
def build_chexpert(root: Path | None, labels: Any = "competition", uncertain: str = "ones", views: str = "frontal",
                   split: str = "official", split_seed: int = 0, split_fractions: Any = DEFAULT_FRACTIONS,
                   val_fraction: float = 0.1, missing: str = "error") -> ImageDataset:
    """Build CheXpert from the folder ``root`` holding train.csv and valid.csv."""
    folder = folder_root(NAME, root, "the CheXpert-v1.0(-small) folder holding train.csv and valid.csv")
    classes = _labels_option(labels)
    uncertain = option("uncertain", uncertain, str, choices=("ones", "zeros", "missing", "ignore"))
    views = option("views", views, str, choices=("frontal", "lateral", "all"))
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    drafts: list[Record] = []
    where: list[str] = []
    files = []
    dropped = 0
    seen: dict[str, str] = {}
    for fname, official in (("train.csv", "train"), ("valid.csv", "test")):
        table = read_table(folder / fname, COLUMNS + classes, problems,
                           what=f"the CheXpert label file {fname} (columns {', '.join(COLUMNS)}, observations)")
        files.append(table.path)
        for row in table.rows:
            at = table.where(row)
            rel = row["Path"]
            m = re.search(r"(patient\d+)", rel)
            if not m:
                problems.add(f"{at}: Path {rel!r} has no patientNNNNN component; expected e.g. "
                             f"CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
                continue
            if rel in seen:
                problems.add(f"{at}: Path {rel} is already listed in {seen[rel]}")
                continue
            seen[rel] = at
            fl = row["Frontal/Lateral"]
            if fl not in ("Frontal", "Lateral"):
                problems.add(f"{at}: Frontal/Lateral {fl!r}; expected Frontal or Lateral")
                continue
            values = []
            bad = False
            for c in classes:
                v = _VALUES.get(row[c])
                if v is None:
                    problems.add(f"{at}: column {c!r} has {row[c]!r}; expected 1.0, 0.0, -1.0 (uncertain) or blank")
                    bad = True
                    break
                values.append(v)
            if bad or (views == "frontal" and fl != "Frontal") or (views == "lateral" and fl != "Lateral"):
                continue
            if -1 in values and uncertain != "missing":
                if uncertain == "ignore":
                    dropped += 1
                    continue
                values = [(1 if uncertain == "ones" else 0) if v == -1 else v for v in values]
            path = _resolve(folder, rel)
            if not presence.ok(path, at, rel):
                continue
            study = re.search(r"(study\d+)", rel)
            meta = demographics(sex=row["Sex"], age=row["Age"], view=row["AP/PA"] or fl)
            meta["frontal_lateral"] = fl
            meta["study"] = f"{m.group(1)}/{study.group(1)}" if study else None
            drafts.append(Record(rel, official, m.group(1), tuple(values), meta, str(path)))
            where.append(at)
    problems.check()
    records = assign_splits(drafts, policy)
    task = TaskSpec("multilabel", classes)
    if labels == "harmonised":
        records, task = harmonise.harmonise_records(records, classes, HARMONISED), harmonise.harmonised_task()
    notes = [harmonise.note(HARMONISED) if labels == "harmonised" else f"labels={','.join(classes)}",
             f"uncertain={uncertain}", f"views={views}",
             f"dropped_uncertain={dropped}" if uncertain == "ignore" else "", presence.note()]
    ds = PublicDataset(NAME, folder, records, task, where=where, policy=policy,
                       annotation_files=files, value_range=(0.0, 255.0), notes=notes)
    return finish(ds, problems)
