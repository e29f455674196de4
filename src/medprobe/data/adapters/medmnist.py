"""The ``medmnist`` adapter: any MedMNIST v2 ``.npz`` file (2D or 3D, 28/64/128/224 px)."""
from __future__ import annotations

import hashlib
import re
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter, require_root
from medprobe.data.base import SPLITS, ImageDataset, Record, TaskSpec
from medprobe.errors import ConfigError, DataError, suggest


@dataclass(frozen=True)
class MedMNISTSet:
    """What the adapter knows about one MedMNIST v2 set (after the official INFO)."""

    kind: str  # binary | multiclass | multilabel (TaskSpec kinds)
    classes: tuple[str, ...]
    ndim: int
    modality: str
    licence: str = "CC BY 4.0"
    note: str = ""


_ORGANS_2D = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
              "lung-right", "pancreas", "spleen")

MEDMNIST_SETS: dict[str, MedMNISTSet] = {
    "pathmnist": MedMNISTSet("multiclass", ("adipose", "background", "debris", "lymphocytes", "mucus",
                                            "smooth muscle", "normal colon mucosa", "cancer-associated stroma",
                                            "colorectal adenocarcinoma epithelium"), 2,
                             "colon pathology (H&E, RGB; NCT-CRC-HE-100K / CRC-VAL-HE-7K)"),
    "chestmnist": MedMNISTSet("multilabel", ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass",
                                             "nodule", "pneumonia", "pneumothorax", "consolidation", "edema",
                                             "emphysema", "fibrosis", "pleural", "hernia"), 2,
                              "chest X-ray (NIH ChestX-ray14)", note="multi-label: 14 binary findings"),
    "dermamnist": MedMNISTSet("multiclass", ("actinic keratoses and intraepithelial carcinoma",
                                             "basal cell carcinoma", "benign keratosis-like lesions", "dermatofibroma",
                                             "melanoma", "melanocytic nevi", "vascular lesions"), 2,
                              "dermatoscopy (RGB; HAM10000)", licence="CC BY-NC 4.0"),
    "octmnist": MedMNISTSet("multiclass", ("choroidal neovascularization", "diabetic macular edema", "drusen",
                                           "normal"), 2, "retinal OCT"),
    "pneumoniamnist": MedMNISTSet("binary", ("normal", "pneumonia"), 2, "pediatric chest X-ray (Kermany et al.)"),
    "retinamnist": MedMNISTSet("multiclass", ("grade 0", "grade 1", "grade 2", "grade 3", "grade 4"), 2,
                               "fundus photography (RGB; DeepDRiD)",
                               note="ordinal regression of diabetic retinopathy grade 0-4, treated as 5-class; "
                                    "quadratic weighted kappa is the appropriate metric"),
    "breastmnist": MedMNISTSet("binary", ("malignant", "normal, benign"), 2, "breast ultrasound",
                               note="positive class (1) is normal/benign, negative (0) malignant"),
    "bloodmnist": MedMNISTSet("multiclass", ("basophil", "eosinophil", "erythroblast",
                                             "immature granulocytes (myelocytes, metamyelocytes and promyelocytes)",
                                             "lymphocyte", "monocyte", "neutrophil", "platelet"), 2,
                              "blood cell microscopy (RGB)"),
    "tissuemnist": MedMNISTSet("multiclass", ("collecting duct, connecting tubule", "distal convoluted tubule",
                                              "glomerular endothelial cells", "interstitial endothelial cells",
                                              "leukocytes", "podocytes", "proximal tubule segments",
                                              "thick ascending limb"), 2,
                               "kidney cortex microscopy (grayscale; BBBC051)"),
    "organamnist": MedMNISTSet("multiclass", _ORGANS_2D, 2, "abdominal CT, axial views (LiTS)"),
    "organcmnist": MedMNISTSet("multiclass", _ORGANS_2D, 2, "abdominal CT, coronal views (LiTS)"),
    "organsmnist": MedMNISTSet("multiclass", _ORGANS_2D, 2, "abdominal CT, sagittal views (LiTS)"),
    "organmnist3d": MedMNISTSet("multiclass", ("liver", "kidney-right", "kidney-left", "femur-right", "femur-left",
                                               "bladder", "heart", "lung-right", "lung-left", "spleen", "pancreas"),
                                3, "abdominal CT (LiTS)"),
    "nodulemnist3d": MedMNISTSet("binary", ("benign", "malignant"), 3, "chest CT (LIDC-IDRI)"),
    "adrenalmnist3d": MedMNISTSet("binary", ("normal", "hyperplasia"), 3, "adrenal gland shapes from abdominal CT"),
    "fracturemnist3d": MedMNISTSet("multiclass", ("buckle rib fracture", "nondisplaced rib fracture",
                                                  "displaced rib fracture"), 3, "chest CT (RibFrac)"),
    "vesselmnist3d": MedMNISTSet("binary", ("vessel", "aneurysm"), 3, "brain vessel shapes from MRA (IntrA)"),
    "synapsemnist3d": MedMNISTSet("binary", ("inhibitory synapse", "excitatory synapse"), 3,
                                  "electron microscopy (rat brain)"),
}


