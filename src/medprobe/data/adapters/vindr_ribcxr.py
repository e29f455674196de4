"""VinDr-RibCXR (Nguyen et al., MIDL 2021): 245 frontal chest X-rays (a subset of VinDr-CXR)
with polygons of the 20 individual ribs (right R1-R10, left L1-L10), drawn by radiologists.

Task: segmentation. ribs=each (default): 21 classes, background then R1..R10, L1..L10;
ribs=merged: background, rib. Masks are rasterised from the polygons (filled, vertices rounded
to whole pixels, in the image's own size); where two rib polygons overlap the later one in the
order R1..R10, L1..L10 wins. A rib marked "None" (not visible) has no pixels.
Modality: chest X-ray, PNG (value_range None: scaled by percentiles).
Official split: train (196 images) / val (49; the paper's test set): split=official gives
train and test (val_fraction carves a validation split out of train).
Licence: VinDr-RibCXR, PhysioNet-style research use (see vindr.ai/datasets/ribcxr; the
release's own licence file rules).
Obtain: https://vindr.ai/datasets/ribcxr (VinDr-RibCXR zip).

Layout (root = the extracted folder holding data/, or data/ itself):
  data/train/img/VinDr_RibCXR_train_000.png ...
  data/train/Vindr_RibCXR_train_mask.json    pandas "columns" JSON: {"img": {"0": image path},
      "R1": {"0": [{"x": .., "y": ..}, ...] or "None"}, ..., "L10": {...}}
  data/val/img/..., data/val/Vindr_RibCXR_val_mask.json
The img values (e.g. data/train/img/VinDr_RibCXR_train_000.png) are resolved against root,
its parent, or the split's img/ folder by file name.
Records: one per image; key = split/file name; patient = the file name (the release has no
patient ids).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.adapters._common import (DEFAULT_FRACTIONS, Presence, Problems, PublicDataset, assign_splits,
                                            details, finish, folder_root, read_image, split_policy)
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.errors import DataError
from medprobe.options import option

NAME = "vindr_ribcxr"
RIBS: tuple[str, ...] = tuple(f"R{i}" for i in range(1, 11)) + tuple(f"L{i}" for i in range(1, 11))
SPLITS = {"train": "train", "val": "test"}

Polygon = list[tuple[float, float]]


def rasterise(polygons: list[Polygon | None], shape: tuple[int, int], values: list[int]) -> np.ndarray:
    """A (H, W) label map: polygon ``k`` filled with ``values[k]`` (in order; later ones win), 0 elsewhere."""
    from PIL import Image, ImageDraw
    canvas = Image.new("I", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, v in zip(polygons, values):
        if poly:
            draw.polygon([(round(x), round(y)) for x, y in poly], fill=int(v), outline=int(v))
    return np.asarray(canvas, dtype=np.int64)


def _polygon(value: Any, where: str) -> Polygon | None:
    if value is None or value == "None":
        return None
    if not isinstance(value, list) or not value or not all(isinstance(p, dict) and "x" in p and "y" in p
                                                           for p in value):
        raise DataError(f"{where}: expected a list of points {{'x': .., 'y': ..}} or \"None\", got {str(value)[:80]}")
    try:
        return [(float(p["x"]), float(p["y"])) for p in value]
    except (TypeError, ValueError):
        raise DataError(f"{where}: point coordinates must be numbers, got {str(value)[:80]}") from None


class RibDataset(PublicDataset):
    """Images read from PNG; rib masks rasterised from the polygons kept per record."""

    def __init__(self, *args: Any, polygons: list[list[Polygon | None]], merged: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.polygons, self.merged = polygons, merged

    def read_mask(self, index: int) -> np.ndarray:
        image = read_image(self.records[index].image_path or "")
        values = [1] * len(RIBS) if self.merged else list(range(1, len(RIBS) + 1))
        return rasterise(self.polygons[index], (int(image.shape[0]), int(image.shape[1])), values)


def _data_folder(folder: Path) -> Path:
    for d in (folder / "data", folder):
        if (d / "train").is_dir():
            return d
    raise DataError(f"{folder}: no data/train folder; expected the VinDr-RibCXR release (data/train/img, "
                    "data/train/Vindr_RibCXR_train_mask.json, data/val/...)")


@register_adapter(NAME, "VinDr-RibCXR: 245 chest X-rays with polygons of the 20 ribs (segmentation)",
                  details(__doc__, official=True))
def build_vindr_ribcxr(root: Path | None, ribs: str = "each", split: str = "official", split_seed: int = 0,
                       split_fractions: Any = DEFAULT_FRACTIONS, val_fraction: float = 0.0,
                       missing: str = "error") -> ImageDataset:
    """Build VinDr-RibCXR from the folder ``root`` holding data/train and data/val."""
    folder = folder_root(NAME, root, "the VinDr-RibCXR folder holding data/train and data/val")
    ribs = option("ribs", ribs, str, choices=("each", "merged"))
    policy = split_policy(split, split_seed, split_fractions, val_fraction, official=True)
    problems = Problems(NAME)
    presence = Presence(missing, problems)
    data = _data_folder(folder)
    drafts, where, polys, files = [], [], [], []
    for split_dir, official in SPLITS.items():
        path = data / split_dir / f"Vindr_RibCXR_{split_dir}_mask.json"
        if not path.is_file():
            found = sorted((data / split_dir).glob("*mask*.json")) if (data / split_dir).is_dir() else []
            if not found:
                if split_dir == "val":
                    continue
                raise DataError(f"{path}: not found; expected the rib polygon file of the {split_dir} split")
            path = found[0]
        files.append(path)
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(table, dict) or "img" not in table or not isinstance(table["img"], dict):
            raise DataError(f"{path}: expected a JSON object with an 'img' column (index -> image path) and one "
                            f"column per rib ({', '.join(RIBS)})")
        absent = [r for r in RIBS if r not in table]
        if absent:
            raise DataError(f"{path}: rib column(s) {', '.join(absent)} missing")
        for idx, rel in sorted(table["img"].items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else kv[0]):
            at = f"{path} row {idx}"
            try:
                shapes = [_polygon(table[r].get(idx), f"{at} rib {r}") for r in RIBS]
            except DataError as e:
                problems.add(str(e))
                continue
            name = Path(str(rel)).name
            candidates = [folder / str(rel), folder.parent / str(rel), data / split_dir / "img" / name]
            image = next((c for c in candidates if c.is_file()), candidates[-1])
            if not presence.ok(image, at, str(rel)):
                continue
            drafts.append(Record(f"{split_dir}/{name}", official, Path(name).stem, None, {}, str(image), str(path)))
            where.append(at)
            polys.append(shapes)
    problems.check()
    records = assign_splits(drafts, policy)
    classes = ("background", "rib") if ribs == "merged" else ("background",) + RIBS
    ds = RibDataset(NAME, folder, records, TaskSpec("segmentation", classes), where=where, policy=policy,
                    annotation_files=files, notes=[f"ribs={ribs}", presence.note()], polygons=polys,
                    merged=ribs == "merged")
    return finish(ds, problems)
