"""Statistics on per-sample predictions: paired comparisons, subgroups, calibration (numpy/scipy only).

Paired bootstrap. The test set is resampled by *patient* (a cluster bootstrap: every image of
a drawn patient enters with the patient's multiplicity) when patient ids repeat, by sample
otherwise. One index matrix ``(B, patients)`` is drawn and turned into sample weights, and the
same weights score every model being compared (both backbones, every seed), so each resample
gives a paired difference. The interval is the percentile interval of the differences; the
two-sided p-value is ``2 * min(#{d_b <= 0}, #{d_b >= 0}) + 1) / (B + 1)`` capped at 1 (the
test that inverts the percentile interval). Resamples where the metric is undefined (e.g. no
positive drawn) are left out; their number is returned.

DeLong. AUROCs of several score vectors on the same samples and their covariance from the
structural components (DeLong, DeLong & Clarke-Pearson 1988; midrank algorithm of Sun & Xu
2014). A linear contrast of the AUCs (here: mean over seeds of model A minus mean over seeds
of model B) is tested with ``z = c'AUC / sqrt(c' S c)``. It assumes independent samples.

Calibration. ECE with equal-width bins (bin edges as scikit-learn's ``calibration_curve``):
``sum_b n_b / N * |mean(y in b) - mean(p in b)|``; binary on the positive-class probability,
multiclass on the top-label confidence (Guo et al. 2017), multi-label per class. Brier score:
mean squared error of the probabilities (multiclass: sum over classes, not halved).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from medprobe.errors import ConfigError
from medprobe.metrics import CLASSIFICATION_METRICS, _compute, _multiplicities

_BLOCK = 2_000_000  # resamples x samples scored at once


# --------------------------------------------------------------------------- resampling
@dataclass
class Resampler:
    """One bootstrap index matrix over the clusters (patients, or samples when none repeats)."""

    codes: np.ndarray       # (N,) cluster index of each sample
    indices: np.ndarray     # (B, clusters) drawn cluster indices
    by_patient: bool

    @property
    def n_clusters(self) -> int:
        return int(self.indices.shape[1])

    @property
    def resamples(self) -> int:
        return int(self.indices.shape[0])

    def weight_blocks(self):
        """Sample weights ``(b, N)`` of consecutive blocks of resamples (multiplicity of each sample's cluster)."""
        n = len(self.codes)
        block = max(1, _BLOCK // max(n, self.n_clusters))
        for b0 in range(0, self.resamples, block):
            mult = _multiplicities(self.indices[b0:b0 + block], self.n_clusters)
            yield mult[:, self.codes]


def resampler(patient_ids: Sequence[str], resamples: int, seed: int) -> Resampler:
    """Index matrix ``(resamples, clusters)`` from ``numpy.random.default_rng(seed)``; clusters are the
    distinct patient ids when some repeat, else the samples."""
    if resamples < 1:
        raise ConfigError(f"bootstrap resamples must be >= 1, got {resamples}")
    pids = np.asarray([str(p) for p in patient_ids])
    uniq, codes = np.unique(pids, return_inverse=True)
    by_patient = len(uniq) < len(pids)
    if not by_patient:
        codes = np.arange(len(pids))
    k = len(uniq) if by_patient else len(pids)
    rng = np.random.default_rng(seed)
    return Resampler(codes.astype(np.int64), rng.integers(0, k, (resamples, k)), by_patient)


def _metric(y: np.ndarray, s: np.ndarray, task: str, metric: str, w: np.ndarray) -> np.ndarray:
    """One aggregate metric for every row of ``w``."""
    if metric not in CLASSIFICATION_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(CLASSIFICATION_METRICS)}")
    if metric == "kappa" and task == "multilabel":
        raise ConfigError("kappa is not defined for multi-label tasks; choose auroc, auprc, accuracy...")
    return _compute(y, s, task, w, [metric])[metric]


def point_metric(y: np.ndarray, s: np.ndarray, task: str, metric: str) -> float:
    """The metric on the whole set (the value ``results.db`` stores for it)."""
    return float(_metric(y, s, task, metric, np.ones((1, len(y))))[0])


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided p-value of ``H0: difference = 0`` from bootstrap differences (NaN ones left out)."""
    d = diffs[~np.isnan(diffs)]
    if len(d) == 0:
        return math.nan
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return min(1.0, 2 * (tail + 1) / (len(d) + 1))


def percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    v = values[~np.isnan(values)]
    if len(v) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


@dataclass
class PairedResult:
    value_a: float          # metric of model A (mean over its seeds)
    value_b: float
    diff: float             # value_a - value_b
    ci_low: float
    ci_high: float
    p: float                # paired-bootstrap two-sided p-value
    valid_resamples: int    # resamples where the difference was defined
    seed_diffs: list[float]
    diffs: np.ndarray       # (B,) difference in each resample (NaN where undefined)


def paired_bootstrap(y: np.ndarray, scores_a: Sequence[np.ndarray], scores_b: Sequence[np.ndarray], task: str,
                     metric: str, rs: Resampler, alpha: float = 0.05) -> PairedResult:
    """Difference of the seed-mean ``metric`` of A and B, every score vector scored on the same resamples.

    ``scores_a``/``scores_b``: one array per seed, all on the samples of ``y`` in the same order.
    """
    if not scores_a or not scores_b:
        raise ValueError("each model needs at least one score vector")
    ones = np.ones((1, len(y)))
    pa = [float(_metric(y, s, task, metric, ones)[0]) for s in scores_a]
    pb = [float(_metric(y, s, task, metric, ones)[0]) for s in scores_b]
    diffs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for w in rs.weight_blocks():
            ma = np.mean([_metric(y, s, task, metric, w) for s in scores_a], 0)
            mb = np.mean([_metric(y, s, task, metric, w) for s in scores_b], 0)
            diffs.append(ma - mb)
        d = np.concatenate(diffs)
        va, vb = float(np.mean(pa)), float(np.mean(pb))
    lo, hi = percentile_ci(d, alpha)
    seed_diffs = [a - b for a, b in zip(pa, pb)] if len(pa) == len(pb) else []
    return PairedResult(va, vb, va - vb, lo, hi, bootstrap_p(d), int((~np.isnan(d)).sum()), seed_diffs,
                        d)


# --------------------------------------------------------------------------- DeLong
def _midranks(x: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based, ties averaged) of each row of ``x`` (K, n)."""
    return np.vstack([stats.rankdata(row) for row in x])


def delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs ``(K,)`` of the score rows ``(K, N)`` for binary ``y`` and their DeLong covariance ``(K, K)``.

    NaN when ``y`` holds a single class; the covariance needs at least 2 positives and 2 negatives.
    """
    y = np.asarray(y).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    k = s.shape[0]
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return np.full(k, np.nan), np.full((k, k), np.nan)
    pos, neg = s[:, y], s[:, ~y]
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.hstack([pos, neg]))
    auc = (tz[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)
    v01 = (tz[:, :m] - tx) / n          # per positive: fraction of negatives below it (ties 1/2)
    v10 = 1.0 - (tz[:, m:] - ty) / m    # per negative: fraction of positives above it
    if m < 2 or n < 2:
        return auc, np.full((k, k), np.nan)
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return auc, cov


@dataclass
class DeLongResult:
    auc_a: float
    auc_b: float
    diff: float
    se: float
    z: float
    p: float


def delong_test(y: np.ndarray, scores_a: Sequence[np.ndarray], scores_b: Sequence[np.ndarray]) -> DeLongResult:
    """DeLong's test of ``mean_s AUC(A_s) - mean_s AUC(B_s) = 0`` (one seed each: the classical paired test)."""
    ka, kb = len(scores_a), len(scores_b)
    auc, cov = delong(y, np.vstack([np.asarray(s, dtype=np.float64) for s in (*scores_a, *scores_b)]))
    c = np.r_[np.full(ka, 1 / ka), np.full(kb, -1 / kb)]
    diff = float(c @ auc)
    var = float(c @ cov @ c)
    se = math.sqrt(var) if var > 0 else (0.0 if var == 0 else math.nan)
    if se > 0:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    elif se == 0 and not math.isnan(diff):  # identical rankings: no evidence of a difference
        z, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = p = math.nan
    return DeLongResult(float(c[:ka] @ auc[:ka]), float(-c[ka:] @ auc[ka:]), diff, se, z, p)


# --------------------------------------------------------------------------- multiplicity
def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family = the finite values; NaN stays NaN)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


