"""Medical Segmentation Decathlon (Antonelli et al., Nature Communications 2022; Simpson et
al. 2019): ten 3D segmentation tasks, each a Task folder with a dataset.json.

Task: segmentation of the classes in dataset.json "labels" (0 = background). Tasks:
  Task01_BrainTumour   MRI, 4 channels (FLAIR, T1w, T1gd, T2w): edema, non-enhancing
                       tumor, enhancing tumour
  Task02_Heart         MRI: left atrium
  Task03_Liver         CT: liver, cancer
  Task04_Hippocampus   MRI: anterior, posterior
  Task05_Prostate      MRI, 2 channels (T2, ADC): peripheral zone, transition zone
  Task06_Lung          CT: cancer
  Task07_Pancreas      CT: pancreas, cancer
  Task08_HepaticVessel CT: vessel, tumour
  Task09_Spleen        CT: spleen
  Task10_Colon         CT: colon cancer primaries
Multi-channel tasks (4D images): channel= picks the modality index (default 0; its
name is in dataset.json "modality").
Modality: CT (Hounsfield units) or MRI, NIfTI .nii.gz volumes.
Geometry: volumes are brought to one canonical orientation (orientation=canonical,
default; from the affine, via RAS) and laid out as axial slices (D, H, W) in the
radiological convention (D inferior->superior, anterior up, patient's right on the
left); orientation=file keeps the file's axes with D the third NIfTI axis.
spacing=[d, h, w] (mm) resamples images (linear) and label maps (nearest).
dataset.affine(i) / dataset.geometry(i) give the voxel-to-world affine in the
returned order. Intensity: CT tasks take window=[center, width] (Hounsfield units)
or a preset (lung, mediastinum, abdomen, bone, brain); without it (and for MRI)
each volume is scaled by its own percentiles.
Official split: the labelled "training" cases only; the "test" cases have no public
labels and are not used.
Licence: CC BY-SA 4.0.
Obtain: http://medicaldecathlon.com (Task*.tar from the Google Drive / AWS links).

Layout (root = a Task folder, e.g. Task09_Spleen):
  dataset.json  {"name", "modality": {"0": "CT"}, "labels": {"0": "background", "1":
                "spleen"}, "numTraining", "training": [{"image": "./imagesTr/spleen_2.nii.gz",
                "label": "./labelsTr/spleen_2.nii.gz"}, ...], "test": ["./imagesTs/..."]}
  imagesTr/*.nii.gz, labelsTr/*.nii.gz (and imagesTs/; the archive's "._*" files are
  ignored as they are not listed)
Records: one per "training" entry; key and patient = the image file name without
.nii.gz (one case per patient as distributed). Metadata: modality (dataset.json).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Presence, Problems, PublicDataset, assign_splits,
                                            details, finish, folder_root, split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.readers import nifti_affine, read_nifti
from medprobe.data.volume import (PLANES, VolumeGeometry, describe_intensity, read_volume, spacing_option,
                                  window_range)
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "msd"
SLICE_AXIS = 2


def read_dataset_json(path: Path) -> dict[str, Any]:
    """The parsed dataset.json; DataError naming the file (and line) when absent or invalid."""
    if not path.is_file():
        raise DataError(f"{path}: not found; expected the dataset.json of a Decathlon-style folder "
                        f"(with 'labels' and 'training' entries)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg} (truncated file?)") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object with 'labels' and 'training'")
    return meta


def label_names(meta: dict[str, Any], path: Path) -> tuple[str, ...]:
    """Class names 0..C-1 from "labels": {"0": "background", ...} (or nnU-Net v2 {"background": 0})."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{path}: missing or empty 'labels'; expected e.g. {{\"0\": \"background\", \"1\": \"spleen\"}}")
    pairs: dict[int, str] = {}
    for k, v in labels.items():
        if str(k).strip().lstrip("-").isdigit():
            pairs[int(k)] = str(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            pairs[v] = str(k)
        else:
            raise DataError(f"{path}: 'labels' entry {k!r}: {v!r} is not an integer label with a name")
    if sorted(pairs) != list(range(len(pairs))) or len(pairs) < 2:
        raise DataError(f"{path}: 'labels' values are {sorted(pairs)}; expected 0..C-1 (0 = background, C >= 2)")
    return tuple(pairs[i] for i in range(len(pairs)))


def case_list(meta: dict[str, Any], key: str, path: Path, problems: Problems, root: Path
              ) -> list[tuple[str, Path, Path]]:
    """(where, image, label) of the labelled entries of list ``key`` (e.g. "training")."""
    entries = meta.get(key)
    if not isinstance(entries, list):
        raise DataError(f"{path}: missing list {key!r}; expected [{{\"image\": \"./imagesTr/x.nii.gz\", "
                        f"\"label\": \"./labelsTr/x.nii.gz\"}}, ...]")
    out = []
    for i, e in enumerate(entries):
        at = f"{path} {key}[{i}]"
        if not (isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("label"), str)):
            problems.add(f"{at}: entry {e!r}; expected {{\"image\": \"./imagesTr/....nii.gz\", "
                         f"\"label\": \"./labelsTr/....nii.gz\"}}")
            continue
        out.append((at, root / e["image"].removeprefix("./"), root / e["label"].removeprefix("./")))
    return out


