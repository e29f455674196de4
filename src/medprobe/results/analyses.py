"""Paired backbone comparisons, subgroup metrics and calibration of a finished output folder.

Plain data for the terminal, CSV/JSON and the HTML/markdown report: every function returns a
list of dicts (one per table row) computed from the stored predictions (:mod:`medprobe.results.runs`)
with :mod:`medprobe.results.stats`; nothing is rerun.

Pairing. Units are compared when they share ``config_key`` (same protocol, resolved options,
params, dataset content and evaluation settings; seed and backbone excluded) and differ in
``backbone_key``. Every pair of backbones of a configuration gives one *primary* row: the
difference of the metric averaged over the seeds both backbones ran (the number a paper
reports), on the test samples matched by sample key. Its uncertainty is that of the test set:
a paired bootstrap by patient applies one resample-index matrix to every seed of both
backbones. For a binary AUROC on samples of distinct patients the p-value is DeLong's test of
the same seed-mean contrast (exact covariance of all the correlated AUCs); otherwise (other
metrics, a macro AUROC over classes, repeated patients, for which DeLong's independence
assumption fails) it is the bootstrap p-value, and DeLong is shown as secondary. Holm's
correction runs over the primary rows of one table (one metric): all configurations and
backbone pairs. Rows with ``detail`` set (per seed, per class) carry unadjusted p-values and
are descriptive; the spread of per-seed differences (training randomness) is given as
``seed_diffs`` on the primary row.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.errors import ConfigError, DataError
from medprobe.fsutil import slug
from medprobe.metrics import CLASSIFICATION_METRICS
from medprobe.predictions import Predictions, SplitPredictions
from medprobe.results import stats
from medprobe.results.runs import RunInfo, load_predictions, load_runs


@dataclass
class _Loaded:
    run: RunInfo
    pred: Predictions
    split: SplitPredictions


def _classification_runs(output_dir: Path, split: str) -> tuple[list[_Loaded], list[str]]:
    """Done units with classification predictions on ``split`` (checksums verified), and notes on the others."""
    loaded, notes = [], []
    for run in load_runs(output_dir):
        if not run.has_predictions:
            notes.append(f"{run.dataset} / {run.backbone} / {run.label} seed {run.seed}: no stored predictions")
            continue
        pred = load_predictions(output_dir, run)
        if pred.kind != "classification":
            continue
        if split not in pred.splits:
            notes.append(f"{run.dataset} / {run.backbone} / {run.label} seed {run.seed}: no {split} predictions")
            continue
        loaded.append(_Loaded(run, pred, pred.splits[split]))
    return loaded, notes


def _check_metric(metric: str) -> None:
    if metric not in CLASSIFICATION_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(CLASSIFICATION_METRICS)}")


def _aligned(items: list[_Loaded]) -> tuple[list[str], list[str], np.ndarray, list[np.ndarray]] | str:
    """Keys, patient ids, targets and per-item scores in the first item's sample order; a reason string
    when the items do not hold the same samples with the same targets."""
    ref = items[0].split
    keys = list(ref.keys)
    if len(set(keys)) != len(keys):
        return f"duplicate sample keys in unit {items[0].run.key}"
    y = np.asarray(ref.columns["target"])
    scores = []
    for it in items:
        sp = it.split
        if set(sp.keys) != set(keys):
            only = len(set(sp.keys) ^ set(keys))
            return (f"test samples differ between units {items[0].run.key} and {it.run.key} "
                    f"({only} keys in one only)")
        pos = {k: i for i, k in enumerate(sp.keys)}
        order = np.array([pos[k] for k in keys])
        if not np.array_equal(np.asarray(sp.columns["target"])[order], y):
            return f"targets differ between units {items[0].run.key} and {it.run.key} on the same samples"
        scores.append(np.asarray(sp.columns["score"], dtype=np.float64)[order])
    return keys, list(ref.patient_ids), y, scores


def _config_groups(loaded: list[_Loaded]) -> dict[str, dict[str, dict[int, _Loaded]]]:
    """``{config_key: {backbone_key: {seed: unit}}}`` (units without identities are left out)."""
    groups: dict[str, dict[str, dict[int, _Loaded]]] = defaultdict(lambda: defaultdict(dict))
    for it in loaded:
        if it.run.config_key and it.run.backbone_key:
            groups[it.run.config_key][it.run.backbone_key][it.run.seed] = it
    return groups


def _nan_to_none(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _nan_to_none(v) for k, v in row.items()}


# --------------------------------------------------------------------------- paired comparison
def compare_table(output_dir: str | Path, metric: str = "auroc", *, bootstrap: int = 2000, seed: int = 0,
                  alpha: float = 0.05, split: str = "test", per_seed: bool = False,
                  per_class: bool = False) -> list[dict[str, Any]]:
    """Paired differences between backbones for every configuration (see the module docstring).

    Row keys: dataset, protocol, label, config_key, metric, class, detail, backbone_a, backbone_b,
    seeds, n_samples, n_patients, resampled_by, value_a, value_b, diff, ci_low, ci_high, test, p,
    p_bootstrap, p_delong, p_holm, seed_diffs, valid_resamples, note. Undefined numbers are None.
    """
    _check_metric(metric)
    output_dir = Path(output_dir)
    loaded, _ = _classification_runs(output_dir, split)
    rows: list[dict[str, Any]] = []
    for config_key, by_backbone in _config_groups(loaded).items():
        if len(by_backbone) < 2:
            continue
        order = sorted(by_backbone, key=lambda b: (next(iter(by_backbone[b].values())).run.backbone, b))
        for ka, kb in combinations(order, 2):
            rows += _compare_pair(config_key, by_backbone[ka], by_backbone[kb], metric, bootstrap, seed, alpha,
                                  per_seed, per_class)
    primary = [i for i, r in enumerate(rows) if not r["detail"]]
    adjusted = stats.holm([rows[i]["p"] if rows[i]["p"] is not None else math.nan for i in primary])
    for i, p in zip(primary, adjusted):
        rows[i]["p_holm"] = None if math.isnan(p) else float(p)
    rows.sort(key=lambda r: (r["dataset"], r["protocol"], r["label"], r["backbone_a"], r["backbone_b"],
                             r["detail"] or "", str(r["class"] or ""), str(r["seeds"])))
    return rows


def _compare_pair(config_key: str, a: dict[int, _Loaded], b: dict[int, _Loaded], metric: str, bootstrap: int,
                  seed: int, alpha: float, per_seed: bool, per_class: bool) -> list[dict[str, Any]]:
    seeds = sorted(set(a) & set(b))
    first = next(iter(a.values()))
    base = {"dataset": first.run.dataset, "protocol": first.run.protocol, "label": first.run.label,
            "config_key": config_key, "metric": metric, "class": None, "detail": None,
            "backbone_a": first.run.backbone, "backbone_b": next(iter(b.values())).run.backbone, "seeds": seeds,
            "n_samples": None, "n_patients": None, "resampled_by": None, "value_a": None, "value_b": None,
            "diff": None, "ci_low": None, "ci_high": None, "test": None, "p": None, "p_bootstrap": None,
            "p_delong": None, "p_holm": None, "seed_diffs": [], "valid_resamples": None, "note": None}
    unmatched = sorted((set(a) | set(b)) - set(seeds))
    if not seeds:
        return [dict(base, note=f"no common seed (A: {sorted(a)}, B: {sorted(b)}); not compared")]
    items = [a[s] for s in seeds] + [b[s] for s in seeds]
    aligned = _aligned(items)
    if isinstance(aligned, str):
        return [dict(base, note=aligned + "; not compared")]
    keys, pids, y, scores = aligned
    task, names = first.pred.task, first.pred.class_names
    if metric == "kappa" and task == "multilabel":
        return [dict(base, note="kappa is not defined for multi-label tasks")]
    k = len(seeds)
    sa, sb = scores[:k], scores[k:]
    rs = stats.resampler(pids, bootstrap, seed)
    notes = [f"seeds {unmatched} ran for one backbone only; not compared"] if unmatched else []
    base.update(n_samples=len(keys), n_patients=len(set(pids)), resampled_by="patient" if rs.by_patient else "sample")
    rows = [_paired_row(base, y, sa, sb, task, metric, rs, alpha, None, notes)]
    if per_seed and k > 1:
        for i, s in enumerate(seeds):
            rows.append(_paired_row(dict(base, seeds=[s]), y, [sa[i]], [sb[i]], task, metric, rs, alpha, "seed", []))
    if per_class and task != "binary" and metric == "auroc":
        for c, name in enumerate(names):
            if task == "multiclass" or (y[:, c] >= 0).all():
                yc = (y == c) if task == "multiclass" else y[:, c]
                rows.append(_paired_row(dict(base, **{"class": name}), yc.astype(np.int64), [s[:, c] for s in sa],
                                        [s[:, c] for s in sb], "binary", metric, rs, alpha, "class", []))
            else:  # a multi-label column with missing targets (-1): scored as one masked column, bootstrap only
                rows.append(_paired_row(dict(base, **{"class": name}), y[:, c:c + 1].astype(np.int64),
                                        [s[:, c:c + 1] for s in sa], [s[:, c:c + 1] for s in sb], "multilabel",
                                        metric, rs, alpha, "class",
                                        [f"{int((y[:, c] < 0).sum())} samples without a target for this class "
                                         "left out (missing labels)"]))
    return rows


def _paired_row(base: dict[str, Any], y: np.ndarray, sa: list[np.ndarray], sb: list[np.ndarray], task: str,
                metric: str, rs: stats.Resampler, alpha: float, detail: str | None, notes: list[str]) -> dict:
    res = stats.paired_bootstrap(y, sa, sb, task, metric, rs, alpha)
    row = dict(base, detail=detail, value_a=res.value_a, value_b=res.value_b, diff=res.diff, ci_low=res.ci_low,
               ci_high=res.ci_high, p_bootstrap=res.p, seed_diffs=res.seed_diffs, valid_resamples=res.valid_resamples,
               test="bootstrap", p=res.p)
    notes = list(notes)
    if metric == "auroc" and task == "binary":
        dl = stats.delong_test(y, sa, sb)
        row["p_delong"] = dl.p
        if rs.by_patient:
            notes.append(f"{row['n_samples']} samples of {row['n_patients']} patients: bootstrap by patient is "
                         "the test; DeLong (independent samples) shown for reference")
        elif not math.isnan(dl.p):
            row.update(test="delong", p=dl.p)
    if res.valid_resamples < rs.resamples:
        notes.append(f"{rs.resamples - res.valid_resamples} of {rs.resamples} resamples left out (metric undefined)")
    if math.isnan(res.diff):
        notes.append("metric undefined on the test samples")
    row["note"] = "; ".join(notes) or None
    return _clean(row)


# --------------------------------------------------------------------------- subgroups
MISSING = "(missing)"


def _metadata_values(it: _Loaded, column: str, external: Mapping[str, Any] | None) -> np.ndarray | None:
    if external is not None:
        return np.array([str(external.get(k, "")) if external.get(k) is not None else "" for k in it.split.keys])
    col = it.split.metadata.get(column)
    if col is None:
        return None
    if col.dtype.kind == "f":
        return np.array(["" if np.isnan(v) else (str(int(v)) if float(v).is_integer() else str(v)) for v in col])
    return col.astype(str)


def subgroup_table(output_dir: str | Path, column: str, metric: str = "auroc", *, bootstrap: int = 1000,
                   seed: int = 0, alpha: float = 0.05, split: str = "test", max_groups: int = 20,
                   metadata: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """``metric`` per value of metadata ``column`` for every configuration x backbone (seed mean), with
    patient-bootstrap CIs, and one ``row == "gap"`` row per configuration x backbone: best minus worst
    group (groups where the metric is defined; missing values reported as ``(missing)``, not in the gap).

    The column comes from the predictions' ``metadata`` or, when given, from ``metadata``:
    ``{sample_key: value}`` (e.g. read from a CSV).
    """
    _check_metric(metric)
    output_dir = Path(output_dir)
    loaded, _ = _classification_runs(output_dir, split)
    by_unit: dict[tuple[str, str], dict[int, _Loaded]] = defaultdict(dict)
    for it in loaded:
        by_unit[(it.run.config_key or it.run.key, it.run.backbone_key or it.run.backbone)][it.run.seed] = it
    rows: list[dict[str, Any]] = []
    found = False
    for (_, _), units in by_unit.items():
        items = [units[s] for s in sorted(units)]
        first = items[0]
        base = {"dataset": first.run.dataset, "protocol": first.run.protocol, "label": first.run.label,
                "backbone": first.run.backbone, "seeds": sorted(units), "column": column, "metric": metric}
        values = _metadata_values(first, column, metadata)
        if values is None:
            continue
        found = True
        aligned = _aligned(items)
        if isinstance(aligned, str):
            rows.append(dict(base, row="gap", group=None, note=aligned))
            continue
        keys, pids, y, scores = aligned
        groups = np.where(values == "", MISSING, values)
        distinct = sorted(set(groups.tolist()))
        if len(distinct) > max_groups:
            raise ConfigError(f"metadata column {column!r} has {len(distinct)} distinct values (more than "
                              f"{max_groups}); bin it first (e.g. age_bin instead of age)")
        if metric == "kappa" and first.pred.task == "multilabel":
            raise ConfigError("kappa is not defined for multi-label tasks; choose auroc, auprc, accuracy...")
        rs = stats.resampler(pids, bootstrap, seed)
        res = stats.subgroup_metrics(y, scores, first.pred.task, metric, groups, rs, alpha, exclude_from_gap=[MISSING])
        for g in res.groups:
            n_pos = _positives(y[groups == g.group], first.pred.task)
            note = "metric undefined in this group (a class is absent)" if math.isnan(g.value) else None
            rows.append(_clean(dict(base, row="group", group=g.group, n=g.n, n_patients=g.n_patients, n_positive=n_pos,
                                    value=g.value, ci_low=g.ci_low, ci_high=g.ci_high, note=note)))
        note = None if res.worst else "fewer than 2 groups with a defined metric"
        rows.append(_clean(dict(base, row="gap", group=f"{res.best} - {res.worst}" if res.worst else None,
                                n=len(keys), n_patients=len(set(pids)), n_positive=_positives(y, first.pred.task),
                                value=res.gap, ci_low=res.gap_ci[0], ci_high=res.gap_ci[1], worst=res.worst,
                                best=res.best, note=note)))
    if not found and loaded:
        raise DataError(f"no stored predictions carry a metadata column {column!r}; pass --metadata FILE.csv "
                        "(columns sample_key and the column) or rerun with a medprobe whose protocols store metadata")
    rows.sort(key=lambda r: (r["dataset"], r["protocol"], r["label"], r["backbone"], r["row"] == "gap",
                             str(r.get("group"))))
    return rows


def _positives(y: np.ndarray, task: str) -> int:
    return int((y == 1).sum()) if task == "binary" else int(len(y)) if task == "multiclass" else \
        int((y == 1).any(1).sum())


# --------------------------------------------------------------------------- calibration
def calibration_summary(output_dir: str | Path, *, bins: int = 10, threshold: str = "youden",
                        target_sensitivity: float | None = None, alpha: float = 0.05,
                        split: str = "test") -> list[dict[str, Any]]:
    """ECE, Brier score and an operating point per unit (per class for multi-label).

    The threshold is chosen on the unit's validation predictions (``youden``, or ``sensitivity`` with
    ``target_sensitivity``) and applied to ``split``; sensitivity and specificity there come with
    Wilson intervals. Units without validation predictions get no threshold (never chosen on test).
    Multiclass units: top-label ECE and multiclass Brier, no threshold.
    """
    output_dir = Path(output_dir)
    if threshold not in ("youden", "sensitivity"):
        raise ConfigError(f"unknown threshold method {threshold!r}; choose youden or sensitivity")
    if threshold == "sensitivity" and (target_sensitivity is None or not 0 < target_sensitivity <= 1):
        raise ConfigError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
    loaded, _ = _classification_runs(output_dir, split)
    rows = []
    for it in loaded:
        for row in _calibration_rows(it, bins, threshold, target_sensitivity, alpha):
            rows.append(_clean(row))
    return rows


def calibration_curves(it_pred: Predictions, split: str = "test", bins: int = 10
                       ) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``[(class or "", mean predicted, observed frequency, count)]`` of one unit's predictions."""
    sp = it_pred.splits[split]
    y, s = np.asarray(sp.columns["target"]), np.asarray(sp.columns["score"], dtype=np.float64)
    out = []
    for name, yc, pc in _binary_views(y, s, it_pred.task, it_pred.class_names):
        out.append((name, *stats.reliability_bins(yc, pc, bins)))
    return out


