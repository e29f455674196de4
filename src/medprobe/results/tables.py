"""Results as tables: the long metric table, configuration labels and the aggregate over seeds.

A *configuration* is everything that decides a unit's numbers except its seed: the runner
records it as ``config_key`` (protocol, version, complete resolved options, dataset and
evaluation settings) and the backbone as ``backbone_key``. Seeds of one configuration and
backbone are aggregated; different configurations are never pooled, whatever their labels.
Labels are derived from the options that actually differ between the configurations that
share a protocol label (``variant``) on a dataset, so two fine-tuning ``lr`` show as
``finetune lr=0.001`` and ``finetune lr=0.0001``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medprobe.identity import flatten
from medprobe.results.store import connect_readonly

HEADLINE = ("auroc", "dice_jaccard_mean", "dice", "rouge_l", "accuracy")
SUMMARY_COLUMNS = ["dataset", "backbone", "weights", "protocol", "variant", "metric", "mean", "sd", "n", "ci_low",
                   "ci_high", "note", "config_key", "backbone_key", "headline_metric"]


def _columns(conn) -> set[str]:
    return {r[1] for r in conn.execute("PRAGMA table_info(runs)")}


def load_results(output_dir: str | Path) -> pd.DataFrame:
    """All finished metrics joined with their run: one row per (run, split, metric, class), with the
    derived configuration label in ``variant`` (the protocol's own short label is ``protocol_label``)."""
    conn = connect_readonly(Path(output_dir) / "results.db")
    try:
        have = _columns(conn)
        extra = [c for c in ("config_key", "options_json", "settings_json", "backbone_key", "dataset_key")
                 if c in have]
        cols = ", ".join(f"r.{c}" for c in extra)
        df = pd.read_sql_query(
            "SELECT r.key AS run_key, r.experiment, r.dataset, r.backbone, r.weights, r.protocol, r.variant, "
            f"r.params_json, r.seed, r.wall_s, r.info_json, {cols + ', ' if cols else ''}m.split, m.metric, m.class, "
            "m.value, m.ci_low, m.ci_high, m.note FROM runs r JOIN metrics m ON m.run_key = r.key "
            "WHERE r.status = 'done' ORDER BY r.dataset, r.backbone, r.started_at, m.metric, r.seed", conn)
    finally:
        conn.close()
    for c in ("config_key", "options_json", "settings_json", "backbone_key", "dataset_key"):
        if c not in df:
            df[c] = None
    # rows of an older results.db: the configuration is what its key hashed (labels and params)
    legacy = df["config_key"].isna()
    df.loc[legacy, "config_key"] = ("legacy:" + df.loc[legacy, "protocol"] + ":" + df.loc[legacy, "variant"] + ":"
                                    + df.loc[legacy, "params_json"].fillna(""))
    df.loc[df["backbone_key"].isna(), "backbone_key"] = ("legacy:" + df["backbone"] + ":" + df["weights"])
    df["protocol_label"] = df["variant"]
    df["variant"] = derive_labels(df)
    df["headline_metric"] = [_info_headline(t) for t in df["info_json"]]
    return df


def _info_headline(text: Any) -> str | None:
    """The dataset's headline metric the runner recorded in a unit's info (None for older runs)."""
    try:
        info = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return None
    value = info.get("headline_metric") if isinstance(info, dict) else None
    return value if isinstance(value, str) else None


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def derive_labels(df: pd.DataFrame) -> pd.Series:
    """The configuration label of every row: the protocol label plus the options that differ between
    the configurations sharing it on the same dataset (and the config key when even those agree)."""
    labels = pd.Series(df["variant"].values, index=df.index, dtype=object)
    if df.empty:
        return labels
    for (_, _, _), group in df.groupby(["dataset", "protocol", "variant"], sort=False):
        configs = group.drop_duplicates("config_key")
        if len(configs) < 2:
            continue
        leaves = {}
        settings = configs["settings_json"] if "settings_json" in configs else [None] * len(configs)
        for ck, raw, run_raw in zip(configs["config_key"], configs["options_json"], settings):
            leaves[ck] = _leaves(raw, run_raw)
        names = sorted({k for v in leaves.values() for k in v})
        differ = [k for k in names if len({json.dumps(v.get(k), sort_keys=True) for v in leaves.values()}) > 1]
        base = group["variant"].iloc[0]
        text = {ck: " ".join([base] + [f"{k}={_value(leaves[ck].get(k, '-'))}" for k in differ]) for ck in leaves}
        if len(set(text.values())) < len(text):  # same options, other settings (image size, data...): say which
            text = {ck: f"{t} [config {ck[:6]}]" for ck, t in text.items()}
        for ck, t in text.items():
            labels.loc[group.index[group["config_key"] == ck]] = t
    return labels


def _leaves(options_json: Any, settings_json: Any) -> dict[str, Any]:
    """Flat options of a configuration plus its run-level settings (image size...); a setting whose name is
    also an option's is shown as ``run.<name>``."""
    def load(text: Any) -> dict[str, Any]:
        try:
            value = json.loads(text) if isinstance(text, str) else {}
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    out = flatten(load(options_json)) if load(options_json) else {}
    for k, v in flatten(load(settings_json)).items() if load(settings_json) else []:
        out[f"run.{k}" if k in out else k] = v
    return out


def _sd(v: pd.Series) -> float:
    v = v.dropna()
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _notes(v: pd.Series) -> str | None:
    notes = [n for n in dict.fromkeys(v.dropna()) if n]
    return "; ".join(notes) if notes else None


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n over seeds and the mean bootstrap CI, per dataset × backbone × configuration × metric
    (macro rows only). A metric undefined in some seeds is averaged over the others (``n`` counts them);
    undefined in all seeds it is NaN, shown as "n/a" with the reason in ``note``."""
    agg = df[df["class"].isna()] if not df.empty else df
    if agg.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    g = agg.groupby(["dataset", "backbone", "backbone_key", "weights", "protocol", "config_key", "variant", "metric"],
                    sort=False, dropna=False)
    out = g.agg(mean=("value", "mean"), sd=("value", _sd), n=("value", "count"), ci_low=("ci_low", "mean"),
                ci_high=("ci_high", "mean"), note=("note", _notes), seeds=("seed", "nunique"),
                headline_metric=("headline_metric", "first")).reset_index()
    out["note"] = [n if isinstance(n, str) and n else None for n in out["note"]]  # pandas fills NaN for none
    partial = (out["n"] > 0) & (out["n"] < out["seeds"])
    out.loc[partial, "note"] = [f"undefined in {s - n} of {s} seeds" + (f": {note}" if note else "")
                                for s, n, note in zip(out.loc[partial, "seeds"], out.loc[partial, "n"],
                                                      out.loc[partial, "note"])]
    return out[SUMMARY_COLUMNS]


def headline_metric(summary: pd.DataFrame, dataset: str) -> str | None:
    """The dataset's headline metric: the one its runs recorded (``medprobe.data.headline``: kappa for
    APTOS, AUPRC for the RAD-DINO sets, the dataset entry's ``headline_metric``...) when present, else
    the first of :data:`HEADLINE` with at least one defined value."""
    sub = summary[summary["dataset"] == dataset]
    present = set(sub["metric"])
    if "headline_metric" in sub:
        recorded = [m for m in dict.fromkeys(sub["headline_metric"].dropna()) if m in present]
        if recorded:
            return recorded[0]
    defined = set(sub.loc[sub["mean"].notna(), "metric"])
    return next((m for m in HEADLINE if m in defined), next((m for m in HEADLINE if m in present), None))


def fmt(mean: float, sd: float, n: int, lo: float | None, hi: float | None) -> str:
    """``mean ± sd [lo, hi]``; ``n/a`` for an undefined value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    s = f"{mean:.3f}"
    if n > 1:
        s += f" ± {sd:.3f}"
    if lo is not None and hi is not None and lo == lo and hi == hi:
        s += f" [{lo:.3f}, {hi:.3f}]"
    return s