def case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class DecathlonDataset(PublicDataset):
    """NIfTI volumes (D, H, W) with label maps; ``channel`` selects a modality of 4D images.

    ``orientation="canonical"`` (the adapters' default) reads through
    :func:`~medprobe.data.volume.read_volume` (canonical axial layout, ``spacing`` resampling,
    geometry per case); ``"file"`` keeps the file's axes. ``window`` sets a fixed Hounsfield
    ``value_range``. Orientation, spacing and intensity policy are part of the fingerprint.
    """

    def __init__(self, *args: Any, channel: int | None = None, orientation: str = "file",
                 spacing: tuple[float, float, float] | None = None, window: Any = None, **kwargs: Any) -> None:
        notes = list(kwargs.pop("notes", []))
        if orientation == "canonical":
            notes.append(f"orientation=canonical({PLANES[2]})")
            notes.append(f"spacing={list(spacing) if spacing else 'native'}")
        elif spacing is not None:
            raise ConfigError("option spacing resamples volumes read with orientation=canonical")
        notes.append(f"intensity={describe_intensity(window)}")
        super().__init__(*args, ndim=3, notes=notes, value_range=window_range(window, "option window"), **kwargs)
        self.channel = channel
        self.orientation = orientation
        self.spacing = spacing
        self.window = window
        self._geometry: dict[int, VolumeGeometry] = {}

    def read_image(self, index: int) -> np.ndarray:
        path = Path(self.records[index].image_path or "")
        if self.orientation == "canonical":
            image, self._geometry[index] = read_volume(path, spacing=self.spacing, channel=self.channel)
            return image
        if self.channel is None:
            return read_nifti(path, SLICE_AXIS)[0]
        import nibabel as nib
        try:
            img = nib.load(str(path))
            if len(img.shape) != 4:
                raise DataError(f"{path}: image has shape {img.shape}; expected a 4D multi-channel volume "
                                f"(dataset.json lists several modalities)")
            if self.channel >= img.shape[3]:
                raise DataError(f"{path}: channel {self.channel} requested but the image has {img.shape[3]}")
            data = np.asarray(img.dataobj[..., self.channel], dtype=np.float32)
        except DataError:
            raise
        except Exception as e:  # nibabel raises many types for corrupt files
            raise DataError(f"{path}: cannot read NIfTI file (corrupt or truncated?): {e}") from None
        if not np.isfinite(data).all():
            raise DataError(f"{path}: contains NaN or infinite values")
        return np.ascontiguousarray(np.transpose(data, (2, 0, 1)))

    def read_mask(self, index: int) -> np.ndarray:
        from medprobe.data.readers import read_mask
        path = self.records[index].mask_path or ""
        if self.orientation != "canonical":
            return read_mask(path, SLICE_AXIS)
        mask, geom = read_volume(path, spacing=self.spacing, mask=True)
        image = self.geometry(index)
        if not geom.agrees(image):
            raise DataError(f"{path}: label map grid {geom.shape} (affine {np.round(geom.affine, 3).tolist()}) "
                            f"differs from its image {self.records[index].image_path} {image.shape} (affine "
                            f"{np.round(image.affine, 3).tolist()})")
        return mask

    def geometry(self, index: int) -> VolumeGeometry:
        """Affine, spacing and orientation of record ``index`` and the way back to its file (canonical reading)."""
        if self.orientation != "canonical":
            raise DataError(f"{self.name}: geometry is recorded with orientation=canonical")
        if index not in self._geometry:
            self.load_image(index)
        return self._geometry[index]

    def affine(self, index: int) -> np.ndarray:
        """Voxel-to-world 4x4 affine of record ``index`` in (D, H, W) order."""
        if self.orientation == "canonical":
            return self.geometry(index).affine.copy()
        return nifti_affine(self.records[index].image_path or "", SLICE_AXIS)


