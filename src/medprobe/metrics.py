"""Classification and segmentation metrics, with vectorised percentile-bootstrap confidence intervals.

Every value is a :class:`MetricValue` row: the aggregate (``cls=None``, macro over classes where
that applies) and, for AUROC/AUPRC, one row per class. Undefined values are ``NaN`` with a
``note`` saying why; degenerate inputs (a class absent from ``y_true``, a single-class
``y_true``) never raise.

Bootstrap. ``B`` resamples of the ``N`` test samples are drawn as an index matrix ``(B, N)``
and turned into multiplicities ``w`` (how often each original sample occurs in each resample).
A resample is then the original data with sample weights ``w[b]``, so the scores are sorted once
per class and every metric of every resample comes out of a few array operations on ``w``
(cumulative sums over the sorted order for AUROC/AUPRC, ``w @ indicator`` products for the
thresholded metrics, a weighted ``bincount`` for kappa's confusion matrices). Resamples are
processed in blocks of about ``_BLOCK`` weights to bound memory. The interval is the
``(alpha/2, 1 - alpha/2)`` percentile over the resamples where the metric is defined.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medprobe.errors import ConfigError, MedprobeError, check_choice

TASKS = ("binary", "multiclass", "multilabel")
CLASSIFICATION_METRICS = ("auroc", "auprc", "accuracy", "balanced_accuracy", "kappa", "recall", "specificity")
_RANKED = ("auroc", "auprc")  # reported per class as well as macro
_BLOCK = 2_000_000  # resamples x samples processed at once in the bootstrap


@dataclass
class MetricValue:
    """One metric value: the aggregate (``cls=None``) or a class's value, with optional CI and note."""

    metric: str
    value: float
    cls: str | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    note: str | None = None


