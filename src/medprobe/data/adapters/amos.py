"""AMOS 2022 (Ji et al., NeurIPS 2022 Datasets and Benchmarks): abdominal CT and MRI with
voxel labels of 15 organs, in the Decathlon layout (imagesTr/labelsTr + dataset.json).

Task: segmentation, 16 classes as named by dataset.json "labels": background, spleen,
right kidney, left kidney, gall bladder, esophagus, liver, stomach, aorta (spelled
"arota" in the release), postcava, pancreas, right adrenal gland, left adrenal gland,
duodenum, bladder, prostate/uterus (names are taken from the file as they are).
Modality: abdominal CT (Hounsfield units) and MRI, NIfTI .nii.gz. Geometry as for
msd: canonical orientation (axial slices in the radiological convention;
orientation=file keeps the file's axes), spacing=[d, h, w] resampling,
dataset.affine(i) / dataset.geometry(i). Intensity: window=[center, width] or a
preset (e.g. abdomen) for modality=ct; per-volume percentiles otherwise. modality=ct (default) | mri | all selects by case number:
amos_0001-0500 are CT and amos_0501-0600 MRI, as described in the AMOS paper (the
adapter relies on this numbering; it does not read a modality field).
Official split: "training" (imagesTr, 200 CT + 40 MRI) and "validation" (imagesVa,
100 CT + 20 MRI, labels released after the challenge); "test" has no public labels and
is not used. split=official uses validation as the test set and splits training by
patient into train and val.
Licence: CC BY 4.0.
Obtain: https://zenodo.org/records/7262581 (amos22.zip) or https://amos22.grand-challenge.org.

Layout (root = the amos22 folder):
  dataset.json  {"labels": {"0": "background", "1": "spleen", ...}, "training":
                [{"image": "./imagesTr/amos_0001.nii.gz", "label": "./labelsTr/amos_0001.nii.gz"},
                ...], "validation": [...], "test": [...]}
  imagesTr/, labelsTr/, imagesVa/, labelsVa/, imagesTs/
Records: one per labelled case; key and patient = the case name (amos_0001; each case is
treated as its own patient: the release has no patient ids). Metadata: modality (CT/MRI).
The per-case metadata spreadsheet of the AMOS release (age, sex, scanner) is not read.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Presence, Problems, assign_splits, details, finish,
                                            folder_root, split_policy)
from medprobe.data.adapters.msd import (DecathlonDataset, case_list, case_name, decathlon_records,
                                        geometry_options, label_names, read_dataset_json)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "amos"
FIRST_MRI = 501


def case_modality(name: str) -> str | None:
    """"CT" for amos_0001-0500, "MRI" for 0501 and above (None if the name has no number)."""
    m = re.search(r"(\d+)$", name)
    if not m:
        return None
    return "MRI" if int(m.group(1)) >= FIRST_MRI else "CT"


@register_adapter(NAME, "AMOS 2022: abdominal CT/MRI, 15-organ 3D segmentation (official train/validation)",
                  details(__doc__, official=True))
def build_amos(root: Path | None, modality: str = "ct", split: str = "official", split_seed: int = 0,
               split_fractions: Any = DEFAULT_FRACTIONS, val_fraction: float = 0.1,
               missing: str = "error", orientation: str = "canonical", spacing: Any = None,
               window: Any = None) -> ImageDataset:
    """Build AMOS from the amos22 folder ``root``."""
    folder = folder_root(NAME, root, "the amos22 folder holding dataset.json, imagesTr/ and labelsTr/")
    modality = option("modality", modality, str, choices=("ct", "mri", "all"))
    geometry = geometry_options(orientation, spacing, window)
    if window is not None and modality != "ct":
        raise ConfigError(f"option window: Hounsfield windows apply to CT; modality={modality} includes MRI "
                          f"(use modality=ct, or leave window out for percentile scaling)")
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    json_path = folder / "dataset.json"
    meta = read_dataset_json(json_path)
    classes = label_names(meta, json_path)
    drafts: list[Record] = []
    where: list[str] = []
    if policy.method == "official" and not meta.get("validation"):
        raise DataError(f"{json_path}: no labelled 'validation' list, so there is no official test set; use "
                        f"split=systematic or split=stratified")
    lists = [("training", "train")] + ([("validation", "test")] if meta.get("validation") else [])
    for key, official in lists:
        cases = [c for c in case_list(meta, key, json_path, problems, folder)
                 if modality == "all" or case_modality(case_name(c[1])) == modality.upper()]
        recs, at = decathlon_records(folder, cases, official, presence, {})
        drafts += [Record(r.key, r.split, r.patient_id, None, {"modality": case_modality(r.key)}, r.image_path,
                          r.mask_path) for r in recs]
        where += at
    problems.check()
    records = assign_splits(drafts, policy)
    ds = DecathlonDataset(NAME, folder, records, TaskSpec("segmentation", classes), where=where, policy=policy,
                          annotation_files=[json_path], notes=[f"modality={modality}", presence.note()], **geometry)
    return finish(ds, problems)
