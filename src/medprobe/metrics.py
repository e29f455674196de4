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
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medprobe.errors import ConfigError, MedprobeError
from medprobe.options import option

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
    (prediction = argmax), multilabel one per class (threshold 0.5; a missing label, ``-1``, is
    not a positive). A score equal to 0.5 is positive.
    """
    if task == "binary":
        return (y == 1)[:, None], s[:, None], (s >= 0.5)[:, None]
    if task == "multiclass":
        k = s.shape[1]
        classes = np.arange(k)
        return y[:, None] == classes, s, s.argmax(1)[:, None] == classes
    return y == 1, s, s >= 0.5


def labelled(y: np.ndarray, task: str) -> np.ndarray | None:
    """Which multi-label targets are known, ``(N, C)`` bool (``-1`` = missing); None for other tasks or when
    every target is known (so fully labelled data takes the plain, unmasked path)."""
    if task != "multilabel":
        return None
    known = np.asarray(y) >= 0
    return None if known.all() else known


def _compute(y: np.ndarray, s: np.ndarray, task: str, w: np.ndarray, which: Sequence[str]) -> dict[str, np.ndarray]:
    """Metrics in ``which`` for every resample (row of ``w``): ``{name: (B,)}`` plus ``{name/cls: (B, K)}``.

    Missing multi-label targets (``-1``) weigh 0 in their class's column: each class is scored on
    the samples labelled for it, and a class labelled nowhere is undefined (NaN) like an absent class.
    """
    truth, cols, pred = _one_vs_rest(y, s, task)
    known = labelled(y, task)
    out: dict[str, np.ndarray] = {}
    if any(m in which for m in _RANKED):
        per = [_ranked(truth[:, c], cols[:, c], w if known is None else w * known[:, c])
               for c in range(truth.shape[1])]
        for i, name in enumerate(_RANKED):
            if name in which:
                out[f"{name}/cls"] = np.stack([p[i] for p in per], 1)
                out[name] = _nanmean(out[f"{name}/cls"], 1)
    if any(m in which for m in ("accuracy", "balanced_accuracy", "recall", "specificity")):
        t, pp = truth.astype(np.float64), pred.astype(np.float64)
        if known is None:
            total = w.sum(1)[:, None]
        else:
            pp *= known  # t is 0 where the target is missing
            total = w @ known.astype(np.float64)
        tp, pos, ppos = w @ (t * pp), w @ t, w @ pp
        tn = total - pos - ppos + tp
        recall, spec = _ratio(tp, pos), _ratio(tn, total - pos)
        if task == "multiclass":
            out["accuracy"] = tp.sum(1) / total[:, 0]
            out["balanced_accuracy"] = _nanmean(recall, 1)  # scikit-learn: mean recall over classes in y_true
        else:
            out["accuracy"] = ((tp + tn) / total).mean(1) if known is None else _nanmean(_ratio(tp + tn, total), 1)
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
    option("task", task, str, choices=TASKS, what="task")
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if y.ndim == 0 or y.shape[0] == 0:
        raise ConfigError(f"metrics need at least one sample, got y_true of shape {y.shape}")
    if y.shape[0] != s.shape[0]:
        raise ConfigError(f"y_true has {y.shape[0]} samples but scores has {s.shape[0]}")
    bad = int((~np.isfinite(s)).sum())
    if bad:
        raise MedprobeError(f"scores contain {bad} non-finite value(s) (NaN or inf); the model's outputs are invalid")
    allowed = (0, 1) if task == "binary" else (-1, 0, 1)
    if not np.all(np.isin(y, allowed) if task != "multiclass" else (y == np.round(y)) & (y >= 0)):
        want = {"multiclass": "non-negative class indices", "binary": "0/1 values",
                "multilabel": "0/1 values (-1 = missing)"}[task]
        raise ConfigError(f"y_true for a {task} task must hold {want}, got values {np.unique(y)[:10].tolist()}")
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
        n_pos = np.bincount(y, minlength=len(names)) if task == "multiclass" else (y == 1).sum(0)
    n_neg = (y == 0).sum(0) if task == "multilabel" else len(y) - n_pos
    notes: list[str | None] = []
    for i, (p, n) in enumerate(zip(n_pos, n_neg)):
        name = names[1] if task == "binary" else names[i]
        if p == 0 and n == 0:
            notes.append(f"class {name!r} not labelled in y_true (missing for every sample)")
        elif p == 0 and metric in ("auroc", "auprc", "recall"):
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
    missing = [f"{c!r}" for c, v, n in zip(cols, values, notes) if np.isnan(v) and n and "not labelled" in n]
    undefined = [b for b in bad if b not in missing]
    parts = ([f"excluded (undefined): {', '.join(undefined)}"] if undefined else []) + \
        ([f"excluded (not labelled, missing targets): {', '.join(missing)}"] if missing else [])
    return f"macro over {len(cols) - len(bad)} of {len(cols)} classes; " + "; ".join(parts)


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, task: str, class_names: Sequence[str],
                           bootstrap: int = 0, seed: int = 0, alpha: float = 0.05) -> list[MetricValue]:
    """AUROC, AUPRC (macro and per class), accuracy, balanced accuracy, kappa, recall and specificity.

    ``y_true``/``scores``: binary (N,) 0/1 and (N,) positive-class probabilities (or (N, 2));
    multiclass (N,) class indices and (N, C) probabilities; multilabel (N, C) 0/1 and (N, C), where
    ``-1`` marks a missing target: each class is scored on the samples labelled for it (a missing
    target is never a negative) and a class labelled nowhere is undefined, with a note.
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
    option("metric", metric, str, choices=CLASSIFICATION_METRICS, what="metric")
    if not np.all(np.isfinite(np.asarray(scores, dtype=np.float64))):
        return math.nan
    y, s, _ = _prepare(y_true, scores, task, None)
    if metric == "kappa" and task == "multilabel":
        raise ConfigError("kappa is defined for binary and multiclass tasks, not multilabel; "
                          "choose one of auroc, auprc, accuracy")
    return float(_compute(y, s, task, np.ones((1, len(y))), [metric])[metric][0])


