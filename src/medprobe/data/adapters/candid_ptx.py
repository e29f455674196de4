"""CANDID-PTX (Feng et al., Radiology: AI 2021; Dunedin Hospital, New Zealand): 19,237 chest
X-rays with free-text reports and run-length-encoded segmentations of pneumothorax,
chest tubes and acute rib fractures.

Task: target = pneumothorax (default) | chest_tube | rib_fracture; task=segmentation
(default): background, <target> (all of an image's masks are merged); task=
classification: binary, positive when the image has a mask for the target. labels=harmonised
(with task=classification; target is then not used): the 18 torchxrayvision findings with
Pneumothorax from the pneumothorax masks; the 17 others are missing -- the acute rib
fracture masks are not mapped to Fracture, since an image without one may show an old
fracture (see medprobe.data.harmonise).
Modality: chest X-ray (DICOM as distributed; PNG/JPEG copies are also read;
value_range None: scaled by percentiles).
Official split: none.
Licence: CANDID-PTX data use agreement with the University of Otago (research only;
access after an ethics course and signed DUA).
Obtain: https://doi.org/10.17608/k6.auckland.14173982 (via the authors' request form).

Layout (root = the downloaded folder):
  Pneumothorax_reports.csv  columns SOPInstanceUID, EncodedPixels (RLE, or -1 for no
                            pneumothorax; several rows for several masks), and
                            usually filename (its part before the first "_" is the
                            patient index), StudyInstanceUID and Report
  chest_tube.csv            columns anon_SOPUID and mask_rle (or EncodedPixels)
  acute_rib_fracture.csv    the same columns as chest_tube.csv
  dataset/<SOPInstanceUID>  the images, found by name anywhere under root (also
                            <SOPInstanceUID>.dcm, .png or .jpg)
Every image listed in Pneumothorax_reports.csv is a record; chest_tube.csv and
acute_rib_fracture.csv list the images with that finding (absent or -1 = none).
RLE: the SIIM-ACR pneumothorax encoding. The mask (H, W) of the image is numbered
column by column (pixel index = column * H + row, from 0). EncodedPixels is a list of
whitespace-separated pairs "offset length"; with rle=relative (default; the SIIM
stage-1 form used by CANDID-PTX's decoders) the first offset is the index of the
first run's first pixel and each later offset counts from the pixel just after the
previous run; with rle=absolute (the Kaggle/SIIM stage-2 form) each offset is the
1-based index of the run's first pixel. H, W are the image's own (read with it).
Records: key = SOPInstanceUID; patient = the filename prefix (else the SOPInstanceUID).
Metadata: none besides the target flags pneumothorax / chest_tube / rib_fracture (0/1).
Uncertain: the relative vs absolute RLE form is inferred from public decoders of this
set (choose rle=absolute if masks come out scattered); the header of the chest tube
and rib fracture files varies between copies (both column spellings are accepted).
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, FileIndex, Presence, Problems, PublicDataset,
                                            assign_splits, details, finish, folder_root, read_table, split_policy)
from medprobe.data import harmonise
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.readers import read_dicom, read_image
from medprobe.errors import ConfigError, DataError
from medprobe.options import option

NAME = "candid_ptx"
REPORTS = "Pneumothorax_reports.csv"
TARGET_FILES = {"chest_tube": "chest_tube.csv", "rib_fracture": "acute_rib_fracture.csv"}
TARGETS = ("pneumothorax", "chest_tube", "rib_fracture")


def parse_rle(text: str) -> list[int] | None:
    """The integers of an RLE string; [] for "-1"/empty (no mask); None when malformed."""
    s = text.strip()
    if s in ("", "-1"):
        return []
    parts = s.split()
    if not all(p.isdigit() for p in parts) or len(parts) % 2:
        return None
    values = [int(p) for p in parts]
    if any(length == 0 for length in values[1::2]):
        return None
    return values


def row_rle(row: dict[str, str], column: str, at: str, problems: Problems) -> list[int] | None:
    """:func:`parse_rle` of ``row[column]``; a malformed value is a problem naming the row (and None)."""
    values = parse_rle(row[column])
    if values is None:
        problems.add(f"{at}: {column} is not an RLE (pairs of non-negative integers 'offset length', length "
                     f"> 0) or -1: {row[column][:60]!r}")
    return values


def decode_rle(values: list[int], shape: tuple[int, int], mode: str = "relative") -> np.ndarray:
    """A (H, W) 0/1 mask from RLE pairs (see the module notes); ValueError when a run overflows."""
    h, w = shape
    flat = np.zeros(h * w, dtype=np.uint8)
    pos = 0
    for offset, length in zip(values[0::2], values[1::2]):
        start = pos + offset if mode == "relative" else offset - 1
        if start < 0 or start + length > h * w:
            raise ValueError(f"run {offset} {length} ends at pixel {start + length}, beyond the {h} x {w} image")
        flat[start:start + length] = 1
        pos = start + length
    return flat.reshape(w, h).T.copy()


class CandidDataset(PublicDataset):
    """Images by file type (DICOM or PNG/JPEG); masks decoded from the CSV runs."""

    def __init__(self, *args: Any, runs: list[list[tuple[str, list[int]]]], rle: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs, self.rle = runs, rle

    def read_image(self, index: int) -> np.ndarray:
        path = self.records[index].image_path or ""
        if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg"):
            return read_image(path)
        return read_dicom(path)

    def read_mask(self, index: int) -> np.ndarray:
        image = self.read_image(index)
        shape = (int(image.shape[0]), int(image.shape[1]))
        out = np.zeros(shape, dtype=np.int64)
        for at, values in self.runs[index]:
            try:
                out |= decode_rle(values, shape, self.rle)
            except ValueError as e:
                raise DataError(f"{at}: RLE does not fit image {self.records[index].image_path} ({e}); expected "
                                f"rle={self.rle} runs (try rle={'absolute' if self.rle == 'relative' else 'relative'})"
                                ) from None
        return out


def _target_runs(path: Path, problems: Problems) -> dict[str, list[tuple[str, list[int]]]]:
    table = read_table(path, (), problems, what="a CANDID-PTX finding file (anon_SOPUID, mask_rle)", all_columns=True)
    id_col = next((c for c in ("anon_SOPUID", "SOPInstanceUID") if c in table.header), None)
    rle_col = next((c for c in ("mask_rle", "EncodedPixels") if c in table.header), None)
    if id_col is None or rle_col is None:
        raise DataError(f"{path}: missing column {'anon_SOPUID' if id_col is None else 'mask_rle'}; expected the "
                        f"columns anon_SOPUID and mask_rle (or SOPInstanceUID and EncodedPixels); columns present: "
                        f"{', '.join(h for h in table.header if h)}")
    out: dict[str, list[tuple[str, list[int]]]] = defaultdict(list)
    for row in table.rows:
        at = table.where(row)
        values = row_rle(row, rle_col, at, problems)
        if values is None:
            continue
        if row[id_col] and values:
            out[row[id_col]].append((at, values))
    return out


def _find(index: FileIndex, uid: str) -> Path | None:
    for name in (uid, f"{uid}.dcm", f"{uid}.png", f"{uid}.jpg"):
        p = index.get(name)
        if p is not None:
            return p
    return None


#: labels=harmonised: the pneumothorax masks give Pneumothorax
HARMONISED: dict[str, tuple[str, ...]] = {"Pneumothorax": ("pneumothorax",)}


@register_adapter(NAME, "CANDID-PTX: chest X-rays, RLE masks of pneumothorax, chest tubes, rib fractures",
                  details(__doc__, official=False))
def build_candid_ptx(root: Path | None, target: str = "pneumothorax", task: str = "segmentation",
                     rle: str = "relative", split: str = "systematic", split_seed: int = 0,
                     split_fractions: Any = DEFAULT_FRACTIONS, missing: str = "error",
                     labels: str = "native") -> ImageDataset:
    """Build CANDID-PTX from the folder ``root`` holding Pneumothorax_reports.csv."""
    folder = folder_root(NAME, root, f"the CANDID-PTX folder holding {REPORTS}")
    target = option("target", target, str, choices=TARGETS)
    task = option("task", task, str, choices=("segmentation", "classification"))
    labels = harmonise.labels_option(labels, NAME)
    if labels == "harmonised":
        if task != "classification":
            raise ConfigError("option labels=harmonised gives image-level findings; use it with task=classification")
        target = "pneumothorax"
    rle = option("rle", rle, str, choices=("relative", "absolute"))
    policy = split_policy(split, split_seed, split_fractions)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    reports = read_table(folder / REPORTS, ("SOPInstanceUID", "EncodedPixels"), problems,
                         what="the CANDID-PTX report file (SOPInstanceUID, EncodedPixels, ...)",
                         optional=("filename",))
    files = [reports.path]
    runs: dict[str, dict[str, list[tuple[str, list[int]]]]] = {t: defaultdict(list) for t in TARGETS}
    order: list[str] = []
    first: dict[str, str] = {}
    patient: dict[str, str] = {}
    for row in reports.rows:
        at = reports.where(row)
        uid = row["SOPInstanceUID"]
        if not uid:
            problems.add(f"{at}: empty SOPInstanceUID")
            continue
        values = row_rle(row, "EncodedPixels", at, problems)
        if values is None:
            continue
        if uid not in first:
            order.append(uid)
            first[uid] = at
            m = re.match(r"([^_]+)_", row["filename"])
            patient[uid] = m.group(1) if m else uid
        if values:
            runs["pneumothorax"][uid].append((at, values))
    for t, fname in TARGET_FILES.items():
        path = folder / fname
        if path.is_file() or t == target:
            runs[t].update(_target_runs(path, problems))
            files.append(path)
    index = FileIndex(folder)
    drafts, where, kept_runs = [], [], []
    for uid in order:
        at = first[uid]
        path = _find(index, uid)
        if not presence.ok(path, at, uid):
            continue
        flags = {t: int(bool(runs[t].get(uid))) for t in TARGETS if t == "pneumothorax" or TARGET_FILES[t] in
                 {f.name for f in files}}
        seg = task == "segmentation"
        drafts.append(Record(uid, "", patient[uid], None if seg else flags[target], flags, str(path),
                             str(reports.path if target == "pneumothorax" else folder / TARGET_FILES[target])
                             if seg else None))
        where.append(at)
        kept_runs.append(runs[target].get(uid, []))
    problems.check()
    records = assign_splits(drafts, policy)
    spec = TaskSpec("segmentation", ("background", target)) if task == "segmentation" else \
        TaskSpec("binary", (f"no {target}", target))
    if labels == "harmonised":
        records, spec = harmonise.harmonise_records(records, ("pneumothorax",), HARMONISED), harmonise.harmonised_task()
    ds = CandidDataset(NAME, folder, records, spec, where=where, policy=policy, annotation_files=files,
                       notes=[f"target={target}", f"task={task}", f"rle={rle}", presence.note(),
                              harmonise.note(HARMONISED) if labels == "harmonised" else ""],
                       runs=kept_runs, rle=rle)
    return finish(ds, problems)
