"""Linear-probe sweep: every input variant x learning rate trained together in one pass (DINOv2 linear eval).

Per input variant ``v`` (e.g. ``"cls@1"``, ``"cls+mean@4"``) the heads of all learning rates are
one weight tensor ``W_v (H, D_v, C_out)`` and bias ``b_v (H, C_out)``; a mini-batch gives the
logits of every head with one batched matmul. Features are standardised with the training mean
and standard deviation of each variant. All variants see the same shuffled mini-batches.

Optimiser. Per-head SGD with momentum 0.9, written out explicitly so that each head gets
exactly its own learning rate: with ``g = grad(loss_h) + weight_decay * p`` (weight decay on weights
and biases, as ``torch.optim.SGD``), ``buf = 0.9 * buf + g`` and ``p -= lr_h * cos_t * buf``, where
``cos_t = (1 + cos(pi * t / T)) / 2`` at step ``t`` of ``T`` is DINOv2's cosine schedule (to 0).
This is what ``torch.optim.SGD(momentum=0.9)`` with ``CosineAnnealingLR`` does for one head alone
(the tests check it): heads share data and batches, never gradients. The head initialisation
(weights N(0, 0.01), bias 0) is drawn once per variant from ``seed`` and the variant name, so a
head trained alone with the same seed and lr starts, and ends, the same.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medprobe.errors import ConfigError
from medprobe.metrics import metric_value
from medprobe.runtime import default_device
from medprobe.options import option

DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
TASKS = ("binary", "multiclass", "multilabel")
SELECT_METRICS = ("auroc", "auprc", "accuracy", "kappa")
MOMENTUM = 0.9


@dataclass
class SweepResult:
    """The head chosen on the selection split and its scores; ``val_table`` lists every head."""

    best_variant: str
    best_lr: float
    best_val: float
    val_table: list[tuple[str, float, float]]  # (variant, lr, selection metric) for every head
    test_scores: np.ndarray                    # best head on test: binary (N,), else (N, C) probabilities
    val_scores: np.ndarray                     # best head on val; empty (0, ...) when there is no val split
    epochs: int
    selected_on: str = "val"                   # "val", or "train" when val is missing or its metric undefined
    steps: int = 0                             # optimisation steps taken (one pass: epochs x batches)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    standardisation: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)


def init_head(seed: int, variant: str, heads: int, dim: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial ``(W (heads, dim, out), b (heads, out))``: one N(0, 0.01) draw per (seed, variant) for all heads."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(variant.encode()))
    w = torch.randn(dim, out, generator=gen) * 0.01
    return w.expand(heads, dim, out).clone(), torch.zeros(heads, out)


def _features(split: dict[str, torch.Tensor] | None, names: list[str], what: str) -> dict[str, torch.Tensor]:
    if split is None:
        return {}
    if sorted(split) != sorted(names):
        raise ConfigError(f"{what} has input variants {sorted(split)} but train has {sorted(names)}")
    out = {}
    for v in names:
        x = split[v] if isinstance(split[v], torch.Tensor) else torch.from_numpy(np.ascontiguousarray(split[v]))
        if x.ndim != 2:
            raise ConfigError(f"{what}[{v!r}] must be (N, D) features, got shape {tuple(x.shape)}")
        out[v] = x.float()
    return out


def _targets(y: np.ndarray | torch.Tensor, task: str, num_classes: int, n: int, what: str) -> torch.Tensor:
    """Labels as the loss wants them: binary (N,) float, multiclass (N,) long, multilabel (N, C) float
    (``-1`` = missing, masked out of the loss)."""
    t = torch.as_tensor(np.asarray(y))
    shape_ok = t.shape == ((n, num_classes) if task == "multilabel" else (n,))
    if not shape_ok:
        want = f"({n}, {num_classes})" if task == "multilabel" else f"({n},)"
        raise ConfigError(f"{what} labels must have shape {want} for a {task} task, got {tuple(t.shape)}")
    top = 1 if task != "multiclass" else num_classes - 1
    low = -1 if task == "multilabel" else 0
    if t.numel() and (t.min() < low or t.max() > top or (task == "multilabel" and bool((t != t.round()).any()))):
        raise ConfigError(f"{what} labels of a {task} task must be in {'-1 (missing), 0, 1' if low else f'0..{top}'}, "
                          f"got {torch.unique(t)[:10].tolist()}")
    return t.long() if task == "multiclass" else t.float()


def inverse_frequency_weights(y: torch.Tensor, task: str, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights: multiclass ``N / (C n_c)``; binary/multilabel ``pos_weight = n_neg / n_pos``.

    An absent class, or a label that is never (or always) positive, gets weight 1. Missing multi-label
    targets (``-1``) count as neither positive nor negative.
    """
    if task == "multiclass":
        n_c = torch.bincount(y, minlength=num_classes).float()
        return torch.where(n_c > 0, y.numel() / (num_classes * n_c.clamp_min(1)), torch.ones_like(n_c))
    pos = (y == 1).sum(0).to(torch.float32)
    neg = (y == 0).sum(0).to(torch.float32)
    return torch.where((pos > 0) & (neg > 0), neg / pos.clamp_min(1), torch.ones_like(pos))


