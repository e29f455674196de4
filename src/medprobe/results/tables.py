"""Results as tables: the long metric table and its aggregate over seeds."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

from medprobe.errors import MedprobeError

HEADLINE = ("auroc", "dice_jaccard_mean", "dice", "accuracy")


def load_results(output_dir: str | Path) -> pd.DataFrame:
    """All finished metrics joined with their run: one row per (run, split, metric, class)."""
    db = Path(output_dir) / "results.db"
    if not db.is_file():
        raise MedprobeError(f"no results database at {db}; run `medprobe run FILE.yaml` first")
    with sqlite3.connect(db) as conn:
        df = pd.read_sql_query(
            "SELECT r.key AS run_key, r.experiment, r.dataset, r.backbone, r.weights, r.protocol, r.variant, "
            "r.params_json, r.seed, r.wall_s, r.info_json, m.split, m.metric, m.class, m.value, m.ci_low, m.ci_high, "
            "m.note FROM runs r JOIN metrics m ON m.run_key = r.key WHERE r.status = 'done' "
            "ORDER BY r.dataset, r.backbone, r.started_at, m.metric, r.seed", conn)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n over seeds, and the mean bootstrap CI, per dataset × backbone × variant × metric (macro)."""
    agg = df[df["class"].isna()]
    if agg.empty:
        return pd.DataFrame(columns=["dataset", "backbone", "weights", "protocol", "variant", "metric", "mean", "sd", "n",
                                     "ci_low", "ci_high"])
    g = agg.groupby(["dataset", "backbone", "weights", "protocol", "variant", "metric"], sort=False)
    out = g.agg(mean=("value", "mean"), sd=("value", lambda v: float(np.std(v, ddof=1)) if v.count() > 1 else 0.0),
                n=("value", "count"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean")).reset_index()
    return out


def headline_metric(summary: pd.DataFrame, dataset: str) -> str | None:
    present = set(summary.loc[summary["dataset"] == dataset, "metric"])
    return next((m for m in HEADLINE if m in present), None)


def fmt(mean: float, sd: float, n: int, lo: float | None, hi: float | None) -> str:
    if mean != mean:
        return "n/a"
    s = f"{mean:.3f}"
    if n > 1:
        s += f" ± {sd:.3f}"
    if lo is not None and hi is not None and lo == lo and hi == hi:
        s += f" [{lo:.3f}, {hi:.3f}]"
    return s
