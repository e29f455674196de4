"""Frozen-feature protocols on cached features: kNN, ML-kNN, linear-probe sweep, few-shot, metadata probes.

None of them runs the backbone: they read the feature store, so a grid of probes costs a
small fraction of one extraction pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from medprobe.data.base import ImageDataset, record_metadata
from medprobe.errors import ConfigError
from medprobe.options import require
from medprobe.metrics import MetricValue, classification_metrics
from medprobe.predictions import Predictions, classification_predictions
from medprobe.protocols.base import ArchInfo, FeatureNeeds, Protocol, Unit, UnitContext, UnitResult, register_protocol
from medprobe.protocols.fewshot import sample_fewshot
from medprobe.protocols.knn import knn_predict
from medprobe.protocols.linear import DEFAULT_LRS, linear_sweep
from medprobe.protocols.logreg import DEFAULT_CS, logreg_sweep
from medprobe.protocols.mlknn import mlknn_predict

CLASSIFICATION = ("binary", "multiclass", "multilabel")
Pooling = Literal["mean", "max"]


def _classification_only(dataset: ImageDataset) -> str | None:
    if dataset.task.kind not in CLASSIFICATION:
        return f"needs a classification dataset, {dataset.name} is {dataset.task.kind}"
    return None


@dataclass
class Target:
    """Labels of train/val/test for a probe: the dataset's labels or a metadata column."""

    task: str
    class_names: tuple[str, ...]
    y: dict[str, np.ndarray]
    keep: dict[str, np.ndarray]  # boolean row masks (rows without a target value are dropped)


def dataset_target(store) -> Target:
    task = store.meta["task"]
    y = {s: store.labels(s) for s in store.splits}
    keep = {s: np.ones(len(y[s]), dtype=bool) for s in store.splits}
    return Target(task, tuple(store.meta["class_names"]), y, keep)


def metadata_target(store, column: str) -> Target:
    """A metadata column as a classification target (categories sorted; missing values dropped)."""
    values = {s: store.metadata(s, column) for s in store.splits}
    present = sorted({str(v) for vs in values.values() for v in vs if v is not None and v == v and v != ""})
    if len(present) < 2:
        raise ConfigError(f"metadata column {column!r} has {len(present)} distinct value(s) in this dataset; "
                          "a probe needs at least 2")
    index = {c: i for i, c in enumerate(present)}
    y, keep = {}, {}
    for s, vs in values.items():
        keep[s] = np.array([v is not None and v == v and v != "" for v in vs], dtype=bool)
        y[s] = np.array([index[str(v)] if k else -1 for v, k in zip(vs, keep[s])], dtype=np.int64)
    return Target("binary" if len(present) == 2 else "multiclass", tuple(present), y, keep)


def _split(store, split: str) -> str:
    if split not in store.splits:
        raise ConfigError(f"the dataset has no {split!r} split (it has {', '.join(store.splits)})")
    return split


def _pooled(ctx: UnitContext, store, split: str, variant: str, blocks: int, pooling: str) -> np.ndarray:
    key = f"features:{split}:{variant}:{blocks}:{pooling}"
    if key not in ctx.memo:
        ctx.memo[key] = store.features(split, variant, blocks, pooling)
    return ctx.memo[key]


def _score(target: Target, split: str, scores: np.ndarray, ctx: UnitContext, seed: int) -> list[MetricValue]:
    y = target.y[split][target.keep[split]]
    if target.task == "binary" and scores.ndim == 2:
        scores = scores[:, 1]
    return classification_metrics(y, scores, target.task, target.class_names, bootstrap=ctx.bootstrap, seed=seed)


def _predictions(store, target: Target, scores: dict[str, np.ndarray], dataset: ImageDataset | None = None
                 ) -> Predictions:
    """Per-sample predictions of the kept rows of each scored split (what the metrics were computed from),
    with the samples' metadata columns when the dataset is given (for subgroup analyses)."""
    parts, metadata = {}, {}
    by_key = {r.key: r for r in dataset.records} if dataset is not None else {}
    for split, sc in scores.items():
        rows = np.flatnonzero(target.keep[split])
        keys, pids = store.keys(split), store.patient_ids(split)
        chosen = [keys[i] for i in rows]
        parts[split] = (chosen, [pids[i] for i in rows], target.y[split][rows], sc)
        if hasattr(store, "metadata_rows"):  # a cross-dataset view: test rows belong to another dataset
            metas = store.metadata_rows(split)
            picked = [metas[i] for i in rows]
            metadata[split] = {k: [m.get(k) for m in picked] for k in dict.fromkeys(k for m in picked for k in m)}
        elif by_key and all(k in by_key for k in chosen):
            metadata[split] = record_metadata([by_key[k] for k in chosen])
    return classification_predictions(target.task, target.class_names, parts, metadata=metadata)