# --------------------------------------------------------------------------- helpers
def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean ignoring NaN; NaN (without a warning) where every value is NaN."""
    valid = ~np.isnan(a)
    n = valid.sum(axis)
    total = np.where(valid, a, 0.0).sum(axis)
    return np.divide(total, n, out=np.full(np.shape(total), np.nan), where=n > 0)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0``."""
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def _multiplicities(idx: np.ndarray, n: int) -> np.ndarray:
    """Index matrix ``(B, N)`` of a bootstrap → how often each sample occurs in each resample ``(B, N)``."""
    b = idx.shape[0]
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) ignoring NaN; sd is 0 for one value, NaN for none."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# --------------------------------------------------------------------------- weighted metric kernels
def _ranked(pos: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUROC and average precision of one class for every row of ``w`` (B, N).

    AUROC is the Mann-Whitney statistic with mid-ranks: samples are sorted by decreasing score
    and grouped into ties; a positive beats the negative weight below its group and ties with
    half the negative weight of its own group. Average precision is
    ``sum_g (positives in group g / P) * precision at threshold g`` (scikit-learn's definition).
    """
    order = np.argsort(-s, kind="stable")
    sv, p = s[order], pos[order]
    ws = w[:, order]
    tp = ws * p                                    # positive weight per sample, by decreasing score
    if len(sv) > 1 and np.any(sv[1:] == sv[:-1]):  # merge tied scores into groups
        starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
        tp, ws = np.add.reduceat(tp, starts, axis=1), np.add.reduceat(ws, starts, axis=1)
    fp = ws - tp                                   # negative weight per group
    ctp, cfp = tp.cumsum(1), fp.cumsum(1)
    n_pos, n_neg = ctp[:, -1], cfp[:, -1]
    # sum_g tp_g * (negatives below g + fp_g / 2) = n_pos * n_neg - sum_g tp_g * (cfp_g - fp_g / 2)
    fp *= 0.5
    np.subtract(cfp, fp, out=fp)
    auroc = _ratio(n_pos * n_neg - np.einsum("bg,bg->b", tp, fp), n_pos * n_neg)
    auroc[n_neg == 0] = np.nan
    cfp += ctp                                     # predicted positives at each threshold
    precision = np.divide(ctp, cfp, out=np.zeros_like(ctp), where=cfp > 0)
    ap = _ratio(np.einsum("bg,bg->b", tp, precision), n_pos)
    return auroc, ap


def _kappa(y: np.ndarray, pred: np.ndarray, k: int, w: np.ndarray) -> np.ndarray:
    """Quadratic-weighted Cohen's kappa for every row of ``w``; NaN where the expected disagreement is 0."""
    b = w.shape[0]
    flat = (np.arange(b)[:, None] * k * k + (y * k + pred)[None, :]).ravel()
    obs = np.bincount(flat, weights=w.ravel(), minlength=b * k * k).reshape(b, k, k)
    total = obs.sum((1, 2))
    expected = obs.sum(2)[:, :, None] * obs.sum(1)[:, None, :] / total[:, None, None]
    cost = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2.0
    return 1.0 - _ratio((obs * cost).sum((1, 2)), (expected * cost).sum((1, 2)))


def _one_vs_rest(y: np.ndarray, s: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth ``(N, K)``, scores ``(N, K)`` and predictions ``(N, K)`` as one-vs-rest columns.

    Binary has one column (the positive class, threshold 0.5), multiclass one per class
    (prediction = argmax), multilabel one per class (threshold 0.5). A score equal to 0.5 is positive.
    """
    if task == "binary":
        return (y == 1)[:, None], s[:, None], (s >= 0.5)[:, None]
    if task == "multiclass":
        k = s.shape[1]
        classes = np.arange(k)
        return y[:, None] == classes, s, s.argmax(1)[:, None] == classes
    return y.astype(bool), s, s >= 0.5


def _compute(y: np.ndarray, s: np.ndarray, task: str, w: np.ndarray, which: Sequence[str]) -> dict[str, np.ndarray]:
    """Metrics in ``which`` for every resample (row of ``w``): ``{name: (B,)}`` plus ``{name/cls: (B, K)}``."""
    truth, cols, pred = _one_vs_rest(y, s, task)
    out: dict[str, np.ndarray] = {}
    if any(m in which for m in _RANKED):
        per = [_ranked(truth[:, c], cols[:, c], w) for c in range(truth.shape[1])]
        for i, name in enumerate(_RANKED):
            if name in which:
                out[f"{name}/cls"] = np.stack([p[i] for p in per], 1)
                out[name] = _nanmean(out[f"{name}/cls"], 1)
    if any(m in which for m in ("accuracy", "balanced_accuracy", "recall", "specificity")):
        t, pp = truth.astype(np.float64), pred.astype(np.float64)
        total = w.sum(1)[:, None]
        tp, pos, ppos = w @ (t * pp), w @ t, w @ pp
        tn = total - pos - ppos + tp
        recall, spec = _ratio(tp, pos), _ratio(tn, total - pos)
        if task == "multiclass":
            out["accuracy"] = tp.sum(1) / total[:, 0]
            out["balanced_accuracy"] = _nanmean(recall, 1)  # scikit-learn: mean recall over classes in y_true
        else:
            out["accuracy"] = ((tp + tn) / total).mean(1)
            out["balanced_accuracy"] = _nanmean(_nanmean(np.stack([recall, spec]), 0), 1)
        out["recall"], out["specificity"] = _nanmean(recall, 1), _nanmean(spec, 1)
        out["recall/cls"], out["specificity/cls"] = recall, spec
    if "kappa" in which and task != "multilabel":
        k = 2 if task == "binary" else s.shape[1]
        pred_label = (s >= 0.5).astype(np.int64) if task == "binary" else s.argmax(1)
        out["kappa"] = _kappa(y, pred_label, k, w)
    return out


# --------------------------------------------------------------------------- classification
def _prepare(y_true: np.ndarray, scores: np.ndarray, task: str, class_names: Sequence[str] | None
             ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validated ``(y, scores, class names)``; binary scores become the positive-class column."""
    check_choice(task, TASKS, "task")
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if y.ndim == 0 or y.shape[0] == 0:
        raise ConfigError(f"metrics need at least one sample, got y_true of shape {y.shape}")
    if y.shape[0] != s.shape[0]:
        raise ConfigError(f"y_true has {y.shape[0]} samples but scores has {s.shape[0]}")
    bad = int((~np.isfinite(s)).sum())
    if bad:
        raise MedprobeError(f"scores contain {bad} non-finite value(s) (NaN or inf); the model's outputs are invalid")
    if not np.all(np.isin(y, (0, 1)) if task != "multiclass" else (y == np.round(y)) & (y >= 0)):
        raise ConfigError(f"y_true for a {task} task must hold "
                          f"{'non-negative class indices' if task == 'multiclass' else '0/1 values'}, "
                          f"got values {np.unique(y)[:10].tolist()}")
    y = y.astype(np.int64)
    if task == "binary":
        if s.ndim == 2 and s.shape[1] == 2:
            s = s[:, 1]
        if y.ndim != 1 or s.ndim != 1:
            raise ConfigError(f"binary task expects y_true (N,) and scores (N,) or (N, 2), got {y.shape} and {s.shape}")
        names = list(class_names) if class_names is not None else ["negative", "positive"]
        if len(names) == 1:
            names = ["negative", names[0]]
        if len(names) != 2:
            raise ConfigError(f"binary task expects 2 class names (negative, positive), got {names}")
        return y, s, names
    if s.ndim != 2:
        raise ConfigError(f"{task} task expects scores (N, C), got shape {s.shape}")
    c = s.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ConfigError(f"scores have {c} columns but {len(names)} class names were given: {names}")
    if task == "multiclass":
        if y.ndim != 1:
            raise ConfigError(f"multiclass task expects y_true (N,) class indices, got shape {y.shape}")
        if y.max() >= c:
            raise ConfigError(f"y_true has class index {int(y.max())} but there are only {c} classes (0..{c - 1})")
    elif y.shape != s.shape:
        raise ConfigError(f"multilabel task expects y_true and scores of equal shape (N, C), "
                          f"got {y.shape} and {s.shape}")
    return y, s, names


def _class_notes(metric: str, y: np.ndarray, task: str, names: list[str]) -> list[str | None]:
    """Why each one-vs-rest column's ``metric`` is undefined (None where it is defined)."""
    if task == "binary":
        n_pos = np.array([(y == 1).sum()])
    else:
        n_pos = np.bincount(y, minlength=len(names)) if task == "multiclass" else y.sum(0)
    n_neg = len(y) - n_pos
    notes: list[str | None] = []
    for i, (p, n) in enumerate(zip(n_pos, n_neg)):
        name = names[1] if task == "binary" else names[i]
        if p == 0 and metric in ("auroc", "auprc", "recall"):
            notes.append(f"class {name!r} absent from y_true")
        elif n == 0 and metric in ("auroc", "specificity"):
            notes.append(f"class {names[0]!r} absent from y_true" if task == "binary"
                         else f"no negatives for class {name!r}: every sample has it")
        else:
            notes.append(None)
    return notes


def _aggregate_note(values: np.ndarray, cols: list[str], notes: list[str | None]) -> str | None:
    """Note of a macro value: which classes were excluded as undefined, or why all were."""
    bad = [f"{c!r}" for c, v in zip(cols, values) if np.isnan(v)]
    if not bad:
        return None
    reasons = "; ".join(n for n in notes if n)
    if len(cols) == 1:
        return reasons or f"undefined for class {cols[0]!r}"
    if len(bad) == len(cols):
        return "undefined for every class" + (f" ({reasons})" if reasons else "")
    return f"macro over {len(cols) - len(bad)} of {len(cols)} classes; excluded (undefined): {', '.join(bad)}"


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, task: str, class_names: Sequence[str],
                           bootstrap: int = 0, seed: int = 0, alpha: float = 0.05) -> list[MetricValue]:
    """AUROC, AUPRC (macro and per class), accuracy, balanced accuracy, kappa, recall and specificity.

    ``y_true``/``scores``: binary (N,) 0/1 and (N,) positive-class probabilities (or (N, 2));
    multiclass (N,) class indices and (N, C) probabilities; multilabel (N, C) 0/1 and (N, C).
    Predictions are the argmax (multiclass) or ``score >= 0.5``. Macro values ignore classes
    where the metric is undefined (the note names them). With ``bootstrap=B > 0`` every value
    gets a percentile CI from ``B`` resamples drawn with ``numpy.random.default_rng(seed)``.
    Kappa is quadratic-weighted and computed for binary and multiclass tasks only.
    """
    y, s, names = _prepare(y_true, scores, task, class_names)
    if bootstrap < 0:
        raise ConfigError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    n = len(y)
    metrics = [m for m in CLASSIFICATION_METRICS if not (m == "kappa" and task == "multilabel")]
    point = _compute(y, s, task, np.ones((1, n)), metrics)
    ci: dict[str, np.ndarray] = {}
    if bootstrap:
        rng = np.random.default_rng(seed)
        block = max(1, _BLOCK // n)
        parts = [_compute(y, s, task, _multiplicities(rng.integers(0, n, (min(block, bootstrap - b0), n)), n), metrics)
                 for b0 in range(0, bootstrap, block)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN bounds
            for key in point:
                boot = np.concatenate([p[key] for p in parts])
                ci[key] = np.nanpercentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    cols = [names[1]] if task == "binary" else names

    def row(metric: str, key: str, i: int | None, cls: str | None, note: str | None) -> MetricValue:
        value = point[key][0] if i is None else point[key][0, i]
        lo = hi = None
        if key in ci:
            lo, hi = (ci[key][0], ci[key][1]) if i is None else (ci[key][0, i], ci[key][1, i])
            lo, hi = float(lo), float(hi)
        return MetricValue(metric, float(value), cls, lo, hi, note if np.isnan(value) or i is None else None)

    rows: list[MetricValue] = []
    for m in metrics:
        if m == "kappa":
            note = None if not np.isnan(point[m][0]) else \
                "undefined: y_true and the predictions each hold a single class (no expected disagreement)"
            rows.append(row(m, m, None, None, note))
            continue
        notes = _class_notes(m, y, task, names) if f"{m}/cls" in point else [None]
        per = point[f"{m}/cls"][0] if f"{m}/cls" in point else np.array([0.0])
        agg_note = _aggregate_note(per, cols, notes)
        if task == "binary" and agg_note is None and np.isnan(point[m][0]):
            agg_note = "undefined: a class is absent from y_true"
        rows.append(row(m, m, None, None, agg_note))
        if m in _RANKED:
            rows += [row(m, f"{m}/cls", i, c, notes[i]) for i, c in enumerate(cols)]
    return rows


def metric_value(y_true: np.ndarray, scores: np.ndarray, task: str, metric: str) -> float:
    """The aggregate value of one classification metric (no bootstrap, no per-class rows); fast.

    Meant for model selection: non-finite scores (a diverged model) give NaN instead of an error.
    """
    check_choice(metric, CLASSIFICATION_METRICS, "metric")
    if not np.all(np.isfinite(np.asarray(scores, dtype=np.float64))):
        return math.nan
    y, s, _ = _prepare(y_true, scores, task, None)
    if metric == "kappa" and task == "multilabel":
        raise ConfigError("kappa is defined for binary and multiclass tasks, not multilabel; "
                          "choose one of auroc, auprc, accuracy")
    return float(_compute(y, s, task, np.ones((1, len(y))), [metric])[metric][0])


# --------------------------------------------------------------------------- segmentation
def _hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of masks ``a`` and ``b``.

    Surface voxels are those removed by one binary erosion; the value is the larger of the two
    directed 95th percentiles (as MONAI's ``compute_hausdorff_distance(percentile=95)``).
    """
    sa, sb = a & ~ndimage.binary_erosion(a), b & ~ndimage.binary_erosion(b)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def segmentation_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, class_names: Sequence[str],
                         include_background: bool = False, hd95: bool = False,
                         spacing: Sequence[float] | None = None) -> list[MetricValue]:
    """Per-class Dice and Jaccard of one 2D image or 3D volume, their means and ``dice_jaccard_mean``.

    ``pred`` and ``target`` are integer label maps of equal shape with values in ``0..num_classes-1``;
    class 0 is background and is left out unless ``include_background``. A class absent from
    both maps scores 1.0 ("empty truth and prediction"); absent from the truth only, 0.0. The
    means are over the included classes; ``dice_jaccard_mean = (mean Dice + mean Jaccard) / 2``.
    With ``hd95`` the 95th-percentile Hausdorff distance (in ``spacing`` units, default 1 per
    voxel) is added per class and averaged over the classes where it is defined.
    """
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape:
        raise ConfigError(f"prediction and target shapes differ: {p.shape} vs {t.shape}")
    if p.ndim not in (2, 3):
        raise ConfigError(f"segmentation metrics take a 2D image or 3D volume, got {p.ndim} dimensions {p.shape}")
    if len(class_names) != num_classes:
        raise ConfigError(f"num_classes is {num_classes} but {len(class_names)} class names were given")
    maps = []
    for name, a in (("prediction", p), ("target", t)):  # float maps holding whole numbers are accepted
        if a.size and (not np.all(np.isfinite(a) & (a == np.round(a))) or a.min() < 0 or a.max() >= num_classes):
            raise ConfigError(f"{name} must be an integer label map with values in 0..{num_classes - 1}, "
                              f"got dtype {a.dtype} and values {np.unique(a)[:10].tolist()}")
        maps.append(a.astype(np.int64, copy=False))
    p, t = maps
    if spacing is not None and len(spacing) != p.ndim:
        raise ConfigError(f"spacing needs one value per axis ({p.ndim}), got {list(spacing)}")
    classes = list(range(0 if include_background else 1, num_classes))
    if not classes:
        raise ConfigError("no class to score: num_classes is 1 and include_background is False")
    conf = np.bincount(t.ravel() * num_classes + p.ravel(),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(conf)[classes].astype(np.float64)
    fn, fp = conf.sum(1)[classes] - tp, conf.sum(0)[classes] - tp
    empty_truth = (tp + fn) == 0
    dice = np.where(empty_truth & (fp == 0), 1.0, _ratio(2 * tp, 2 * tp + fp + fn))
    jac = np.where(empty_truth & (fp == 0), 1.0, _ratio(tp, tp + fp + fn))
    notes = ["empty truth and prediction" if e and f == 0 else "empty truth, non-empty prediction" if e else None
             for e, f in zip(empty_truth, fp)]
    names = [class_names[c] for c in classes]
    rows: list[MetricValue] = []
    for metric, vals in (("dice", dice), ("jaccard", jac)):
        rows += [MetricValue(metric, float(v), n, note=note) for v, n, note in zip(vals, names, notes)]
        rows.append(MetricValue(metric, float(vals.mean())))
    rows.append(MetricValue("dice_jaccard_mean", float((dice.mean() + jac.mean()) / 2)))
    if hd95:
        values = []
        for c, name in zip(classes, names):
            a, b = p == c, t == c
            if a.any() and b.any():
                values.append(_hd95(a, b, spacing))
                rows.append(MetricValue("hd95", values[-1], name))
            else:
                values.append(math.nan)
                side = "truth and prediction" if not (a.any() or b.any()) else "truth" if not b.any() else "prediction"
                rows.append(MetricValue("hd95", math.nan, name, note=f"empty {side}"))
        agg = _nanmean(np.array(values), 0)
        rows.append(MetricValue("hd95", float(agg), note=_aggregate_note(np.array(values), names, [None] * len(names))))
    return rows