def _details() -> str:
    intro = (
        "MedMNIST v2 (Yang et al., Scientific Data 2023): 18 standardised biomedical image sets, 2D (28, 64, 128, "
        "224 px) and 3D (28, 64 voxels), with the official train/val/test split.",
        "root: the path of one .npz file as distributed, e.g. pneumoniamnist.npz, chestmnist_64.npz, "
        "organmnist3d.npz, with the keys {train,val,test}_images (uint8 (N,H,W), (N,H,W,3) or (N,D,H,W)) and "
        "{train,val,test}_labels ((N,1), or (N,14) for chestmnist).",
        "Obtain from https://zenodo.org/records/10519652 (or `pip install medmnist` and its download). "
        "Licence: CC BY 4.0, except DermaMNIST (CC BY-NC 4.0); cite the source datasets too.",
        "Option flag: the set name (e.g. flag=pneumoniamnist) when the file has been renamed; otherwise it is "
        "taken from the file name. RGB sets give (H, W, 3) images, 3D sets (D, H, W) volumes; intensities are "
        "0-255 (value_range = (0, 255)). MedMNIST has no patient ids: each image is its own patient "
        "(patient_id = the sample key), so patient-level analyses are not possible.",
    )
    lines = [textwrap.fill(p, 78) for p in intro] + ["Sets:"]
    for name, s in MEDMNIST_SETS.items():
        extra = "; ".join(x for x in (s.note, f"licence {s.licence}" if s.licence != "CC BY 4.0" else "") if x)
        text = f"{name} ({s.ndim}D, {s.kind}, {len(s.classes)} classes): {s.modality}" + (f"; {extra}" if extra else "")
        lines.append(textwrap.fill(text, 78, initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False))
    return "\n".join(lines)


def detect_flag(path: Path) -> str:
    """The MedMNIST set name from a file name such as ``chestmnist_64.npz``."""
    stem = path.name.lower()
    stem = stem[:-4] if stem.endswith(".npz") else stem
    stem = re.sub(r"_(28|64|128|224)$", "", stem)
    if stem in MEDMNIST_SETS:
        return stem
    raise ConfigError(f"{path}: cannot tell which MedMNIST set this file is from its name; pass the option "
                      f"flag=<set>. " + suggest(stem, MEDMNIST_SETS, "MedMNIST set"))