# --------------------------------------------------------------------------- kNN / ML-kNN
@dataclass
class KNNOptions:
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    pooling: Pooling = "mean"

    def __post_init__(self) -> None:
        require(all(k >= 1 for k in self.k), f"k: every k must be >= 1, got {self.k}")
        require(self.temperature > 0, f"temperature: must be > 0, got {self.temperature}")


def _knn_scores(ctx: UnitContext, options: KNNOptions, target: Target, multilabel: bool
                ) -> dict[str, tuple[dict[int, np.ndarray], dict[int, int]]]:
    """Predictions on test (and val) for every k from one neighbour search per split, memoised across the k
    units: ``{split: ({k: scores}, {k: k actually used})}``."""
    memo_key = f"knn:{options.k}:{options.temperature}:{options.pooling}:{id(target)}:{multilabel}"
    if memo_key not in ctx.memo:
        store = ctx.features(FeatureNeeds(1))
        tr = _split(store, "train")
        _split(store, "test")
        xtr = _pooled(ctx, store, tr, "cls", 1, options.pooling)[target.keep[tr]]
        ytr = target.y[tr][target.keep[tr]]
        out = {}
        for split in ("val", "test"):
            if split not in store.splits or not target.keep[split].any():
                continue
            xq = _pooled(ctx, store, split, "cls", 1, options.pooling)[target.keep[split]]
            if multilabel:
                pred = mlknn_predict(xtr, ytr, xq, ks=options.k)
            else:
                pred = knn_predict(xtr, ytr, xq, num_classes=len(target.class_names), ks=options.k,
                                   temperature=options.temperature)
            used = dict(pred.effective_k)
            out[split] = (dict(pred), used)
        ctx.memo[memo_key] = out
    return ctx.memo[memo_key]


def _knn_result(store, target: Target, by_split: dict, k: int, ctx: UnitContext, seed: int,
                info: dict[str, Any]) -> UnitResult:
    if "test" not in by_split:
        raise ConfigError("no test sample has a value of the probe's target; nothing to score")
    scores = {split: preds[k] for split, (preds, _) in by_split.items()}
    k_used = by_split["test"][1][k]
    metrics = _score(target, "test", scores["test"], ctx, seed)
    info = dict(info, k=k, k_used=k_used, train_samples=int(target.keep["train"].sum()))
    if k_used < k:
        note = f"k={k} asked, {k_used} used: the training set has {int(target.keep['train'].sum())} samples"
        info["note"] = note
        metrics.append(MetricValue("k_used", float(k_used), note=note))
    return UnitResult(metrics, info, predictions=_predictions(store, target, scores, ctx.dataset))


