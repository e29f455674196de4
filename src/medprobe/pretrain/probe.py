"""The probe of a pretraining run: a linear classifier on the frozen teacher, evaluated every N steps.

The labelled images are read and preprocessed once (centre square, resized to the probe
size, normalised with the backbone's statistics) and kept in memory; at each evaluation the
teacher embeds them (CLS, optionally with the mean patch token), scikit-learn's L-BFGS
logistic regression is fitted on the train split's standardised features and scored on the
evaluation split (:func:`medprobe.metrics.metric_value`, or the log-loss). The run keeps the
best value, counts evaluations without improvement for early stopping, and writes
``probe.csv`` next to ``losses.csv``.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medprobe.errors import ConfigError
from medprobe.pretrain.config import ProbeConfig

PROBE_COLUMNS = ("step", "metric", "value", "best_step", "best_value", "bad_evals", "n_train", "n_eval")


@dataclass
class ProbeData:
    images: torch.Tensor  # (N, 3, S, S) normalised
    labels: np.ndarray


def _split(dataset: Any, split: str, key: str, limit: int | None) -> list[int]:
    present = dataset.splits()
    if split not in present:
        raise ConfigError(f"probe.{key} {split!r} is not in dataset {dataset.name!r} "
                          f"(splits: {', '.join(present) or 'none'})")
    idx = [int(i) for i in dataset.indices(split)]
    idx = idx[:limit] if limit else idx
    if len(idx) < 2:
        raise ConfigError(f"probe.{key} {split!r} of dataset {dataset.name!r} has {len(idx)} image(s); need >= 2")
    return idx


class Probe:
    """The labelled data of ``cfg`` (read once) and :meth:`evaluate` for a teacher network."""

    def __init__(self, cfg: ProbeConfig, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        from medprobe.data.adapters import build_dataset
        from medprobe.pretrain.augment import resize
        from medprobe.pretrain.data import ImageSource
        self.cfg = cfg
        dataset = build_dataset(cfg.adapter, cfg.root, **cfg.options)
        if dataset.ndim != 2:
            raise ConfigError(f"probe: adapter {cfg.adapter!r} gives {dataset.ndim}D volumes; the probe takes 2D images")
        self.task = dataset.task.kind
        if self.task not in ("binary", "multiclass", "multilabel"):
            raise ConfigError(f"probe: dataset {dataset.name!r} is a {self.task} task; the probe needs "
                              f"binary, multiclass or multilabel labels")
        if self.task == "multilabel" and cfg.metric == "loss":
            raise ConfigError("probe.metric 'loss' is for binary and multiclass tasks; use auroc or auprc")
        self.size = int(size)
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.splits: dict[str, ProbeData] = {}
        for key, split in (("train_split", cfg.train_split), ("eval_split", cfg.eval_split)):
            idx = _split(dataset, split, key, cfg.max_images)
            src = ImageSource([lambda i=i: dataset.load_image(i) for i in idx],
                              [f"{dataset.name}:{dataset.records[i].key}" for i in idx],
                              getattr(dataset, "value_range", None), self.size, f"probe {split}")
            imgs = torch.stack([resize(src.load(j), self.size).expand(3, -1, -1) for j in range(len(idx))])
            self.splits[key] = ProbeData((imgs - m) / s, np.asarray(dataset.labels(idx)))
        y = self.splits["train_split"].labels
        if self.task != "multilabel" and len(np.unique(y)) < 2:
            raise ConfigError(f"probe.train_split {cfg.train_split!r} has a single class; a probe needs two or more")

    @property
    def higher_is_better(self) -> bool:
        return self.cfg.metric != "loss"

    @torch.no_grad()
    def features(self, network: Any, images: torch.Tensor, device: torch.device) -> np.ndarray:
        out = []
        for chunk in images.split(self.cfg.batch_size):
            cls, patch = network.tokens(chunk.to(device))
            f = torch.cat([cls, patch.mean(1)], -1) if self.cfg.features == "cls_mean" else cls
            out.append(f.float().cpu())
        return torch.cat(out).numpy().astype(np.float64)

    def evaluate(self, network: Any, device: torch.device) -> tuple[float, int, int]:
        """(metric value on the evaluation split, train size, evaluation size) for ``network`` (eval mode)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        from medprobe.metrics import metric_value
        tr, ev = self.splits["train_split"], self.splits["eval_split"]
        x_tr = self.features(network, tr.images, device)
        x_ev = self.features(network, ev.images, device)
        if not (np.isfinite(x_tr).all() and np.isfinite(x_ev).all()):
            return math.nan, len(x_tr), len(x_ev)
        scaler = StandardScaler().fit(x_tr)
        x_tr, x_ev = scaler.transform(x_tr), scaler.transform(x_ev)

        def fit(x: np.ndarray, y: np.ndarray) -> Any:
            return LogisticRegression(C=self.cfg.C, max_iter=self.cfg.max_iter).fit(x, y)

        if self.task == "multilabel":
            scores = np.zeros(ev.labels.shape, dtype=np.float64)
            for c in range(ev.labels.shape[1]):
                known = tr.labels[:, c] >= 0
                yc = tr.labels[known, c].astype(int)
                scores[:, c] = (fit(x_tr[known], yc).predict_proba(x_ev)[:, 1] if len(np.unique(yc)) == 2
                                else float(yc.mean()) if len(yc) else 0.5)
            return metric_value(ev.labels, scores, "multilabel", self.cfg.metric), len(x_tr), len(x_ev)
        y_tr, y_ev = tr.labels.astype(int), ev.labels.astype(int)
        clf = fit(x_tr, y_tr)
        proba = clf.predict_proba(x_ev)
        if self.cfg.metric == "loss":
            from sklearn.metrics import log_loss
            labels = np.union1d(y_tr, y_ev)
            full = np.full((len(y_ev), len(labels)), 1e-15)
            for j, c in enumerate(clf.classes_):
                full[:, int(np.searchsorted(labels, c))] = proba[:, j]
            return float(log_loss(y_ev, full / full.sum(1, keepdims=True), labels=labels)), len(x_tr), len(x_ev)
        n_classes = int(max(y_tr.max(), y_ev.max())) + 1
        scores = np.zeros((len(y_ev), n_classes))
        scores[:, clf.classes_] = proba
        task = "binary" if self.task == "binary" else "multiclass"
        return metric_value(y_ev, scores if task == "multiclass" else scores[:, -1], task, self.cfg.metric), \
            len(x_tr), len(x_ev)