# --------------------------------------------------------------------------- calibration
def reliability_bins(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean predicted, observed frequency, count)`` of each equal-width bin (empty bins: NaN, NaN, 0)."""
    if n_bins < 1:
        raise ConfigError(f"bins must be >= 1, got {n_bins}")
    y, prob = np.asarray(y, dtype=np.float64), np.asarray(prob, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], prob)
    count = np.bincount(ids, minlength=n_bins)
    s_pred = np.bincount(ids, weights=prob, minlength=n_bins)
    s_true = np.bincount(ids, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return s_pred / count, s_true / count, count


def ece(y: np.ndarray, prob: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of binary outcomes ``y`` and probabilities ``prob`` (equal-width bins)."""
    pred, true, count = reliability_bins(y, prob, n_bins)
    nz = count > 0
    return float((count[nz] * np.abs(true[nz] - pred[nz])).sum() / count.sum())


def brier(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared difference of probabilities and 0/1 outcomes (rows summed for a 2-D one-hot ``y``)."""
    d = (np.asarray(prob, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2
    return float(d.sum(1).mean() if d.ndim == 2 else d.mean())


def is_probability(scores: np.ndarray, task: str) -> str | None:
    """Why ``scores`` are not probabilities of ``task`` (None when they are)."""
    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)) or s.min() < 0 or s.max() > 1:
        return "scores are not probabilities (outside [0, 1])"
    if task == "multiclass" and not np.allclose(s.sum(1), 1.0, atol=1e-3):
        return "multiclass scores do not sum to 1"
    return None


# --------------------------------------------------------------------------- thresholds
def choose_threshold(y: np.ndarray, score: np.ndarray, method: str = "youden",
                     target_sensitivity: float | None = None) -> float:
    """Decision threshold (predict positive when ``score >= t``) chosen on binary ``y``.

    ``youden``: the highest threshold maximising sensitivity + specificity - 1; ``sensitivity``:
    the highest threshold whose sensitivity is at least ``target_sensitivity`` (so the largest
    specificity among those). NaN when ``y`` holds one class.
    """
    y = np.asarray(y).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    p, n = int(y.sum()), int((~y).sum())
    if p == 0 or n == 0:
        return math.nan
    order = np.argsort(-s, kind="stable")
    sv, yv = s[order], y[order]
    last = np.r_[sv[1:] != sv[:-1], True]        # last sample of each group of equal scores
    thr = sv[last]
    tpr = np.cumsum(yv)[last] / p
    fpr = np.cumsum(~yv)[last] / n
    if method == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    if method == "sensitivity":
        if target_sensitivity is None or not 0 < target_sensitivity <= 1:
            raise ConfigError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
        return float(thr[int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])])
    raise ConfigError(f"unknown threshold method {method!r}; choose youden or sensitivity")


@dataclass
class Operating:
    threshold: float
    tp: int
    fn: int
    tn: int
    fp: int
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]


def _wilson(k: int, n: int, alpha: float) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def operating_point(y: np.ndarray, score: np.ndarray, threshold: float, alpha: float = 0.05) -> Operating:
    """Sensitivity and specificity (Wilson intervals) of ``score >= threshold`` on binary ``y``."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(score, dtype=np.float64) >= threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else math.nan
    spec = tn / (tn + fp) if tn + fp else math.nan
    return Operating(float(threshold), tp, fn, tn, fp, sens, _wilson(tp, tp + fn, alpha), spec,
                     _wilson(tn, tn + fp, alpha))


# --------------------------------------------------------------------------- subgroups
@dataclass
class GroupResult:
    group: str
    n: int
    n_patients: int
    value: float
    ci_low: float
    ci_high: float


@dataclass
class SubgroupResult:
    groups: list[GroupResult]
    gap: float              # best - worst over groups where the metric is defined
    gap_ci: tuple[float, float]
    worst: str | None
    best: str | None


def subgroup_metrics(y: np.ndarray, scores: Sequence[np.ndarray], task: str, metric: str, groups: np.ndarray,
                     rs: Resampler, alpha: float = 0.05, exclude_from_gap: Sequence[str] = ()) -> SubgroupResult:
    """Seed-mean ``metric`` in each group with percentile CIs, and the worst-group gap with its CI.

    One resample of the whole set (``rs``) serves every group, so the gap's interval accounts for
    the groups being estimated jointly. Groups in ``exclude_from_gap`` (e.g. missing values) are
    reported but not part of the gap.
    """
    groups = np.asarray(groups).astype(str)
    names = sorted(set(groups.tolist()))
    masks = [groups == g for g in names]
    ones = np.ones((1, len(y)))
    point = np.array([np.mean([_metric(y, s, task, metric, ones * m)[0] for s in scores]) for m in masks]) \
        if names else np.zeros(0)
    boots = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for w in rs.weight_blocks():
            boots.append(np.stack([np.mean([_metric(y, s, task, metric, w * m) for s in scores], 0) for m in masks], 1))
        boot = np.concatenate(boots) if boots else np.zeros((0, len(names)))
    pids = rs.codes
    out = []
    for i, (g, m) in enumerate(zip(names, masks)):
        lo, hi = percentile_ci(boot[:, i], alpha)
        out.append(GroupResult(g, int(m.sum()), len(set(pids[m].tolist())), float(point[i]), lo, hi))
    gap_idx = [i for i, g in enumerate(names) if g not in exclude_from_gap and not np.isnan(point[i])]
    if len(gap_idx) < 2:
        return SubgroupResult(out, math.nan, (math.nan, math.nan), None, None)
    sub = point[gap_idx]
    worst, best = names[gap_idx[int(np.argmin(sub))]], names[gap_idx[int(np.argmax(sub))]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bsub = boot[:, gap_idx]
        bgap = np.nanmax(bsub, 1) - np.nanmin(bsub, 1)
        bgap[np.isnan(bsub).any(1)] = np.nan  # a group undefined in a resample: that resample says nothing
    return SubgroupResult(out, float(sub.max() - sub.min()), percentile_ci(bgap, alpha), worst, best)