class MedMNISTDataset(ImageDataset):
    """A MedMNIST ``.npz`` file held in memory (uint8; converted to float32 per image)."""

    def __init__(self, path: Path, flag: str, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> None:
        info = MEDMNIST_SETS[flag]
        self.path, self.flag, self.info = path, flag, info
        self._images = images
        self._where: list[tuple[str, int]] = []
        records = []
        for split in SPLITS:
            lab = labels[split]
            for j in range(len(images[split])):
                key = f"{split}_{j:06d}"
                if info.kind == "multilabel":
                    label: Any = tuple(int(v) for v in lab[j])
                else:
                    label = int(lab[j, 0])
                records.append(Record(key, split, key, label))
                self._where.append((split, j))
        super().__init__(records, TaskSpec(info.kind, info.classes), name=flag, ndim=info.ndim,
                         source=f"medmnist:{path.name}")
        self.value_range = (0.0, 255.0) if all(a.dtype == np.uint8 for a in images.values()) else None

    def load_image(self, index: int) -> np.ndarray:
        split, j = self._where[index]
        return np.asarray(self._images[split][j], dtype=np.float32)

    def _content_digest(self) -> str:
        st = self.path.stat()
        return hashlib.sha256(f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.flag}".encode()).hexdigest()


def _load_npz(path: Path, flag: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    info = MEDMNIST_SETS[flag]
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            present = list(z.files)
            for split in SPLITS:
                for part in ("images", "labels"):
                    key = f"{split}_{part}"
                    if key not in present:
                        raise DataError(f"{path}: missing key {key!r}; a MedMNIST file holds "
                                        f"{{train,val,test}}_{{images,labels}}, this one has {present}")
                    (images if part == "images" else labels)[split] = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read .npz file (corrupt or not a NumPy archive?): {e}") from None
    for split in SPLITS:
        im, lab = images[split], labels[split]
        if info.ndim == 3 and im.ndim == 5 and im.shape[-1] == 1:
            im = images[split] = im[..., 0]
        ok = (im.ndim == 4) if info.ndim == 3 else (im.ndim == 3 or (im.ndim == 4 and im.shape[-1] == 3))
        if not ok:
            want = "(N, D, H, W)" if info.ndim == 3 else "(N, H, W) or (N, H, W, 3)"
            raise DataError(f"{path}: key '{split}_images' has shape {im.shape}; expected {want} for {flag}")
        if im.dtype.kind not in "uif":
            raise DataError(f"{path}: key '{split}_images' has dtype {im.dtype}; expected uint8 pixels")
        if lab.ndim == 1:
            lab = labels[split] = lab[:, None]
        width = len(info.classes) if info.kind == "multilabel" else 1
        if lab.ndim != 2 or lab.shape[1] != width or lab.shape[0] != im.shape[0]:
            raise DataError(f"{path}: key '{split}_labels' has shape {lab.shape}; expected ({im.shape[0]}, {width}) "
                            f"to match {im.shape[0]} images of {flag}")
        hi = 2 if info.kind == "multilabel" else len(info.classes)
        if lab.size and (lab.min() < 0 or lab.max() >= hi):
            raise DataError(f"{path}: key '{split}_labels' has values {int(lab.min())}..{int(lab.max())}; "
                            f"expected 0..{hi - 1} for {flag}")
    return images, labels


@register_adapter("medmnist", "MedMNIST v2 .npz files (18 sets, 2D and 3D, official splits)", _details())
def build_medmnist(root: Path | None, flag: str | None = None) -> ImageDataset:
    """Build a MedMNIST dataset from the ``.npz`` file ``root``."""
    path = require_root("medmnist", root, "the path of a MedMNIST .npz file, e.g. pneumoniamnist.npz")
    if not path.is_file():
        raise DataError(f"{path}: MedMNIST file not found" if not path.exists() else
                        f"{path}: is a folder; expected the path of a MedMNIST .npz file")
    if flag is None:
        flag = detect_flag(path)
    else:
        flag = str(flag).lower()
        flag = re.sub(r"_(28|64|128|224)$", "", flag)
        if flag not in MEDMNIST_SETS and flag + "mnist" in MEDMNIST_SETS:
            flag += "mnist"
        if flag not in MEDMNIST_SETS:
            raise ConfigError("option flag: " + suggest(flag, MEDMNIST_SETS, "MedMNIST set"))
    images, labels = _load_npz(path, flag)
    return MedMNISTDataset(path, flag, images, labels)