def _binary_views(y: np.ndarray, s: np.ndarray, task: str, names: tuple[str, ...]):
    """``(class label, 0/1 outcome, probability)`` views whose calibration is assessed."""
    if task == "binary":
        yield "", y, s
    elif task == "multiclass":
        yield "top-label", (s.argmax(1) == y).astype(np.int64), s.max(1)
    else:
        for c, name in enumerate(names):  # on the samples labelled for the class (-1 = missing)
            known = y[:, c] >= 0
            yield name, y[known, c], s[known, c]


def _calibration_rows(it: _Loaded, bins: int, method: str, target: float | None, alpha: float):
    run, pred = it.run, it.pred
    y, s = np.asarray(it.split.columns["target"]), np.asarray(it.split.columns["score"], dtype=np.float64)
    base = {"run_key": run.key, "dataset": run.dataset, "protocol": run.protocol, "label": run.label,
            "backbone": run.backbone, "seed": run.seed, "n": len(y)}
    why = stats.is_probability(s, pred.task)
    if why:
        yield dict(base, **{"class": None, "note": why})
        return
    val = pred.splits.get("val")
    if pred.task == "multiclass":
        onehot = (y[:, None] == np.arange(s.shape[1])).astype(np.float64)
        views = [("top-label", (s.argmax(1) == y).astype(np.int64), s.max(1), stats.brier(onehot, s), None)]
    elif pred.task == "binary":
        views = [("", y, s, stats.brier(y, s), (val.columns["target"], val.columns["score"]) if val else None)]
    else:
        vy = np.asarray(val.columns["target"]) if val else None
        vs = np.asarray(val.columns["score"]) if val else None
        views = [(name, yc, pc, stats.brier(yc, pc),
                  (vy[vy[:, c] >= 0, c], vs[vy[:, c] >= 0, c]) if val else None)  # labelled samples only
                 for c, (name, yc, pc) in enumerate(_binary_views(y, s, pred.task, pred.class_names))]
    for name, yc, pc, brier, val_view in views:
        row = dict(base, **{"class": name or None}, ece=stats.ece(yc, pc, bins), brier=brier, bins=bins,
                   threshold_method=None, threshold=None, sensitivity=None, sensitivity_ci=None, specificity=None,
                   specificity_ci=None, note=None)
        if pred.task == "multiclass":
            row["note"] = "multiclass: top-label ECE, Brier summed over classes; no threshold (argmax decides)"
        elif val_view is None:
            row["note"] = "no validation predictions: no threshold chosen (never on test)"
        else:
            thr = stats.choose_threshold(np.asarray(val_view[0]), np.asarray(val_view[1], dtype=np.float64), method,
                                         target)
            if math.isnan(thr):
                row["note"] = "validation split holds one class: no threshold"
            else:
                op = stats.operating_point(yc, pc, thr, alpha)
                row.update(threshold_method=method if method == "youden" else f"sensitivity>={target:g}",
                           threshold=thr, sensitivity=op.sensitivity, sensitivity_ci=list(op.sensitivity_ci),
                           specificity=op.specificity, specificity_ci=list(op.specificity_ci),
                           tp=op.tp, fn=op.fn, tn=op.tn, fp=op.fp)
        yield row


def reliability_diagrams(output_dir: str | Path, out_dir: str | Path, *, bins: int = 10,
                         split: str = "test") -> list[Path]:
    """One reliability-diagram PNG per unit with probabilistic scores; returns the paths written."""
    from medprobe.results.reliability import plot_reliability
    output_dir, out_dir = Path(output_dir), Path(out_dir)
    loaded, _ = _classification_runs(output_dir, split)
    paths = []
    for it in loaded:
        if stats.is_probability(it.split.columns["score"], it.pred.task):
            continue
        curves = calibration_curves(it.pred, split, bins)
        title = f"{it.run.dataset} / {it.run.backbone} / {it.run.label} seed {it.run.seed}"
        paths.append(plot_reliability(curves, title, out_dir / f"{slug(title)}-{it.run.key[:8]}.png"))
    return paths


