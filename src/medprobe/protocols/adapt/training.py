"""The one training loop of every adaptation protocol.

:func:`fit` trains any model ``model(batch) -> logits`` on a :class:`Source`: AdamW (or Adam)
with parameter groups (new parameters at ``lr``; pre-trained backbone weights at
``backbone_lr`` with optional layer-wise decay; no weight decay on biases, norms and tokens),
linear warm-up then cosine decay (or constant / step), bf16 autocast, gradient clipping,
validation after every epoch (or several times per epoch), the best state by the validation
metric kept and restored, early stopping, and records of wall time, steps to the best
validation and peak memory. :func:`predict` scores a source and times inference.

Gradient accumulation and several processes: an optimizer step takes ``batch_size x grad_accum``
samples of the epoch's order (the *effective batch*), in ``grad_accum`` micro-batches of
``batch_size``; under ``torchrun`` (a ``torch.distributed`` process group) each micro-batch is cut
into one contiguous part per process and the model is wrapped in ``DistributedDataParallel``.
Every part's loss is weighted by its share of the effective batch's loss normaliser (samples,
elements, or class weights), so the averaged gradient is the gradient of the effective batch's
mean loss: the number of processes changes neither the effective batch nor the result (up to
floating-point summation order); ``grad_accum`` only trades memory for time. Validation and
test sets are scored in one part per process and gathered, so every process takes the same
decisions (best state, early stopping); only rank 0 writes the checkpoint. Augmentation and
dropout draw from per-process generators when there are several processes (their draws then
differ from a single-process run); on GPUs BatchNorm layers become SyncBatchNorm, on CPUs
(gloo) their batch statistics are per process.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from medprobe import distributed as D
from medprobe.distributed import MicroBatch, split_micro
from medprobe.errors import ConfigError, MedprobeError
from medprobe.fsutil import atomic_write
from medprobe.metrics import metric_value
from medprobe.protocols.adapt.augment import Augmenter
from medprobe.protocols.adapt.data import Batch, Source, targets_tensor
from medprobe.protocols.adapt.models import layer_ids
from medprobe.protocols.adapt.peft import is_lora_param
from medprobe.protocols.linear import inverse_frequency_weights
from medprobe.runtime import autocast

SelectMetric = Literal["auroc", "accuracy", "loss"]


@dataclass
class TrainConfig:
    """Settings of one :func:`fit` call (the protocols fill it from their options)."""

    epochs: int = 10
    lr: float = 1e-3
    backbone_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: Literal["cosine", "constant", "step", "plateau"] = "cosine"
    plateau_patience: int = 2  # schedule=plateau: evaluations without improvement before the lr is divided by 10
    layer_decay: float = 1.0
    grad_clip: float | None = 1.0
    optimizer: Literal["adamw", "adam"] = "adamw"
    batch_size: int = 64
    eval_batch_size: int = 128
    patience: int | None = 5
    select_metric: SelectMetric = "auroc"
    evals_per_epoch: int = 1
    precision: str = "fp32"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    checkpoint: Path | None = None  # the best state, whole model (readable as backbone weights)
    protocol: str | None = None  # recorded in the checkpoint
    class_weights: torch.Tensor | None = None
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step


@dataclass
class FitResult:
    """What happened in :func:`fit` (the model holds the best state afterwards)."""

    best_epoch: float
    best_score: float
    best_step: int
    epochs_run: float
    steps: int
    train_wall_s: float
    train_s_to_best: float
    peak_memory_mb: float
    memory_kind: str
    stopped_early: bool
    selected_on: str
    history: list[dict[str, float]]


# --------------------------------------------------------------------------- losses and scores
def loss_fn(task: str, weights: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy (binary/multiclass, ``weights`` per class) or BCE (multi-label, ``weights`` = pos_weight;
    missing targets, ``-1``, are masked out: the mean is over the known targets of the batch)."""
    if task == "multilabel":
        return lambda logits, y: masked_bce(logits, y, None if weights is None else weights.to(logits.device))
    return lambda logits, y: nn.functional.cross_entropy(
        logits.float(), y, weight=None if weights is None else weights.to(logits.device))