@dataclass
class ProbeTracker:
    """Early-stopping bookkeeping (saved in checkpoints): history rows, best value and step, patience used."""

    metric: str
    higher_is_better: bool
    patience: int
    min_delta: float
    history: list[dict[str, Any]]
    best_step: int = 0
    best_value: float = math.nan
    bad_evals: int = 0
    stopped: bool = False

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if not math.isfinite(self.best_value):
            return True
        gain = value - self.best_value if self.higher_is_better else self.best_value - value
        return gain > self.min_delta

    def record(self, step: int, value: float, n_train: int, n_eval: int) -> bool:
        """Log one evaluation; True when it is the new best."""
        better = self.improved(value)
        if better:
            self.best_step, self.best_value, self.bad_evals = step, value, 0
        else:
            self.bad_evals += 1
        self.stopped = self.patience > 0 and self.bad_evals >= self.patience
        self.history.append({"step": step, "metric": self.metric, "value": value, "best_step": self.best_step,
                             "best_value": self.best_value, "bad_evals": self.bad_evals, "n_train": n_train,
                             "n_eval": n_eval})
        return better

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best_step": self.best_step, "best_value": self.best_value,
                "bad_evals": self.bad_evals, "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.best_step, self.best_value = int(state["best_step"]), float(state["best_value"])
        self.bad_evals, self.stopped = int(state["bad_evals"]), bool(state["stopped"])


def probe_csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PROBE_COLUMNS)
    for r in rows:
        w.writerow([r[c] if isinstance(r[c], (int, str)) else repr(float(r[c])) for c in PROBE_COLUMNS])
    return buf.getvalue()


def read_probe(path: Any) -> list[dict[str, Any]]:
    """Rows of a run's ``probe.csv`` (numbers as int/float)."""
    with open(path, newline="") as fh:
        return [{k: (v if k == "metric" else int(v) if k in ("step", "best_step", "bad_evals", "n_train", "n_eval")
                     else float(v)) for k, v in row.items()} for row in csv.DictReader(fh)]
