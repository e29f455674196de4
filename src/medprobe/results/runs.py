"""Finished units of an output folder and their stored per-sample predictions (read-only).

Everything computed from predictions (export, paired comparisons, subgroups, calibration)
starts here: :func:`load_runs` lists the ``done`` units of ``OUTPUT_DIR/results.db`` with the
identities the runner recorded, and :func:`load_predictions` reads a unit's predictions file,
checking it against the SHA-256 recorded in its row.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medprobe.errors import DataError
from medprobe.predictions import Predictions, read_predictions
from medprobe.results.store import connect_readonly

_COLUMNS = ("key", "dataset", "backbone", "weights", "protocol", "variant", "params_json", "seed", "config_key",
            "options_json", "backbone_key", "dataset_key", "predictions", "predictions_sha256")


@dataclass
class RunInfo:
    """One ``done`` unit: its labels, the identities its key came from and its predictions reference."""

    key: str
    dataset: str
    backbone: str
    weights: str
    protocol: str
    variant: str
    params: dict[str, Any]
    seed: int
    config_key: str | None
    options: dict[str, Any]
    backbone_key: str | None
    dataset_key: str | None
    predictions: str | None
    predictions_sha256: str | None
    label: str = field(default="")

    @property
    def has_predictions(self) -> bool:
        return bool(self.predictions)


def label_text(run: RunInfo) -> str:
    """The label a unit is shown under in exported files and tables (set by :func:`load_runs`)."""
    return getattr(run, "label", None) or run.variant


def derived_labels(runs: list[RunInfo]) -> list[str]:
    """The tables' configuration labels of ``runs`` (:func:`medprobe.results.tables.derive_labels`)."""
    import json

    import pandas as pd

    from medprobe.results.tables import derive_labels
    if not runs:
        return []
    df = pd.DataFrame({"dataset": [r.dataset for r in runs], "protocol": [r.protocol for r in runs],
                       "variant": [r.variant for r in runs],
                       "config_key": [r.config_key or f"legacy:{r.protocol}:{r.variant}:{json.dumps(r.params, sort_keys=True)}"
                                      for r in runs],
                       "options_json": [json.dumps(r.options) if r.options else None for r in runs]})
    return list(derive_labels(df))


def load_runs(output_dir: str | Path) -> list[RunInfo]:
    """The ``done`` units of ``OUTPUT_DIR/results.db``, ordered by dataset, protocol, label, backbone, seed."""
    db = Path(output_dir) / "results.db"
    conn = connect_readonly(db)
    try:
        have = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        cols = [c if c in have else f"NULL AS {c}" for c in _COLUMNS]
        rows = conn.execute(f"SELECT {', '.join(cols)} FROM runs WHERE status = 'done'").fetchall()
    except sqlite3.DatabaseError as e:
        raise DataError(f"cannot read the runs of {db}: {e}") from None
    finally:
        conn.close()
    out = []
    for r in rows:
        d = dict(zip(_COLUMNS, r))
        run = RunInfo(key=d["key"], dataset=d["dataset"], backbone=d["backbone"], weights=d["weights"],
                      protocol=d["protocol"], variant=d["variant"], params=_loads(d["params_json"]),
                      seed=int(d["seed"]), config_key=d["config_key"], options=_loads(d["options_json"]),
                      backbone_key=d["backbone_key"], dataset_key=d["dataset_key"], predictions=d["predictions"],
                      predictions_sha256=d["predictions_sha256"])
        out.append(run)
    for run, label in zip(out, derived_labels(out)):
        run.label = label
    out.sort(key=lambda r: (r.dataset, r.protocol, r.label, r.backbone, r.seed, r.key))
    return out


def load_predictions(output_dir: str | Path, run: RunInfo) -> Predictions:
    """The predictions file of ``run``, verified against its recorded SHA-256 (a DataError naming the
    file when it is missing, damaged or replaced)."""
    if not run.predictions:
        raise DataError(f"unit {run.key} ({run.dataset} / {run.backbone} / {run.label} seed {run.seed}) has no "
                        "stored predictions (written by an older medprobe, or a protocol that keeps none)")
    if not run.predictions_sha256:
        raise DataError(f"unit {run.key}: results.db names the predictions file {run.predictions} but records no "
                        "checksum for it; rerun the unit")
    path = Path(output_dir) / run.predictions
    if not path.is_file():
        raise DataError(f"predictions file {path} of unit {run.key} ({run.dataset} / {run.backbone} / {run.label} "
                        f"seed {run.seed}) is missing; rerun the unit (delete its row or the output folder)")
    return read_predictions(path, run.predictions_sha256)


def metric_values(output_dir: str | Path, split: str = "test") -> dict[tuple[str, str, str], float | None]:
    """``{(run_key, metric, class or ""): value}`` of the metrics table for ``split``."""
    conn = connect_readonly(Path(output_dir) / "results.db")
    try:
        rows = conn.execute("SELECT run_key, metric, IFNULL(class, ''), value FROM metrics WHERE split = ?",
                            (split,)).fetchall()
    finally:
        conn.close()
    return {(k, m, c): v for k, m, c, v in rows}


def _loads(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