def masked_bce(logits: torch.Tensor, y: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-label BCE with logits over the known targets (``y >= 0``); the plain mean when none is missing."""
    y = y.float()
    known = y >= 0
    per = nn.functional.binary_cross_entropy_with_logits(logits.float(), y.clamp_min(0), pos_weight=pos_weight,
                                                         reduction="none")
    if bool(known.all()):
        return per.mean()
    return (per * known).sum() / known.sum().clamp_min(1)


def loss_normaliser(targets: torch.Tensor, task: str, weights: torch.Tensor | None = None) -> float:
    """What :func:`loss_fn`'s mean divides by: elements (multi-label), summed class weights, or samples."""
    if task == "multilabel":
        return float(targets.numel())
    if weights is not None:
        return float(weights.double()[targets.long().cpu()].sum())
    return float(targets.shape[0])


def balanced_weights(labels: np.ndarray, task: str, num_classes: int) -> torch.Tensor:
    """Class weights so every class weighs the same: per-class cross-entropy weights ``N / (C n_c)`` for
    binary and multiclass (this loop's binary head has two logits), ``pos_weight`` for multi-label."""
    y = torch.as_tensor(np.asarray(labels))
    if task == "multilabel":
        return inverse_frequency_weights(y.float(), "multilabel", num_classes)
    return inverse_frequency_weights(y.long(), "multiclass", num_classes)


def to_scores(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities: softmax over classes (binary: the positive column), sigmoid for multi-label."""
    logits = logits.float()
    if task == "multilabel":
        return torch.sigmoid(logits)
    p = torch.softmax(logits, dim=1)
    return p[:, 1] if task == "binary" else p


# --------------------------------------------------------------------------- parameter groups
def param_groups(model: nn.Module, cfg: TrainConfig) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Optimizer groups: (lr scale, weight decay) buckets over the trainable parameters.

    Backbone weights (not LoRA adapters) use ``backbone_lr`` scaled by ``layer_decay ** (L + 1 - id)``
    where id is the parameter's layer (0 embeddings ... L + 1 final norm); everything else
    (head, adapters, projections, pooling) uses ``lr``. Biases, norms and 1-D tensors get no
    weight decay.
    """
    backbone = getattr(model, "backbone", None)
    ids: dict[int, int] = {}
    n_layers = 0
    if backbone is not None:
        names = layer_ids(backbone)
        n_layers = len(backbone.block_modules())
        by_name = dict(backbone.named_parameters())
        ids = {id(by_name[n]): i for n, i in names.items() if not is_lora_param(n)}
    base_backbone = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    counts = {"backbone": 0, "new": 0}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in ids:
            lr = base_backbone * cfg.layer_decay ** (n_layers + 1 - ids[id(p)])
            counts["backbone"] += p.numel()
        else:
            lr = cfg.lr
            counts["new"] += p.numel()
        no_decay = p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        groups.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(p)
    out = [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    return out, counts


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rates at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule in ("constant", "plateau"):  # plateau: fit() divides by 10 when validation stalls
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "step":  # x0.1 at 50% and 75% of training (MedMNIST reference recipe)
        return 0.1 ** (int(progress >= 0.5) + int(progress >= 0.75))
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class PlateauScale:
    """Reduce-on-plateau: the lr multiplier drops tenfold after ``patience`` evaluations without a new best."""

    def __init__(self, patience: int, factor: float = 0.1) -> None:
        self.patience, self.factor = patience, factor
        self.scale, self.best, self.bad = 1.0, -math.inf, 0

    def update(self, score: float) -> None:
        if score > self.best:
            self.best, self.bad = score, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.scale *= self.factor
            self.bad = 0


# --------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory while active: CUDA allocator peak, else the process's resident set (sampled)."""

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device, self.interval = device, interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_rss"

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self.rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


# --------------------------------------------------------------------------- train / eval modes
def set_train_mode(model: nn.Module) -> None:
    """``train()`` for modules with something to learn; fully frozen sub-modules stay in eval mode.

    So frozen blocks keep their BatchNorm statistics and run without dropout.
    """
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy (on CPU) of what training changes: trainable parameters and all buffers."""
    names = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in names}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def predict(model: nn.Module, source: Source, cfg: TrainConfig, task: str) -> tuple[np.ndarray, float, float]:
    """(scores, mean loss, seconds) of ``model`` on every sample of ``source``, in source order.

    With several processes each scores one contiguous part of ``source`` and the parts are
    gathered, so every process returns the whole set's scores.
    """
    model.eval()
    criterion = loss_fn(task)
    world = D.world_size()
    start, stop = D.shard_bounds(len(source), world, D.rank())
    rows = np.arange(start, stop)
    chunks = [rows[i:i + cfg.eval_batch_size] for i in range(0, len(rows), cfg.eval_batch_size)]
    scores, total_loss = [], 0.0
    _sync(cfg.device)
    t0 = time.perf_counter()
    for batch in source.load(chunks, device=cfg.device):
        with autocast(cfg.precision, cfg.device):
            logits = model(batch)
        total_loss += float(criterion(logits, batch.targets)) * batch.size
        scores.append(to_scores(logits, task).cpu())
    _sync(cfg.device)
    seconds = time.perf_counter() - t0
    out = torch.cat(scores).numpy() if scores else np.zeros((0,))
    if world > 1:
        parts = D.gather_objects((out, total_loss))
        out = np.concatenate([p[0] for p in parts if len(p[0])]) if any(len(p[0]) for p in parts) else out
        total_loss = sum(p[1] for p in parts)
    return out.astype(np.float64), total_loss / max(1, len(source)), seconds


@torch.inference_mode()
def latency_batch1(model: nn.Module, source: Source, cfg: TrainConfig, repeats: int = 10) -> float:
    """Median milliseconds to classify one instance (batch size 1) after a warm-up call."""
    model.eval()
    times: list[float] = []
    n = min(repeats + 1, len(source))
    for i, batch in enumerate(source.batches(1, device=cfg.device)):
        if i >= n:
            break
        _sync(cfg.device)
        t0 = time.perf_counter()
        with autocast(cfg.precision, cfg.device):
            model(batch)
        _sync(cfg.device)
        if i > 0 or n == 1:  # the first call warms up (allocations, kernels)
            times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times)) if times else math.nan


def selection_score(labels: np.ndarray, scores: np.ndarray, loss: float, task: str, metric: SelectMetric) -> float:
    """Higher is better: the validation metric, or minus the loss."""
    if metric == "loss":
        return -loss
    return metric_value(labels, scores, task, metric)


# --------------------------------------------------------------------------- the loop
def plan_epoch(order: np.ndarray, labels: np.ndarray, cfg: TrainConfig, task: str, drop_last: bool,
               world: int, rank: int) -> list[list[MicroBatch]]:
    """The optimizer steps of one epoch: for each, this process's micro-batches.

    ``order`` is cut into effective batches of ``batch_size * grad_accum`` samples (the last,
    shorter one dropped when ``drop_last``), each into micro-batches of ``batch_size`` (evenly,
    when the set is smaller than one effective batch), each into one contiguous part per process.
    """
    effective = cfg.batch_size * cfg.grad_accum
    stop = len(order) - len(order) % effective if drop_last and len(order) >= effective else len(order)

    def norm(rows: np.ndarray) -> float:
        return loss_normaliser(targets_tensor(labels[rows], task), task, cfg.class_weights)

    steps = []
    for s in range(0, stop, effective):
        rows = order[s:s + effective]
        total = norm(rows)
        micros = np.array_split(rows, math.ceil(len(rows) / cfg.batch_size))
        step = [split_micro(m, world, rank, lambda r: norm(r) / total if total else 1.0) for m in micros]
        step[-1].last = True
        steps.append(step)
    return steps


def _process_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank, 7]).generate_state(1)[0])


def fit(model: nn.Module, train: Source, val: Source | None, cfg: TrainConfig, task: str, *,
        augment: Augmenter | None = None, log: Callable[[str], None] | None = None) -> FitResult:
    """Train ``model`` in place and leave it holding its best state (by validation, else the last)."""
    device = cfg.device
    world, rank = D.world_size(), D.rank()
    if cfg.grad_accum < 1:
        raise ConfigError(f"grad_accum: must be >= 1, got {cfg.grad_accum}")
    model.to(device)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over every process's part
    groups, _ = param_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(groups, lr=cfg.lr)
    trainable = [p for g in groups for p in g["params"]]
    criterion = loss_fn(task, cfg.class_weights)
    generator = torch.Generator().manual_seed(cfg.seed)  # the epochs' order: the same in every process
    aug_generator = generator
    step_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        step_model = DistributedDataParallel(model, device_ids=None, find_unused_parameters=_has_unused(model))
        aug_generator = torch.Generator().manual_seed(_process_seed(cfg.seed, rank))
        torch.manual_seed(_process_seed(cfg.seed, rank))  # dropout masks differ between processes
    effective = cfg.batch_size * cfg.grad_accum
    drop_last = len(train) > effective  # no 1-sample batches (BatchNorm) unless the set is tiny
    steps_per_epoch = max(1, len(train) // effective if drop_last else math.ceil(len(train) / effective))
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    metric = cfg.select_metric
    if val is not None and metric == "auroc" and len(np.unique(val.labels, axis=0)) < 2:
        metric = "loss"  # AUROC undefined on a single-class validation set
    selected_on = f"val {metric}" if val is not None else "last epoch (no validation split)"

    history: list[dict[str, float]] = []
    best = {"score": -math.inf, "step": 0, "state": None, "t": 0.0}
    bad_evals, stopped, step = 0, False, 0
    plateau = PlateauScale(cfg.plateau_patience) if cfg.schedule == "plateau" else None
    memory = PeakMemory(device)
    t0 = time.perf_counter()
    with memory:
        while step < total and not stopped:
            set_train_mode(model)
            order = train.order(True, generator)
            plan = plan_epoch(order, train.labels, cfg, task, drop_last, world, rank)
            micros = [m for s in plan for m in s]
            batches: Iterator[Batch] = train.load([m.rows for m in micros], device=device, augment=augment,
                                                  generator=aug_generator)
            step_loss = torch.zeros((), device=device)
            for micro, batch in zip(micros, batches):
                factor = lr_factor(step, total, warmup, cfg.schedule) * (plateau.scale if plateau else 1.0)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                sync = micro.last or world == 1  # DDP all-reduces the gradients after the step's last part
                with step_model.no_sync() if not sync else contextlib.nullcontext():
                    with autocast(cfg.precision, device):
                        logits = step_model(batch)
                    loss = criterion(logits, batch.targets)
                    (loss if micro.grad_scale == 1.0 else loss * micro.grad_scale).backward()
                step_loss = step_loss + loss.detach().float() * micro.loss_share
                if not micro.last:
                    continue
                step_value = float(D.all_reduce_sum(step_loss))
                step_loss = torch.zeros((), device=device)
                if not math.isfinite(step_value):
                    raise MedprobeError(f"training diverged: loss is {step_value} at step {step + 1}; "
                                        "lower lr/backbone_lr or enable grad_clip")
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                pos = step % steps_per_epoch  # 0 at the end of an epoch
                if pos == 0 or step == total or (pos % eval_every == 0 and pos // eval_every < cfg.evals_per_epoch):
                    record = {"step": step, "epoch": step / steps_per_epoch, "train_loss": step_value,
                              "lr": optimizer.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - t0}
                    if val is not None:
                        D.broadcast_buffers(model)  # the same BatchNorm statistics in every process
                        scores, val_loss, _ = predict(model, val, cfg, task)
                        score = selection_score(val.labels, scores, val_loss, task, metric)
                        record.update(val_loss=val_loss, val_score=score)
                        set_train_mode(model)
                    else:
                        score = float(step)  # without validation the last state is kept
                    history.append(record)
                    if log and D.is_main_process():
                        log(" ".join(f"{k}={v:.4g}" for k, v in record.items()))
                    score = -math.inf if math.isnan(score) else score  # an undefined metric never wins
                    if plateau is not None and val is not None:
                        plateau.update(score)
                    if score > best["score"] or best["state"] is None:
                        D.broadcast_buffers(model)
                        best.update(score=score, step=step, state=trainable_state(model),
                                    t=time.perf_counter() - t0)
                        bad_evals = 0
                        if cfg.checkpoint is not None and D.is_main_process():
                            _save(model, cfg.checkpoint, cfg.protocol)
                    else:
                        bad_evals += 1
                    if cfg.patience and val is not None and bad_evals >= cfg.patience * cfg.evals_per_epoch:
                        stopped = True
                        break
                if step >= total:
                    break
    wall = time.perf_counter() - t0
    del step_model
    if best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)
    return FitResult(best_epoch=best["step"] / steps_per_epoch, best_score=float(best["score"]), best_step=best["step"],
                     epochs_run=step / steps_per_epoch, steps=step, train_wall_s=wall, train_s_to_best=best["t"],
                     peak_memory_mb=memory.peak_mb, memory_kind=memory.kind, stopped_early=stopped,
                     selected_on=selected_on, history=history)


def _has_unused(model: nn.Module) -> bool:
    """Whether a trainable parameter may take no part in a forward pass (DDP must then look for it):
    parameters of an attention pooling that 2D batches never use."""
    pool = getattr(model, "pool", None)
    return pool is not None and any(p.requires_grad for p in pool.parameters())


def _save(model: nn.Module, path: Path, protocol: str | None = None) -> None:
    """Write the whole model's state atomically (temporary file, then rename), in the format
    :mod:`medprobe.backbones.finetuned` reads back as backbone weights (``weights: best.pt``)."""
    from medprobe.backbones.finetuned import checkpoint_payload
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    payload = checkpoint_payload(state, getattr(getattr(model, "backbone", None), "name", None), protocol)
    atomic_write(path, lambda fh: torch.save(payload, fh))
