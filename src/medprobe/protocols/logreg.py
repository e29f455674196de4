"""Linear evaluation with scikit-learn's L-BFGS logistic regression (CLIP-style papers, RAD-DINO's demographics).

For every input variant x inverse regularisation strength ``C`` a ``LogisticRegression(solver="lbfgs")``
is fitted on standardised training features (multinomial for multiclass; one model per label for
multi-label); the pair with the best ``select_metric`` on val wins (ties to the smaller ``C``, then
the earlier variant), on train when val is missing or the metric undefined there. The result has
the shape of :class:`~medprobe.protocols.linear.SweepResult` (``best_lr`` holds the chosen ``C``).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from medprobe.errors import ConfigError
from medprobe.metrics import metric_value
from medprobe.protocols.linear import SweepResult, _select

DEFAULT_CS = tuple(10.0 ** k for k in range(-6, 7))  # 1e-6 ... 1e6, the range of CLIP's linear-probe sweep


class _Model:
    """One fitted variant x C: per-output logistic regressions (a label constant in train predicts its value)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, task: str, c: float, max_iter: int, balanced: bool,
                 seed: int) -> None:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        self.task = task
        targets = [y[:, j] for j in range(y.shape[1])] if task == "multilabel" else [y]
        self.models: list[object | float] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded as n_iter == max_iter instead
            for t in targets:
                if len(np.unique(t)) < 2:
                    self.models.append(float(t[0]))
                    continue
                m = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, random_state=seed,
                                       class_weight="balanced" if balanced else None)
                self.models.append(m.fit(x, t))
        self.converged = all(isinstance(m, float) or int(np.max(m.n_iter_)) < max_iter for m in self.models)

    def scores(self, x: np.ndarray) -> np.ndarray:
        cols = [np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1] if self.task != "multiclass"
                else m.predict_proba(x) for m in self.models]
        if self.task == "multilabel":
            return np.stack(cols, axis=1)
        return cols[0]


def logreg_sweep(train: dict[str, torch.Tensor], y_train: np.ndarray, val: dict[str, torch.Tensor] | None,
                 y_val: np.ndarray | None, test: dict[str, torch.Tensor], task: str, num_classes: int,
                 Cs: Sequence[float] = DEFAULT_CS, max_iter: int = 1000, class_weighting: bool = False,
                 seed: int = 0, select_metric: str = "auroc") -> SweepResult:
    """Fit every variant x ``C`` and keep the best on val (see the module doc)."""
    Cs = [float(c) for c in Cs]
    if not Cs or any(not c > 0 for c in Cs):
        raise ConfigError(f"Cs: every inverse regularisation strength must be > 0, got {Cs}")
    if select_metric == "kappa" and task == "multilabel":
        raise ConfigError("select_metric 'kappa' is not defined for multilabel tasks; use auroc, auprc or accuracy")
    names = list(train)
    if task == "multiclass":
        present = np.unique(np.asarray(y_train))
        if len(present) < num_classes:  # predict_proba would lack columns
            raise ConfigError(f"the training set has {len(present)} of {num_classes} classes; scikit-learn's logistic "
                              "regression needs every class in train")
    xs = {}
    for v in names:
        x = np.asarray(train[v], dtype=np.float64)
        mean, std = x.mean(0), x.std(0)
        std = np.where(std > 0, std, 1.0)
        xs[v] = [(np.asarray(s[v], dtype=np.float64) - mean) / std if s else None for s in (train, val, test)]
    y_train = np.asarray(y_train)
    has_val = bool(val) and y_val is not None and len(y_val) > 0
    fitted = {(v, c): _Model(xs[v][0], y_train, task, c, max_iter, class_weighting, seed) for v in names for c in Cs}

    def table_on(split: int, y: np.ndarray) -> list[tuple[str, float, float]]:
        return [(v, c, metric_value(y, fitted[v, c].scores(xs[v][split]), task, select_metric))
                for v in names for c in Cs]

    selected_on = "val"
    table = table_on(1, np.asarray(y_val)) if has_val else []
    if not has_val or all(math.isnan(r[2]) for r in table):
        selected_on = "train"
        table = table_on(0, y_train)
    best = _select(table)
    v, c, score = table[best]
    model = fitted[v, c]
    val_scores = model.scores(xs[v][1]) if has_val else np.zeros((0,))
    result = SweepResult(best_variant=v, best_lr=c, best_val=score, val_table=table,
                         test_scores=model.scores(xs[v][2]), val_scores=val_scores, epochs=0, selected_on=selected_on)
    result.converged = model.converged  # False: L-BFGS stopped at max_iter for the chosen model
    return result