@register_protocol
class KNN(Protocol):
    name = "knn"
    summary = "weighted kNN on L2-normalised last-layer features (ML-kNN for multi-label), several k from one search"
    Options = KNNOptions
    expands = {"k": "k"}
    cross_dataset = True  # scored through the store's test split: test_on works (medprobe.experiment.cross)

    def supports(self, dataset: ImageDataset) -> str | None:
        return _classification_only(dataset)

    def variant(self, params: dict[str, Any]) -> str:
        return f"{params['method']} k={params['k']}"

    def units(self, options: KNNOptions, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        # deterministic: one unit per k, recorded with the first seed
        method = "mlknn" if dataset.task.kind == "multilabel" else "knn"
        return [Unit(self.name, {"k": k, "method": method}, seeds[0]) for k in dict.fromkeys(options.k)]

    def run(self, unit: Unit, options: KNNOptions, ctx: UnitContext) -> UnitResult:
        store = ctx.features(FeatureNeeds(1))
        target = ctx.memo.setdefault("target:dataset", dataset_target(store))
        by_split = _knn_scores(ctx, options, target, target.task == "multilabel")
        return _knn_result(store, target, by_split, unit.params["k"], ctx, unit.seed, {"method": unit.params["method"]})


# --------------------------------------------------------------------------- linear sweep
Variant = Literal["cls", "cls+mean"]


@dataclass
class LinearOptions:
    """The cached-feature SGD sweep (``solver: sweep``, DINOv2's protocol) or scikit-learn's L-BFGS logistic
    regression over ``Cs`` (``solver: sklearn_lbfgs``); ``folds: K`` = K-fold cross-validation by patient
    over every split pooled (mean ± sd over folds); ``train_subset: [N, ...]`` = stratified, seeded training
    subsets of N samples (one unit each)."""

    inputs: list[Variant] = field(default_factory=lambda: ["cls", "cls+mean"])
    blocks: list[int] = field(default_factory=lambda: [1, 4])
    epochs: int = 10
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    batch_size: int = 256
    weight_decay: float = 0.0
    class_weighting: bool = False
    select_metric: Literal["auroc", "auprc", "accuracy", "kappa"] = "auroc"
    pooling: Pooling = "mean"
    solver: Literal["sweep", "sklearn_lbfgs"] = "sweep"
    Cs: list[float] = field(default_factory=lambda: list(DEFAULT_CS))  # sklearn_lbfgs: inverse L2 strengths
    max_iter: int = 1000  # sklearn_lbfgs
    folds: int | None = None
    train_subset: list[int] = field(default_factory=list)
    # augmented: DINOv2's online features of random-resized-crop + flip training images from the frozen backbone,
    # recomputed every epoch (medprobe.protocols.linear_augmented; the store is not read)
    mode: Literal["cached", "augmented"] = "cached"

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs: must be >= 1, got {self.epochs}")
        require(len(self.Cs) > 0 and all(c > 0 for c in self.Cs), f"Cs: every value must be > 0, got {self.Cs}")
        require(self.max_iter >= 1, f"max_iter: must be >= 1, got {self.max_iter}")
        require(self.folds is None or self.folds >= 3,
                f"folds: K-fold cross-validation needs K >= 3 (a test, a validation and a training fold), "
                f"got {self.folds}")
        require(all(n >= 1 for n in self.train_subset), f"train_subset: sizes must be >= 1, got {self.train_subset}")
        require(self.folds is None or not self.train_subset, "folds and train_subset: use one or the other")
        require(all(lr > 0 for lr in self.lrs), f"lrs: every learning rate must be > 0, got {self.lrs}")
        require(all(b >= 1 for b in self.blocks), f"blocks: numbers of last blocks must be >= 1, got {self.blocks}")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require(self.mode == "cached" or (self.solver == "sweep" and self.folds is None),
                "mode: augmented trains the SGD sweep on online features (solver: sweep, no folds)")


def _variant_inputs(ctx: UnitContext, store, split: str, options: LinearOptions, rows: np.ndarray | None
                    ) -> dict[str, torch.Tensor]:
    out = {}
    for variant in options.inputs:
        for n in options.blocks:
            x = _pooled(ctx, store, split, variant, n, options.pooling)
            out[f"{variant}@{n}"] = torch.from_numpy(np.ascontiguousarray(x if rows is None else x[rows]))
    return out


def _fit(options: LinearOptions, target: Target, seed: int, train: dict[str, torch.Tensor], y_train: np.ndarray,
         val: dict[str, torch.Tensor] | None, y_val: np.ndarray | None, test: dict[str, torch.Tensor]):
    """One selection over inputs x blocks x (learning rates | Cs) with the configured solver."""
    common = dict(task=target.task, num_classes=len(target.class_names), class_weighting=options.class_weighting,
                  seed=seed, select_metric=options.select_metric)
    if options.solver == "sklearn_lbfgs":
        return logreg_sweep(train, y_train, val, y_val, test, Cs=options.Cs, max_iter=options.max_iter, **common)
    return linear_sweep(train, y_train, val, y_val, test, lrs=options.lrs, epochs=options.epochs,
                        batch_size=options.batch_size, weight_decay=options.weight_decay, **common)


def _fit_info(options: LinearOptions, result: Any, has_val: bool, n_train: int) -> dict[str, Any]:
    info = {"solver": options.solver, "best_input": result.best_variant,
            ("best_C" if options.solver == "sklearn_lbfgs" else "best_lr"): result.best_lr,
            "best_val": result.best_val,
            "selected_on": getattr(result, "selected_on", "val" if has_val else "train"),
            "heads": len(result.val_table), "train_samples": int(n_train)}
    if not getattr(result, "converged", True):
        info["note"] = f"L-BFGS stopped at max_iter={options.max_iter} for the chosen model (not converged)"
    return info


def run_linear(ctx: UnitContext, options: LinearOptions, target: Target, seed: int,
               train_rows: np.ndarray | None = None) -> UnitResult:
    """One linear selection (all inputs × blocks × learning rates or Cs), scored on test."""
    store = ctx.features(FeatureNeeds(max(options.blocks)))
    tr, te = _split(store, "train"), _split(store, "test")
    keep_tr = np.flatnonzero(target.keep[tr]) if train_rows is None else train_rows
    has_val = "val" in store.splits and target.keep["val"].any()
    val = _variant_inputs(ctx, store, "val", options, np.flatnonzero(target.keep["val"])) if has_val else None
    result = _fit(options, target, seed, _variant_inputs(ctx, store, tr, options, keep_tr), target.y[tr][keep_tr],
                  val, target.y["val"][target.keep["val"]] if has_val else None,
                  _variant_inputs(ctx, store, te, options, np.flatnonzero(target.keep[te])))
    info = _fit_info(options, result, has_val, len(keep_tr))
    scores = {te: result.test_scores}
    if has_val:
        scores["val"] = result.val_scores
    return UnitResult(_score(target, te, result.test_scores, ctx, seed), info,
                      predictions=_predictions(store, target, scores, ctx.dataset))


def train_subset_rows(y: np.ndarray, rows: np.ndarray, n: int, seed: int, task: str) -> np.ndarray:
    """``n`` of ``rows`` drawn with ``seed``, stratified by class (multi-label: by label combination when every
    combination occurs at least twice and fits, else unstratified); sorted."""
    from sklearn.model_selection import train_test_split
    if n > len(rows):
        raise ConfigError(f"train_subset: {n} samples asked, the training split has {len(rows)} with a label")
    if n == len(rows):
        return np.sort(rows)
    labels = y[rows]
    strata = np.array(["".join(map(str, r.astype(int))) for r in labels]) if task == "multilabel" else labels
    counts = np.unique(strata, return_counts=True)[1]
    ok = counts.min() >= 2 and len(counts) <= n <= len(rows) - len(counts)
    chosen, _ = train_test_split(rows, train_size=n, random_state=seed, stratify=strata if ok else None)
    return np.sort(chosen)


def run_linear_folds(ctx: UnitContext, options: LinearOptions, target: Target, seed: int) -> UnitResult:
    """K-fold cross-validation by patient over every split pooled: fold k is test, fold k+1 selects, the rest
    train. Metrics are the mean over folds (sd in ``<metric>_fold_sd`` and in the note); predictions are the
    out-of-fold scores of every sample."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
    k = int(options.folds)
    store = ctx.features(FeatureNeeds(max(options.blocks)))
    parts = [(s, np.flatnonzero(target.keep[s])) for s in store.splits]
    by_split = [_variant_inputs(ctx, store, s, options, r) for s, r in parts]
    feats = {name: torch.cat([x[name] for x in by_split]) for name in by_split[0]}
    y = np.concatenate([target.y[s][r] for s, r in parts])
    keys = [store.keys(s)[i] for s, r in parts for i in r]
    pids = [store.patient_ids(s)[i] for s, r in parts for i in r]
    groups = np.unique(pids, return_inverse=True)[1]
    if len(np.unique(groups)) < k:
        raise ConfigError(f"folds: {k} folds asked, the dataset has {len(np.unique(groups))} patients with a label")
    splitter = (GroupKFold(n_splits=k, shuffle=True, random_state=seed) if target.task == "multilabel"
                else StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed))
    fold_of = np.empty(len(y), dtype=np.int64)
    for i, (_, test_idx) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        fold_of[test_idx] = i

    def pick(idx: np.ndarray) -> dict[str, torch.Tensor]:
        return {name: x[torch.from_numpy(idx)] for name, x in feats.items()}

    scores: np.ndarray | None = None
    per_fold, chosen = [], []
    for i in range(k):
        te, va = np.flatnonzero(fold_of == i), np.flatnonzero(fold_of == (i + 1) % k)
        tr = np.flatnonzero((fold_of != i) & (fold_of != (i + 1) % k))
        result = _fit(options, target, seed, pick(tr), y[tr], pick(va), y[va], pick(te))
        test_scores = result.test_scores
        if target.task == "binary" and test_scores.ndim == 2:
            test_scores = test_scores[:, 1]
        if scores is None:
            scores = np.zeros((len(y),) + test_scores.shape[1:])
        scores[te] = test_scores
        per_fold.append(classification_metrics(y[te], test_scores, target.task, target.class_names, bootstrap=0,
                                               seed=seed))
        chosen.append({"best_input": result.best_variant, "best": result.best_lr, "best_val": result.best_val,
                       "train": int(len(tr)), "val": int(len(va)), "test": int(len(te))})
    metrics = []
    for row in per_fold[0]:
        vals = np.array([next((m.value for m in fold if m.metric == row.metric and m.cls == row.cls), np.nan)
                         for fold in per_fold], dtype=np.float64)
        mean, sd = float(np.nanmean(vals)), float(np.nanstd(vals, ddof=1))
        metrics.append(MetricValue(row.metric, mean, row.cls, note=f"mean over {k} patient folds, sd {sd:.4g}"))
        if row.cls is None:
            metrics.append(MetricValue(f"{row.metric}_fold_sd", sd, note=f"sd over {k} patient folds"))
    by_key = {r.key: r for r in ctx.dataset.records} if ctx.dataset is not None else {}
    meta = {"test": record_metadata([by_key[x] for x in keys])} if by_key and all(x in by_key for x in keys) else {}
    predictions = classification_predictions(target.task, target.class_names, {"test": (keys, pids, y, scores)},
                                             metadata=meta)
    predictions.splits["test"].columns["fold"] = fold_of
    info = {"solver": options.solver, "folds": k, "per_fold": chosen, "samples": int(len(y)),
            "patients": int(len(np.unique(groups))), "scores": "out-of-fold scores of every sample"}
    return UnitResult(metrics, info, predictions=predictions)


def run_linear_augmented(ctx: UnitContext, options: LinearOptions, seed: int, train_subset: int | None) -> UnitResult:
    """The linear sweep on online features of augmented training images (the backbone runs; no store)."""
    from medprobe.features.extract import preprocessor_for
    from medprobe.protocols.linear_augmented import DatasetRows, augmented_sweep
    ds = ctx.dataset
    rows = DatasetRows(ds)
    splits = {s: np.asarray(ds.indices(s)) for s in rows.splits}
    target = Target(ds.task.kind, tuple(ds.task.class_names), {s: ds.labels(i) for s, i in splits.items()},
                    {s: np.ones(len(i), dtype=bool) for s, i in splits.items()})
    train = np.arange(len(splits.get("train", [])))
    if train_subset is not None:
        train = train_subset_rows(target.y["train"], train, int(train_subset), seed, target.task)
    if "backbone:linear_augmented" not in ctx.memo:
        with torch.random.fork_rng():  # a random-weight backbone is the same whatever unit builds it
            torch.manual_seed(0)
            backbone = ctx.backbone()
        for p in backbone.parameters():
            p.requires_grad_(False)
        ctx.memo["backbone:linear_augmented"] = backbone
    backbone = ctx.memo["backbone:linear_augmented"]
    chosen = dict(splits, train=splits["train"][train]) if "train" in splits else splits
    result = augmented_sweep(backbone, ds, preprocessor_for(backbone, ds, ctx.image_size), chosen,
                             {s: target.y[s] if s != "train" else target.y[s][train] for s in chosen},
                             variants=[f"{v}@{n}" for v in options.inputs for n in options.blocks],
                             task=target.task, num_classes=len(target.class_names), lrs=options.lrs,
                             epochs=options.epochs, batch_size=options.batch_size,
                             weight_decay=options.weight_decay, class_weighting=options.class_weighting, seed=seed,
                             select_metric=options.select_metric, device=ctx.device, precision=ctx.precision,
                             feature_batch=ctx.batch_size)
    has_val = "val" in splits
    info = _fit_info(options, result, has_val, len(train))
    info.update(mode="augmented", epochs=result.epochs, steps=result.steps,
                input="online features of augmented images (random resized crop, hflip)")
    if train_subset is not None:
        info["train_subset"] = int(train_subset)
    scores = {"test": result.test_scores}
    if has_val:
        scores["val"] = result.val_scores
    return UnitResult(_score(target, "test", result.test_scores, ctx, seed), info,
                      predictions=_predictions(rows, target, scores, ds))


@register_protocol
class Linear(Protocol):
    name = "linear"
    summary = ("linear probe on cached features: CLS or CLS+mean-patch from the last 1/4 blocks; SGD sweep over 13 "
               "learning rates in one pass, or scikit-learn L-BFGS over C; optional patient k-fold CV and "
               "training-subset sizes")
    Options = LinearOptions
    expands = {"train_subset": "train_subset"}
    cross_dataset = True  # scored through the store's test split: test_on works (medprobe.experiment.cross)

    def feature_needs(self, options: LinearOptions, arch: ArchInfo | None = None) -> FeatureNeeds:
        return FeatureNeeds(1 if options.mode == "augmented" else max(options.blocks))

    def supports(self, dataset: ImageDataset) -> str | None:
        return _classification_only(dataset)

    def units(self, options: LinearOptions, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        if options.train_subset:
            return [Unit(self.name, {"train_subset": n}, s) for n in dict.fromkeys(options.train_subset) for s in seeds]
        return [Unit(self.name, {}, s) for s in seeds]

    def run(self, unit: Unit, options: LinearOptions, ctx: UnitContext) -> UnitResult:
        if options.mode == "augmented":
            return run_linear_augmented(ctx, options, unit.seed, unit.params.get("train_subset"))
        store = ctx.features(self.feature_needs(options))
        target = ctx.memo.setdefault("target:dataset", dataset_target(store))
        if options.folds:
            return run_linear_folds(ctx, options, target, unit.seed)
        n = unit.params.get("train_subset")
        if n is None:
            return run_linear(ctx, options, target, unit.seed)
        tr = _split(store, "train")
        rows = train_subset_rows(target.y[tr], np.flatnonzero(target.keep[tr]), int(n), unit.seed, target.task)
        result = run_linear(ctx, options, target, unit.seed, train_rows=rows)
        result.info["train_subset"] = int(n)
        return result


# --------------------------------------------------------------------------- few-shot
@dataclass
class FewShotOptions:
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    repeats: int = 5
    probes: list[Literal["linear", "knn"]] = field(default_factory=lambda: ["linear", "knn"])
    k: int = 20
    temperature: float = 0.07
    linear: LinearOptions = field(default_factory=lambda: LinearOptions(inputs=["cls"], blocks=[1]))

    def __post_init__(self) -> None:
        require(all(s >= 1 for s in self.shots), f"shots: every value must be >= 1, got {self.shots}")
        require(self.repeats >= 1, f"repeats: must be >= 1, got {self.repeats}")
        require(self.k >= 1, f"k: must be >= 1, got {self.k}")
        require(self.temperature > 0, f"temperature: must be > 0, got {self.temperature}")
        require(self.linear.folds is None and not self.linear.train_subset,
                "linear.folds / linear.train_subset: few-shot draws its own training sets (shots)")

    @property
    def linear_options(self) -> LinearOptions:
        return self.linear


@register_protocol
class FewShot(Protocol):
    name = "fewshot"
    summary = "n patients per class from train (R draws), linear probe and kNN on each draw"
    Options = FewShotOptions
    expands = {"shots": "shots", "probes": "probe"}
    cross_dataset = True  # scored through the store's test split: test_on works (medprobe.experiment.cross)

    def feature_needs(self, options: FewShotOptions, arch: ArchInfo | None = None) -> FeatureNeeds:
        return FeatureNeeds(max(options.linear_options.blocks))

    def supports(self, dataset: ImageDataset) -> str | None:
        return _classification_only(dataset)

    def variant(self, params: dict[str, Any]) -> str:
        return f"fewshot {params['probe']} {params['shots']}-shot"

    def units(self, options: FewShotOptions, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        # the R draws are the seeds of few-shot; seed r draws a different training subset
        return [Unit(self.name, {"shots": n, "probe": p}, r)
                for n in dict.fromkeys(options.shots) for p in dict.fromkeys(options.probes) for r in range(options.repeats)]

    def run(self, unit: Unit, options: FewShotOptions, ctx: UnitContext) -> UnitResult:
        store = ctx.features(self.feature_needs(options))
        target = ctx.memo.setdefault("target:dataset", dataset_target(store))
        tr = _split(store, "train")
        rows = np.flatnonzero(target.keep[tr])
        pids = [store.patient_ids(tr)[i] for i in rows]
        chosen = rows[sample_fewshot(target.y[tr][rows], pids, unit.params["shots"], unit.seed, target.task)]
        info = {"train_samples": int(len(chosen)), "train_patients": len({store.patient_ids(tr)[i] for i in chosen})}
        if unit.params["probe"] == "linear":
            res = run_linear(ctx, options.linear_options, target, unit.seed, train_rows=chosen)
            res.info.update(info)
            return res
        te = _split(store, "test")
        xtr = _pooled(ctx, store, tr, "cls", 1, "mean")[chosen]
        xte = _pooled(ctx, store, te, "cls", 1, "mean")[target.keep[te]]
        if target.task == "multilabel":
            scores = mlknn_predict(xtr, target.y[tr][chosen], xte, ks=[options.k])[options.k]
        else:
            scores = knn_predict(xtr, target.y[tr][chosen], xte, num_classes=len(target.class_names), ks=[options.k],
                                 temperature=options.temperature)[options.k]
        info["k_used"] = min(options.k, len(chosen))
        return UnitResult(_score(target, te, scores, ctx, unit.seed), info,
                          predictions=_predictions(store, target, {te: scores}, ctx.dataset))


# --------------------------------------------------------------------------- metadata probing
@dataclass
class MetadataOptions:
    columns: list[str]
    probes: list[Literal["linear", "knn"]] = field(default_factory=lambda: ["linear"])
    k: int = 20
    temperature: float = 0.07
    linear: LinearOptions = field(default_factory=lambda: LinearOptions(inputs=["cls"], blocks=[1]))

    def __post_init__(self) -> None:
        require(len(self.columns) > 0, "columns: name at least one metadata column (e.g. sex, age_bin, view)")
        require(self.k >= 1, f"k: must be >= 1, got {self.k}")
        require(self.temperature > 0, f"temperature: must be > 0, got {self.temperature}")
        require(not self.linear.train_subset, "linear.train_subset: applies to the linear protocol, not metadata probes")

    @property
    def linear_options(self) -> LinearOptions:
        return self.linear


@register_protocol
class MetadataProbe(Protocol):
    name = "metadata"
    summary = "probe a metadata column (sex, age bin, view...) with the same linear/kNN probes (RAD-DINO)"
    Options = MetadataOptions
    expands = {"columns": "column", "probes": "probe"}

    def feature_needs(self, options: MetadataOptions, arch: ArchInfo | None = None) -> FeatureNeeds:
        return FeatureNeeds(max(options.linear_options.blocks))

    def variant(self, params: dict[str, Any]) -> str:
        return f"metadata {params['column']} ({params['probe']})"

    def units(self, options: MetadataOptions, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        return [Unit(self.name, {"column": c, "probe": p}, s) for c in dict.fromkeys(options.columns)
                for p in dict.fromkeys(options.probes) for s in (seeds if p == "linear" else seeds[:1])]

    def run(self, unit: Unit, options: MetadataOptions, ctx: UnitContext) -> UnitResult:
        store = ctx.features(self.feature_needs(options))
        column = unit.params["column"]
        target = ctx.memo.setdefault(f"target:{column}", metadata_target(store, column))
        if unit.params["probe"] == "linear":
            if options.linear_options.folds:
                return run_linear_folds(ctx, options.linear_options, target, unit.seed)
            return run_linear(ctx, options.linear_options, target, unit.seed)
        knn_opts = KNNOptions(k=[options.k], temperature=options.temperature)
        by_split = _knn_scores(ctx, knn_opts, target, multilabel=False)
        return _knn_result(store, target, by_split, options.k, ctx, unit.seed, {"classes": list(target.class_names)})
