"""Score segmentations made by other tools (nnU-Net, MONAI bundles, ...) exactly as medprobe scores its own.

``medprobe score --pred DIR --gt DIR --out DIR``: prediction and ground-truth label maps
(NIfTI, MHA/MHD/NRRD) are paired by case name (the file name without its extension); a file
without its counterpart is an error listing them. Both are read in the canonical orientation
(:func:`medprobe.data.volume.read_volume`), so files stored with different axis orders still
pair, and their grids must agree (shape and voxel-to-world affine, else an error naming both
files). Every case gets per-class Dice, Jaccard, HD95, ASSD and NSD at ``tolerance_mm``
(in mm, from the voxel spacing) with the chosen empty-mask convention; the class means get
percentile-bootstrap CIs over cases. The result is one ``done`` run in ``OUT/results.db``
(protocol ``score``, backbone = the model name, weights ``external``), its per-case values in
``OUT/predictions/<key>.npz`` and ``OUT/score/<key>/per_case.csv``, so ``medprobe report OUT``
shows an external model as a row beside medprobe's own. The run key is the digest of
everything that decides the numbers: the SHA-256 of every file, the labels, the tolerance,
the empty convention, the bootstrap settings.
"""
from __future__ import annotations

import csv
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.volume import ITK_EXTENSIONS, read_volume
from medprobe.errors import ConfigError, DataError
from medprobe.identity import digest
from medprobe.metrics import (EMPTY_CONVENTIONS, SURFACE_METRICS, MetricValue, aggregate_cases,
                              segmentation_metrics)

LABEL_SUFFIXES = (".nii.gz", ".nii") + ITK_EXTENSIONS
PROTOCOL = "score"
VERSION = 1


def case_name(path: Path) -> str | None:
    """The case name of a label-map file (its name without the extension); None for other files."""
    name = path.name
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _label_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise ConfigError(f"--{what}: {folder} is not a folder" if folder.exists() else f"--{what}: {folder} not found")
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        name = case_name(f) if f.is_file() and not f.name.startswith(".") else None
        if name is None:
            continue
        if name in out:
            raise DataError(f"{folder}: case {name!r} is there twice ({out[name].name} and {f.name})")
        out[name] = f
    if not out:
        raise DataError(f"{folder}: no label maps ({', '.join(LABEL_SUFFIXES)}) in the --{what} folder")
    return out