def decathlon_records(folder: Path, cases: list[tuple[str, Path, Path]], split: str, presence: Presence,
                      meta: dict[str, Any]) -> tuple[list[Record], list[str]]:
    """Records (split ``split``) for the cases whose image and label files exist."""
    records, where = [], []
    for at, image, label in cases:
        if not (presence.ok(image, at, image.name) and presence.ok(label, at, label.name, "label map")):
            continue
        name = case_name(image)
        records.append(Record(name, split, name, None, dict(meta), str(image), str(label)))
        where.append(at)
    return records, where


@register_adapter(NAME, "Medical Segmentation Decathlon task folders (3D CT/MRI segmentation, dataset.json)",
                  details(__doc__, official=False))
def build_msd(root: Path | None, channel: int = 0, split: str = "systematic", split_seed: int = 0,
              split_fractions: Any = DEFAULT_FRACTIONS, missing: str = "error", orientation: str = "canonical",
              spacing: Any = None, window: Any = None) -> ImageDataset:
    """Build one Decathlon task from its Task folder ``root``."""
    folder = folder_root(NAME, root, "a Decathlon Task folder (e.g. Task09_Spleen) holding dataset.json")
    channel = option("channel", channel, int, minimum=0)
    geometry = geometry_options(orientation, spacing, window)
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    json_path = folder / "dataset.json"
    meta = read_dataset_json(json_path)
    classes = label_names(meta, json_path)
    modality = meta.get("modality") or {}
    modalities = [str(modality[k]) for k in sorted(modality, key=lambda k: int(k) if str(k).isdigit() else 0)] \
        if isinstance(modality, dict) else []
    multi = len(modalities) > 1 or str(meta.get("tensorImageSize", "")).upper() == "4D"
    if multi and modalities and channel >= len(modalities):
        raise ConfigError(f"option channel={channel}, but {json_path} lists {len(modalities)} modalities: "
                          f"{', '.join(f'{i}={m}' for i, m in enumerate(modalities))}")
    chosen = modalities[channel if multi else 0] if modalities else None
    if window is not None and str(chosen or "").upper() != "CT":
        raise ConfigError(f"option window: Hounsfield windows apply to CT, but {json_path} gives modality "
                          f"{chosen!r} for channel {channel if multi else 0}; leave window out (percentile scaling)")
    drafts, where = decathlon_records(folder, case_list(meta, "training", json_path, problems, folder), "",
                                      presence, {"modality": chosen})
    problems.check()
    records = assign_splits(drafts, policy)
    task_name = str(meta.get("name") or folder.name)
    ds = DecathlonDataset(NAME, folder, records, TaskSpec("segmentation", classes), where=where, policy=policy,
                          annotation_files=[json_path], name=f"msd_{folder.name}",
                          notes=[f"task={task_name}", f"channel={channel}" if multi else "", presence.note()],
                          channel=channel if multi else None, **geometry)
    return finish(ds, problems)


def geometry_options(orientation: Any, spacing: Any, window: Any) -> dict[str, Any]:
    """The checked ``orientation``, ``spacing`` and ``window`` options of a volume adapter."""
    orientation = option("orientation", orientation, str, choices=("canonical", "file"))
    window_range(window, "option window")
    return {"orientation": orientation, "spacing": spacing_option(spacing, "option spacing"), "window": window}