def _loss(logits: torch.Tensor, y: torch.Tensor, task: str, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean loss of every head: logits (H, B, C_out) → (H,).

    Multi-label targets of ``-1`` (missing) are masked out: the loss is the mean over the known
    (sample, class) targets of the batch (with no missing target, the plain mean)."""
    h, b, c = logits.shape
    if task == "multiclass":
        per = F.cross_entropy(logits.reshape(h * b, c), y.repeat(h), weight=weight, reduction="none").view(h, b)
        return per.sum(1) / (weight[y].sum() if weight is not None else b)
    target = y.view(b, -1).expand(h, b, c)
    known = target >= 0
    per = F.binary_cross_entropy_with_logits(logits, target.clamp_min(0), pos_weight=weight, reduction="none")
    if bool(known.all()):
        return per.mean((1, 2))
    return (per * known).sum((1, 2)) / known[0].sum().clamp_min(1)


#: rows scored at once by :func:`_predict` (bounds the (H, rows, C) logits on the device)
PREDICT_CHUNK = 16384
#: features up to this size are moved to the device whole; larger ones a mini-batch at a time
DEVICE_BUDGET = 2 << 30


@torch.no_grad()
def _predict(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, task: str) -> torch.Tensor:
    """Scores of every head on the CPU, (H, N) for binary and (H, N, C) otherwise (rows in chunks)."""
    out = []
    for i in range(0, max(len(x), 1), PREDICT_CHUNK):
        xc = x[i:i + PREDICT_CHUNK].to(w.device, non_blocking=True)
        logits = torch.einsum("nd,hdc->hnc", xc, w) + b[:, None, :]
        if task == "binary":
            scores = torch.sigmoid(logits[..., 0])
        else:
            scores = logits.softmax(-1) if task == "multiclass" else torch.sigmoid(logits)
        out.append(scores.float().cpu())
    return torch.cat(out, dim=1)


def _place(xs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Train features on ``device`` when they fit the budget; else left on the CPU (pinned on CUDA)."""
    if device.type == "cpu":
        return xs
    if sum(x.numel() * x.element_size() for x in xs.values()) <= DEVICE_BUDGET:
        return {v: x.to(device) for v, x in xs.items()}
    return {v: x.pin_memory() if device.type == "cuda" else x for v, x in xs.items()}


def _select(table: list[tuple[str, float, float]]) -> int:
    """Index of the best head: highest value, ties to the smaller lr then the earlier variant; NaN loses."""
    order = sorted(range(len(table)), key=lambda i: (table[i][1], i))
    best = order[0]
    for i in order[1:]:
        if table[i][2] > table[best][2] or (math.isnan(table[best][2]) and not math.isnan(table[i][2])):
            best = i
    return best


def linear_sweep(train: dict[str, torch.Tensor], y_train: np.ndarray, val: dict[str, torch.Tensor] | None,
                 y_val: np.ndarray | None, test: dict[str, torch.Tensor], task: str, num_classes: int,
                 lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 10, batch_size: int = 256,
                 weight_decay: float = 0.0, class_weighting: bool = False, seed: int = 0,
                 select_metric: str = "auroc", device: str | torch.device | None = None) -> SweepResult:
    """Train a linear head for every input variant x learning rate in one pass and pick the best on val.

    ``train``/``val``/``test`` map each variant name to (N, D_variant) features (same variants in
    each). Binary: one logit, BCE; multiclass: softmax cross-entropy; multilabel: per-class
    sigmoid BCE. ``class_weighting`` uses inverse class frequencies (``pos_weight`` for
    binary/multilabel). The head with the best ``select_metric`` on val (macro AUROC by
    default) wins, ties going to the smaller lr; when ``val`` is missing or empty, or the metric
    is undefined on val for every head (e.g. val holds one class), selection uses train
    (``selected_on == "train"``). Deterministic for a seed on CPU.

    ``device``: where the heads train (default: the GPU when there is one, else the CPU). The
    shuffling and the initialisation are drawn on the CPU, so a GPU run takes the same steps and
    gives the same numbers within floating-point tolerance; scoring runs in chunks of rows.
    """
    option("task", task, str, choices=TASKS, what="task")
    option("select_metric", select_metric, str, choices=SELECT_METRICS, what="select_metric")
    if select_metric == "kappa" and task == "multilabel":
        raise ConfigError("select_metric 'kappa' is not defined for multilabel tasks; use auroc, auprc or accuracy")
    lrs = [float(lr) for lr in lrs]
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ConfigError(f"lrs: every learning rate must be > 0, got {lrs}")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    names = list(train)
    if not names:
        raise ConfigError("train has no input variant")
    xtr = _features(train, names, "train")
    n = xtr[names[0]].shape[0]
    if n == 0 or any(x.shape[0] != n for x in xtr.values()):
        raise ConfigError(f"train variants must have the same, non-zero number of rows, got "
                          f"{ {v: x.shape[0] for v, x in xtr.items()} }")
    ytr = _targets(y_train, task, num_classes, n, "train")
    has_val = bool(val) and y_val is not None and len(y_val) > 0
    xva = _features(val, names, "val") if has_val else {}
    yva = _targets(y_val, task, num_classes, xva[names[0]].shape[0], "val") if has_val else None
    xte = _features(test, names, "test")
    for split, xs in (("val", xva), ("test", xte)):
        for v in names:
            if xs and xs[v].shape[1] != xtr[v].shape[1]:
                raise ConfigError(f"{split}[{v!r}] has {xs[v].shape[1]} features but train has {xtr[v].shape[1]}")

    stats = {}
    for v in names:  # standardise with train statistics (constant features keep scale 1)
        mean, std = xtr[v].mean(0), xtr[v].std(0, unbiased=False)
        stats[v] = (mean, torch.where(std > 0, std, torch.ones_like(std)))

    def standardise(xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {v: (x - stats[v][0]) / stats[v][1] for v, x in xs.items()}

    xtr, xva, xte = standardise(xtr), standardise(xva), standardise(xte)

    dev = default_device() if device is None else torch.device(device)
    c_out = 1 if task == "binary" else num_classes
    heads = len(lrs)
    lr = torch.tensor(lrs).view(heads, 1, 1).to(dev)
    weight = inverse_frequency_weights(ytr, task, num_classes).to(dev) if class_weighting else None
    params = {v: [p.to(dev).requires_grad_() for p in init_head(seed, v, heads, xtr[v].shape[1], c_out)]
              for v in names}
    xdev, ydev = _place(xtr, dev), ytr.to(dev)
    buffers = {v: [torch.zeros_like(p) for p in params[v]] for v in names}
    gen = torch.Generator().manual_seed(seed)
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            idx_dev = idx.to(dev)
            scale = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for v in names:
                x = xdev[v]
                xb = x[idx_dev] if x.device == dev else x[idx].to(dev, non_blocking=True)
                sgd_step(params[v], buffers[v], xb, ydev[idx_dev], task, weight, scale, weight_decay)
            step += 1
    return select_head(params, lrs, xtr, ytr, xva, yva, xte, task, num_classes, select_metric, epochs, step, stats)


def sgd_step(params: list[torch.Tensor], buffers: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, task: str,
             weight: torch.Tensor | None, scale: torch.Tensor, weight_decay: float) -> None:
    """One momentum-SGD step of every head of one variant on the mini-batch ``xb`` (B, D); ``scale`` (H, 1, 1)
    is each head's learning rate times the schedule."""
    w, b = params
    heads = w.shape[0]
    logits = torch.baddbmm(b.unsqueeze(1), xb.expand(heads, *xb.shape), w)  # (H, B, C_out)
    grads = torch.autograd.grad(_loss(logits, yb, task, weight).sum(), (w, b))
    with torch.no_grad():
        for p, g, buf in zip((w, b), grads, buffers):
            buf.mul_(MOMENTUM).add_(g + weight_decay * p if weight_decay else g)
            p.sub_(scale.view(heads, *[1] * (p.ndim - 1)) * buf)


def select_head(params: dict[str, list[torch.Tensor]], lrs: list[float], xtr: dict[str, torch.Tensor],
                ytr: torch.Tensor, xva: dict[str, torch.Tensor], yva: torch.Tensor | None,
                xte: dict[str, torch.Tensor], task: str, num_classes: int, select_metric: str, epochs: int,
                step: int, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> SweepResult:
    """Pick the best head on val (on train when val is missing or undefined) and score it on test;
    features are standardised."""
    names, heads = list(params), len(lrs)
    has_val = bool(xva) and yva is not None

    def table_on(xs: dict[str, torch.Tensor], y: torch.Tensor) -> tuple[list, dict[str, torch.Tensor]]:
        scores = {v: _predict(xs[v], *params[v], task) for v in names}
        y_np = y.numpy()
        rows = [(v, lrs[h], metric_value(y_np, scores[v][h].numpy(), task, select_metric))  # NaN if it diverged
                for v in names for h in range(heads)]
        return rows, scores

    selected_on = "val"
    if has_val:
        table, val_scores = table_on(xva, yva)
    if not has_val or all(math.isnan(r[2]) for r in table):
        selected_on = "train"
        table, _ = table_on(xtr, ytr)
    best = _select(table)
    variant, best_lr, best_value = table[best]
    h = lrs.index(best_lr)
    test_scores = _predict(xte[variant], *params[variant], task)[h].numpy()
    empty = (0,) if task == "binary" else (0, num_classes)
    return SweepResult(
        best_variant=variant, best_lr=best_lr, best_val=float(best_value), val_table=table,
        test_scores=test_scores, val_scores=val_scores[variant][h].numpy() if has_val else np.empty(empty, np.float32),
        epochs=epochs, selected_on=selected_on, steps=step,
        weights={v: (params[v][0].detach().cpu(), params[v][1].detach().cpu()) for v in names},
        standardisation=stats)