def pair_files(pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
    """``(case, prediction, ground truth)`` by case name; an error names every unpaired file."""
    preds, gts = _label_files(pred_dir, "pred"), _label_files(gt_dir, "gt")
    no_gt = sorted(set(preds) - set(gts))
    no_pred = sorted(set(gts) - set(preds))
    if no_gt or no_pred:
        parts = []
        if no_pred:
            parts.append(f"no prediction in {pred_dir} for {len(no_pred)} ground-truth case(s): "
                         f"{', '.join(gts[c].name for c in no_pred[:10])}")
        if no_gt:
            parts.append(f"no ground truth in {gt_dir} for {len(no_gt)} prediction(s): "
                         f"{', '.join(preds[c].name for c in no_gt[:10])}")
        raise DataError("; ".join(parts) + " (files are paired by name without the extension)")
    return [(c, preds[c], gts[c]) for c in sorted(preds)]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ScoreResult:
    key: str
    metrics: list[MetricValue]
    per_case: dict[str, list[MetricValue]]
    class_names: tuple[str, ...]
    files: list[Path] = field(default_factory=list)
    reused: bool = False  # the run was already in results.db (same key)


def _class_names(labels: Sequence[str] | None, top: int) -> tuple[str, ...]:
    if labels is None:
        return ("background",) + tuple(f"class_{k}" for k in range(1, max(top, 1) + 1))
    names = tuple(str(x) for x in labels)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(f"--labels: give the names of classes 0..C-1 (background first, C >= 2, no repeats), "
                          f"got {list(names)}")
    if top >= len(names):
        raise DataError(f"the label maps hold label {top} but --labels names only classes 0..{len(names) - 1} "
                        f"({', '.join(names)})")
    return names


def score_folders(pred_dir: str | Path, gt_dir: str | Path, out_dir: str | Path, *,
                  labels: Sequence[str] | None = None, tolerance_mm: float = 1.0, empty: str = "one",
                  include_background: bool = False, bootstrap: int = 1000, seed: int = 0,
                  model: str | None = None, dataset: str | None = None) -> ScoreResult:
    """Score every prediction in ``pred_dir`` against its ground truth; record it in ``out_dir``."""
    from medprobe.experiment.lock import OutputLock
    from medprobe.predictions import Predictions, SplitPredictions, write_predictions
    from medprobe.results.store import ResultsStore, RunRecord

    if empty not in EMPTY_CONVENTIONS:
        raise ConfigError(f"--empty must be one of {', '.join(EMPTY_CONVENTIONS)}, got {empty!r}")
    if not (np.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ConfigError(f"--tolerance-mm must be a number >= 0, got {tolerance_mm}")
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {bootstrap}")
    pred_dir, gt_dir, out = Path(pred_dir), Path(gt_dir), Path(out_dir)
    pairs = pair_files(pred_dir, gt_dir)
    t0 = time.perf_counter()
    cases = []
    for case, p, g in pairs:
        pred, gp = read_volume(p, mask=True)
        truth, gg = read_volume(g, mask=True)
        if not gp.agrees(gg):
            raise DataError(f"{p} and {g}: the prediction's grid differs from the ground truth's: "
                            f"shape {gp.shape} vs {gg.shape}, spacing {np.round(gp.spacing, 4).tolist()} vs "
                            f"{np.round(gg.spacing, 4).tolist()}, affine {np.round(gp.affine, 3).tolist()} vs "
                            f"{np.round(gg.affine, 3).tolist()} (orientation {gp.source_orientation} vs "
                            f"{gg.source_orientation}); resample the prediction onto the ground-truth grid")
        for arr, f in ((pred, p), (truth, g)):
            if arr.size and arr.min() < 0:
                raise DataError(f"{f}: negative label {int(arr.min())}; expected labels 0..C-1")
        cases.append((case, p, g, pred, truth, gg.spacing))
    top = max(int(max(c[3].max(), c[4].max())) for c in cases)
    names = _class_names(labels, top)
    options = {"labels": list(names), "tolerance_mm": float(tolerance_mm), "empty": empty,
               "include_background": bool(include_background), "surface": list(SURFACE_METRICS),
               "bootstrap": int(bootstrap), "bootstrap_seed": int(seed)}
    gt_files = {c[0]: file_sha256(c[2]) for c in cases}
    pred_files = {c[0]: file_sha256(c[1]) for c in cases}
    model = model or pred_dir.resolve().name
    dataset = dataset or gt_dir.resolve().name
    dataset_identity = {"kind": "label maps", "name": dataset, "files": gt_files}
    backbone_identity = {"kind": "external predictions", "name": model, "files": pred_files}
    config = {"protocol": PROTOCOL, "version": VERSION, "options": options, "dataset": dataset_identity}
    key, config_key = digest({"config": config, "backbone": backbone_identity, "seed": 0}), digest(config)

    per_case: dict[str, list[MetricValue]] = {}
    for case, p, g, pred, truth, spacing in cases:
        per_case[case] = segmentation_metrics(pred, truth, len(names), names, include_background=include_background,
                                              spacing=spacing, surface=SURFACE_METRICS, tolerance_mm=tolerance_mm,
                                              empty=empty)
    metrics = aggregate_cases(list(per_case.values()), bootstrap=bootstrap, seed=seed)
    for m in metrics:
        if m.cls is None and m.metric in ("dice", "jaccard", "nsd"):
            m.note = "; ".join(x for x in (m.note, f"empty-mask convention: empty={empty}") if x)
    wall = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    with OutputLock(out, "medprobe score"):
        pred_path = out / "predictions" / f"{key}.npz"
        columns: dict[str, np.ndarray] = {}
        order = list(per_case)
        for row, case in enumerate(order):
            for m in per_case[case]:
                col = m.metric if m.cls is None else f"{m.metric}.{m.cls}"
                columns.setdefault(col, np.full(len(order), np.nan))[row] = np.nan if m.value is None else m.value
        predictions = Predictions("segmentation", "segmentation", names)
        predictions.splits["test"] = SplitPredictions(order, order, columns)
        sha = write_predictions(predictions, pred_path)
        files.append(pred_path)
        files.append(_write_per_case(out / "score" / key / "per_case.csv", order, columns, pairs))
        record = RunRecord(key=key, experiment=out.resolve().name, dataset=dataset, backbone=model, weights="external",
                           protocol=PROTOCOL, variant=f"score {model}", params=options, seed=0,
                           config_key=config_key, options=options, backbone_key=digest(backbone_identity),
                           backbone_identity=backbone_identity, dataset_key=digest(dataset_identity),
                           env=_environment())
        info: dict[str, Any] = {"cases": len(order), "pred_dir": str(pred_dir.resolve()),
                                "gt_dir": str(gt_dir.resolve()), "empty": empty, "tolerance_mm": tolerance_mm,
                                "spacing_mm": {c[0]: [round(v, 6) for v in c[5]] for c in cases},
                                "per_case_csv": str(files[-1].relative_to(out))}
        store = ResultsStore(out / "results.db")
        try:
            reused = not store.start(record)  # done already: the same files and settings, the same numbers
            if not reused:
                store.finish(key, metrics, "test", info, wall, predictions=(str(pred_path.relative_to(out)), sha))
        finally:
            store.close()
    files.insert(0, out / "results.db")
    return ScoreResult(key, metrics, per_case, names, files, reused)


def _write_per_case(path: Path, order: list[str], columns: dict[str, np.ndarray],
                    pairs: list[tuple[str, Path, Path]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    files = {c: (p.name, g.name) for c, p, g in pairs}
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case", "prediction", "ground_truth", *columns])
        for row, case in enumerate(order):
            w.writerow([case, *files[case], *(f"{columns[c][row]:.6g}" for c in columns)])
    return path


def _environment() -> dict[str, Any]:
    import platform
    from importlib import metadata

    from medprobe import __version__
    versions = {}
    for pkg in ("numpy", "scipy", "nibabel", "SimpleITK"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"medprobe": __version__, "python": platform.python_version(), "packages": versions}
