"""BTCV / Synapse multi-organ abdominal CT (Landman et al., MICCAI 2015 "Beyond the Cranial
Vault" challenge): 30 labelled contrast-enhanced abdominal CTs (plus 20 unlabelled test CTs)
with voxel labels of 13 organs.

Task: segmentation. organs=all (default): 14 classes, background, spleen, right kidney,
left kidney, gallbladder, esophagus, liver, stomach, aorta, inferior vena cava, portal vein
and splenic vein, pancreas, right adrenal gland, left adrenal gland (the release's label
values 0..13); organs=transunet: the 8 organs of TransUNet's Synapse benchmark, re-numbered
1..8 as there: aorta, gallbladder, left kidney, right kidney, liver, pancreas, spleen,
stomach (the 5 other organs become background).
Modality: abdominal CT (Hounsfield units), NIfTI .nii.gz. Geometry as for msd: canonical
orientation (orientation=file keeps the file's axes), spacing=[d, h, w] resampling,
window=[center, width] or a preset for a fixed Hounsfield range (else per-volume
percentiles).
Official split: none from the challenge with labels (its 20 test CTs have no public
labels); split=official is the case split of TransUNet (Chen et al. 2021) used by most
published BTCV/Synapse results: test = cases 1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38 (12),
train = the other 18 (val_fraction carves a validation split out of train).
Licence: Synapse "Multi-Atlas Labeling Beyond the Cranial Vault" terms (registered Synapse
users; research use).
Obtain: https://www.synapse.org/#!Synapse:syn3193805 (Abdomen, RawData.zip).

Layout (root = the folder holding RawData/, or RawData/ itself, or its Training/ folder):
  RawData/Training/img/img0001.nii.gz ... img0040.nii.gz     (30 cases: 0001-0010, 0021-0040)
  RawData/Training/label/label0001.nii.gz ...                 (values 0..13)
  RawData/Testing/img/img0061.nii.gz ...                      (no labels; not used)
Records: one per labelled case; key and patient = the case (img0001; each case its own
patient: the release has no patient ids).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Presence, Problems, assign_splits, details, finish,
                                            folder_root, split_policy)
from medprobe.data.adapters.msd import DecathlonDataset, geometry_options
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.errors import DataError
from medprobe.options import option

NAME = "btcv"
ORGANS: tuple[str, ...] = ("background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver",
                           "stomach", "aorta", "inferior vena cava", "portal vein and splenic vein", "pancreas",
                           "right adrenal gland", "left adrenal gland")
#: TransUNet's 8 organs, in its order (label value in the release -> 1..8)
TRANSUNET: tuple[str, ...] = ("aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen",
                              "stomach")
TRANSUNET_TEST = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)


class BTCVDataset(DecathlonDataset):
    """Decathlon-style NIfTI reading with the release's label values mapped through ``lookup``."""

    def __init__(self, *args: Any, lookup: np.ndarray | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lookup = lookup

    def read_mask(self, index: int) -> np.ndarray:
        mask = super().read_mask(index)
        if self.lookup is None:
            return mask
        if mask.size and (mask.min() < 0 or mask.max() >= len(self.lookup)):
            raise DataError(f"{self.records[index].mask_path}: label values {np.unique(mask)[:10].tolist()} outside "
                            f"0..{len(self.lookup) - 1}")
        return self.lookup[mask]


def _training(folder: Path) -> Path:
    for d in (folder / "RawData" / "Training", folder / "Training", folder):
        if (d / "img").is_dir() and (d / "label").is_dir():
            return d
    raise DataError(f"{folder}: no Training/img and Training/label folders; expected the BTCV RawData layout "
                    "(RawData/Training/img/img0001.nii.gz, RawData/Training/label/label0001.nii.gz)")


@register_adapter(NAME, "BTCV (Synapse) abdomen: 30 CTs, 13-organ 3D segmentation (TransUNet split)",
                  details(__doc__, official=True))
def build_btcv(root: Path | None, organs: str = "all", split: str = "official", split_seed: int = 0,
               split_fractions: Any = DEFAULT_FRACTIONS, val_fraction: float = 0.0, missing: str = "error",
               orientation: str = "canonical", spacing: Any = None, window: Any = None) -> ImageDataset:
    """Build BTCV from the folder ``root`` holding RawData/Training."""
    folder = folder_root(NAME, root, "the BTCV folder holding RawData/Training/img and RawData/Training/label")
    organs = option("organs", organs, str, choices=("all", "transunet"))
    geometry = geometry_options(orientation, spacing, window)
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    training = _training(folder)
    drafts: list[Record] = []
    where: list[str] = []
    for image in sorted((training / "img").glob("img*.nii*")):
        m = re.fullmatch(r"img(\d+)\.nii(\.gz)?", image.name)
        if not m:
            continue
        label = training / "label" / image.name.replace("img", "label", 1)
        at = str(image)
        if not presence.ok(label, at, label.name, "label map"):
            continue
        case = f"img{m.group(1)}"
        split_name = "test" if int(m.group(1)) in TRANSUNET_TEST else "train"
        drafts.append(Record(case, split_name, case, None, {}, str(image), str(label)))
        where.append(at)
    problems.check()
    if not drafts:
        raise DataError(f"{training / 'img'}: no imgNNNN.nii.gz volumes found")
    records = assign_splits(drafts, policy)
    lookup = None
    classes = ORGANS
    if organs == "transunet":
        lookup = np.zeros(len(ORGANS), dtype=np.int64)
        for k, name in enumerate(TRANSUNET, start=1):
            lookup[ORGANS.index(name)] = k
        classes = ("background",) + TRANSUNET
    ds = BTCVDataset(NAME, folder, records, TaskSpec("segmentation", classes), where=where, policy=policy,
                     annotation_files=[Path(r.mask_path or "") for r in records],
                     notes=[f"organs={organs}", presence.note()], lookup=lookup, **geometry)
    return finish(ds, problems)
