"""``medprobe export-predictions``: every stored classification prediction of an output folder as one CSV.

One row per unit, split, sample and class: binary units have one row per sample with an
empty ``class``; multiclass and multi-label units one row per sample and class, ``target`` being
the 0/1 one-vs-rest truth of that class. Scores are written with full precision (``repr`` of
the stored value), so every metric in ``results.db`` can be recomputed from the file.
Every predictions file is checked against its recorded SHA-256 before anything is written.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medprobe.errors import ConfigError, DataError
from medprobe.fsutil import atomic_write
from medprobe.predictions import Predictions
from medprobe.results.runs import RunInfo, load_predictions, load_runs

COLUMNS = ("run_key", "dataset", "backbone", "protocol", "label_text", "seed", "split", "sample_key", "patient_id",
           "class", "target", "score")


@dataclass
class ExportSummary:
    path: Path
    rows: int = 0
    units: int = 0
    skipped: list[str] = field(default_factory=list)  # "unit: why" for done units without classification predictions


def _fmt(v: float) -> str:
    return repr(float(v))


def prediction_rows(run: RunInfo, pred: Predictions) -> Iterator[tuple]:
    """The CSV rows of one unit's classification predictions."""
    head = (run.key, run.dataset, run.backbone, run.protocol, run.label, run.seed)
    for split, sp in pred.splits.items():
        if "target" not in sp.columns or "score" not in sp.columns:
            raise DataError(f"predictions of unit {run.key}: split {split!r} has no target/score columns")
        y, s = np.asarray(sp.columns["target"]), np.asarray(sp.columns["score"])
        if pred.task == "binary":
            if s.ndim != 1:
                raise DataError(f"predictions of unit {run.key}: binary scores of split {split!r} have shape {s.shape}")
            for i, (k, p) in enumerate(zip(sp.keys, sp.patient_ids)):
                yield head + (split, k, p, "", str(int(y[i])), _fmt(s[i]))
            continue
        if s.ndim != 2 or s.shape[1] != len(pred.class_names):
            raise DataError(f"predictions of unit {run.key}: scores of split {split!r} have shape {s.shape} for "
                            f"{len(pred.class_names)} classes")
        truth = (y[:, None] == np.arange(s.shape[1])) if pred.task == "multiclass" else y.astype(bool)
        for i, (k, p) in enumerate(zip(sp.keys, sp.patient_ids)):
            for c, name in enumerate(pred.class_names):
                yield head + (split, k, p, name, str(int(truth[i, c])), _fmt(s[i, c]))


def export_predictions(output_dir: str | Path, out: str | Path) -> ExportSummary:
    """Write the CSV (atomically); all predictions files are verified first, so a damaged one writes nothing."""
    output_dir, out = Path(output_dir), Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as predictions.csv")
    summary = ExportSummary(out)
    loaded: list[tuple[RunInfo, Predictions]] = []
    for run in load_runs(output_dir):
        if not run.has_predictions:
            summary.skipped.append(f"{run.key} ({run.dataset} / {run.backbone} / {run.label} seed {run.seed}): "
                                   "no stored predictions")
            continue
        pred = load_predictions(output_dir, run)
        if pred.kind != "classification":
            summary.skipped.append(f"{run.key} ({run.label}): {pred.kind} predictions (not classification)")
            continue
        loaded.append((run, pred))
    def write(fh) -> None:  # streamed: the CSV of a large experiment never sits in memory
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        writer = csv.writer(text)
        writer.writerow(COLUMNS)
        for run, pred in loaded:
            for row in prediction_rows(run, pred):
                writer.writerow(row)
                summary.rows += 1
            summary.units += 1
        text.flush()
        text.detach()

    try:
        atomic_write(out, write)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    return summary