# --------------------------------------------------------------------------- segmentation
SURFACE_METRICS = ("hd95", "assd", "nsd")
EMPTY_CONVENTIONS = ("one", "nan")


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64).ravel()
    if len(sp) != ndim:
        raise ConfigError(f"spacing needs one value per axis ({ndim}), got {list(np.asarray(spacing).ravel())}")
    if not np.all(np.isfinite(sp) & (sp > 0)):
        raise ConfigError(f"spacing values must be finite and > 0, got {sp.tolist()}")
    return sp


def union_bbox(a: np.ndarray, b: np.ndarray, pad: int = 1) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``a | b`` grown by ``pad`` voxels (clipped); None when both are empty."""
    u = a | b
    out = []
    for axis in range(u.ndim):
        hit = np.flatnonzero(u.any(axis=tuple(k for k in range(u.ndim) if k != axis)))
        if not len(hit):
            return None
        out.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, u.shape[axis])))
    return tuple(out)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` removed by one binary erosion (face connectivity; outside the array counts as empty)."""
    return mask & ~ndimage.binary_erosion(mask)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances (in ``spacing`` units) from every surface voxel of ``a`` to the surface of ``b``, and back.

    Exact, and cheap because nothing is computed over the whole array: both masks are cropped to
    the bounding box of their union (one voxel of margin, so the erosion sees the same
    neighbourhood as in the full array); surface voxels shared by both masks are at distance 0;
    the others look for the other surface among their neighbours in order of increasing physical
    distance up to ``3 * min(spacing)`` (the first hit is the nearest), and the few left over are
    matched with a k-d tree over physical coordinates. No dense distance transform is run. An
    empty surface on the other side gives ``inf`` distances (as MONAI's ``get_surface_distance``).
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ConfigError(f"masks differ in shape: {a.shape} vs {b.shape}")
    sp = _check_spacing(spacing, a.ndim)
    box = union_bbox(a, b)
    if box is None:
        return np.zeros(0), np.zeros(0)
    sa, sb = surface_voxels(a[box]), surface_voxels(b[box])
    shared = sa & sb
    return _directed(sa, sb, shared, sp), _directed(sb, sa, shared, sp)


def _offsets(sp: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer neighbour offsets within ``radius`` (physical units), sorted by length; their lengths; reach per axis."""
    reach = np.floor(radius / sp + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    offs = np.stack([g.ravel() for g in grids], 1)
    lengths = np.sqrt(((offs * sp) ** 2).sum(1))
    keep = (lengths > 0) & (lengths <= radius + 1e-9)
    order = np.argsort(lengths[keep], kind="stable")
    return offs[keep][order], lengths[keep][order], reach


def _directed(sx: np.ndarray, sy: np.ndarray, shared: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """Distance of every surface voxel of ``sx`` to the nearest voxel of ``sy`` (both cropped alike)."""
    n_shared = int(shared.sum())
    rest = np.argwhere(sx & ~shared)
    if not len(rest):
        return np.zeros(n_shared)
    if not sy.any():
        return np.full(n_shared + len(rest), np.inf)
    d = np.full(len(rest), np.inf)
    offs, lengths, reach = _offsets(sp, 3.0 * float(sp.min()))
    if len(offs):  # local search: neighbours in order of distance, on a copy of sy padded by the reach
        padded = np.pad(sy, [(int(r), int(r)) for r in reach])
        flat = padded.ravel()
        strides = np.array([int(np.prod(padded.shape[k + 1:])) for k in range(padded.ndim)])
        q = (rest + reach) @ strides
        todo = np.arange(len(rest))
        for off, length in zip(offs @ strides, lengths):
            hit = flat[q[todo] + off]
            if hit.any():
                d[todo[hit]] = length
                todo = todo[~hit]
                if not len(todo):
                    break
    else:
        todo = np.arange(len(rest))
    if len(todo):  # farther than the local search reaches: exact nearest neighbour over the whole surface
        from scipy.spatial import cKDTree
        tree = cKDTree(np.argwhere(sy) * sp, leafsize=32, balanced_tree=False, compact_nodes=False)
        d[todo] = tree.query(rest[todo] * sp, k=1)[0]
    return np.concatenate([np.zeros(n_shared), d])


def hd95_from(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    """The larger of the two directed 95th percentiles (MONAI ``compute_hausdorff_distance(percentile=95)``)."""
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def assd_from(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    """Average symmetric surface distance: the mean over both directions' surface voxels."""
    return float(np.concatenate([d_ab, d_ba]).mean())


def nsd_from(d_ab: np.ndarray, d_ba: np.ndarray, tolerance: float) -> float:
    """Normalised surface distance: the fraction of both surfaces within ``tolerance`` of the other."""
    total = len(d_ab) + len(d_ba)
    return float(((d_ab <= tolerance).sum() + (d_ba <= tolerance).sum()) / total) if total else math.nan


def segmentation_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, class_names: Sequence[str],
                         include_background: bool = False, hd95: bool = False,
                         spacing: Sequence[float] | None = None, surface: Sequence[str] = (),
                         tolerance_mm: float = 1.0, empty: str = "one") -> list[MetricValue]:
    """Per-class Dice and Jaccard of one 2D image or 3D volume (and surface metrics), their class means.

    ``pred`` and ``target`` are integer label maps of equal shape with values in ``0..num_classes-1``;
    class 0 is background and is left out unless ``include_background``. The means are over the
    included classes where a value is defined; ``dice_jaccard_mean = (mean Dice + mean Jaccard) / 2``.

    Surface metrics (``surface`` names some of ``hd95``, ``assd``, ``nsd``; ``hd95=True`` adds
    ``hd95``) are in ``spacing`` units (mm for a volume's voxel size; default 1 per voxel):
    HD95, the average symmetric surface distance and the normalised surface distance at
    ``tolerance_mm``, with MONAI's definitions (surface = voxels removed by one erosion), computed
    on the bounding box of the two masks (:func:`surface_distances`).

    Empty masks: a class absent from the truth but predicted scores Dice/Jaccard/NSD 0 (distances
    undefined, NaN). A class absent from both is scored by ``empty``: ``one`` (Dice, Jaccard and
    NSD 1: nothing to find, nothing found) or ``nan`` (left out of the means, as nnU-Net does);
    its distances are NaN either way. Every such value carries a note saying why.
    """
    option("empty", empty, str, choices=EMPTY_CONVENTIONS, what="empty")
    wanted = list(dict.fromkeys((["hd95"] if hd95 else []) + list(surface)))
    for m in wanted:
        option("surface metric", m, str, choices=SURFACE_METRICS, what="surface metric")
    if not (isinstance(tolerance_mm, (int, float)) and math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ConfigError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape:
        raise ConfigError(f"prediction and target shapes differ: {p.shape} vs {t.shape}")
    if p.ndim not in (2, 3):
        raise ConfigError(f"segmentation metrics take a 2D image or 3D volume, got {p.ndim} dimensions {p.shape}")
    if len(class_names) != num_classes:
        raise ConfigError(f"num_classes is {num_classes} but {len(class_names)} class names were given")
    maps = []
    for name, a in (("prediction", p), ("target", t)):  # float maps holding whole numbers are accepted
        whole = a.dtype.kind in "biu" or bool(np.all(np.isfinite(a) & (a == np.round(a))))
        if a.size and (not whole or a.min() < 0 or a.max() >= num_classes):
            raise ConfigError(f"{name} must be an integer label map with values in 0..{num_classes - 1}, "
                              f"got dtype {a.dtype} and values {np.unique(a)[:10].tolist()}")
        maps.append(a.astype(np.int64, copy=False))
    p, t = maps
    sp = _check_spacing(spacing, p.ndim)
    classes = list(range(0 if include_background else 1, num_classes))
    if not classes:
        raise ConfigError("no class to score: num_classes is 1 and include_background is False")
    conf = np.bincount(t.ravel() * num_classes + p.ravel(),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(conf)[classes].astype(np.float64)
    fn, fp = conf.sum(1)[classes] - tp, conf.sum(0)[classes] - tp
    empty_truth = (tp + fn) == 0
    both_empty = empty_truth & (fp == 0)
    fill = 1.0 if empty == "one" else math.nan
    dice = np.where(both_empty, fill, _ratio(2 * tp, 2 * tp + fp + fn))
    jac = np.where(both_empty, fill, _ratio(tp, tp + fp + fn))
    both_note = "empty truth and prediction"
    n_both = int(both_empty.sum())
    convention = (f"{n_both} class(es) empty in truth and prediction scored {'1' if empty == 'one' else 'NaN'} "
                  f"(empty={empty})") if n_both else None
    notes = [both_note if e and f == 0 else "empty truth, non-empty prediction" if e else None
             for e, f in zip(empty_truth, fp)]
    names = [class_names[c] for c in classes]
    rows: list[MetricValue] = []
    means = {}
    for metric, vals in (("dice", dice), ("jaccard", jac)):
        rows += [MetricValue(metric, float(v), n, note=note) for v, n, note in zip(vals, names, notes)]
        means[metric] = float(_nanmean(vals, 0))
        rows.append(MetricValue(metric, means[metric], note=_join(_aggregate_note(vals, names, [None] * len(names)),
                                                                   convention)))
    rows.append(MetricValue("dice_jaccard_mean", (means["dice"] + means["jaccard"]) / 2))
    if wanted:
        values: dict[str, list[float]] = {m: [] for m in wanted}
        for c, name, both in zip(classes, names, both_empty):
            a, b = p == c, t == c
            has_a, has_b = bool(a.any()), bool(b.any())
            got: dict[str, float] = {}
            note = None
            if has_a and has_b:
                d_ab, d_ba = surface_distances(a, b, sp)
                got = {"hd95": hd95_from(d_ab, d_ba), "assd": assd_from(d_ab, d_ba),
                       "nsd": nsd_from(d_ab, d_ba, float(tolerance_mm))}
            elif both:
                note = "empty truth and prediction"
                got = {"hd95": math.nan, "assd": math.nan, "nsd": fill}
            else:
                note = f"empty {'truth' if not has_b else 'prediction'}"
                got = {"hd95": math.nan, "assd": math.nan, "nsd": 0.0}
            for m in wanted:
                values[m].append(got[m])
                m_note = note if (note and (math.isnan(got[m]) or both)) else None
                rows.append(MetricValue(m, got[m], name, note=m_note))
        for m in wanted:
            v = np.array(values[m])
            agg = _aggregate_note(v, names, [None] * len(names))
            rows.append(MetricValue(m, float(_nanmean(v, 0)), note=_join(agg, convention) if m == "nsd" else agg))
    return rows


CASE_SD_METRICS = ("dice", "jaccard")  # per-case metrics whose sd across cases is reported


def aggregate_cases(per_case: Sequence[Sequence[MetricValue]], *, bootstrap: int = 0, seed: int = 0
              ) -> list[MetricValue]:
    """Average per-case metric values (images or volumes) over cases, per (metric, class).

    Undefined per-case values (NaN, e.g. HD95 with an empty prediction) are left out of the
    mean and counted in the note, with the notes the per-case metrics gave. Class-mean rows
    (``cls=None``) get a percentile bootstrap CI over cases when ``bootstrap`` > 0. Dice and
    Jaccard (class mean and per class) also get ``dice_sd`` / ``jaccard_sd``: the sample standard
    deviation (ddof 1) across the cases, as "mean (sd)" tables report them (RAD-DINO Table 3).
    """
    values: dict[tuple[str, str | None], list[float]] = defaultdict(list)
    notes: dict[tuple[str, str | None], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    order: list[tuple[str, str | None]] = []
    for case in per_case:
        for m in case:
            key = (m.metric, m.cls)
            if key not in values:
                order.append(key)
            v = m.value
            values[key].append(float("nan") if v is None else float(v))
            if getattr(m, "note", None):
                notes[key][str(m.note)] += 1
    rng = np.random.default_rng(seed)
    out = []
    for key in order:
        v = np.asarray(values[key], dtype=np.float64)
        ok = np.isfinite(v)
        n = int(len(v))
        mean = float(v[ok].mean()) if ok.any() else float("nan")
        parts = [f"{cnt}/{n} cases: {text}" for text, cnt in notes[key].items()]
        if (~ok).any():
            parts.insert(0, f"undefined for {int((~ok).sum())}/{n} cases (left out of the mean)")
        lo = hi = None
        if bootstrap > 0 and key[1] is None and ok.sum() >= 2:
            good = v[ok]
            idx = rng.integers(0, len(good), size=(bootstrap, len(good)))
            means = good[idx].mean(axis=1)
            lo, hi = (float(x) for x in np.percentile(means, [2.5, 97.5]))
        out.append(MetricValue(metric=key[0], value=mean, cls=key[1], ci_low=lo, ci_high=hi,
                               note="; ".join(parts) or None))
        if key[0] in CASE_SD_METRICS:
            good = v[ok]
            sd = float(good.std(ddof=1)) if len(good) > 1 else float("nan")
            out.append(MetricValue(metric=f"{key[0]}_sd", value=sd, cls=key[1],
                                   note=f"sd across {len(good)} cases" if len(good) > 1 else
                                   f"undefined: {len(good)} case(s) with a value"))
    return out


def _join(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None
