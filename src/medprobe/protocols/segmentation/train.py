"""One training loop for every segmentation model.

A model sees batches from a *source*:

* :class:`GridSource` — cached multi-block patch grids (feature store or memory) and masks:
  frozen decoders with augmentations off; the backbone is never run during training.
* :class:`ImageSource` — preprocessed images and masks, optionally augmented (random affine,
  brightness/contrast, flip, elastic, gamma: :mod:`~medprobe.protocols.segmentation.augment`), for scratch models and for frozen decoders with augmentations on;
  :class:`FrozenSegmenter` then runs the backbone under ``torch.inference_mode`` on each
  batch and trains only the decoder.

:func:`fit` trains with AdamW and a cosine schedule, evaluates the validation loss after each
epoch and keeps the weights of the best epoch (the studies report the best checkpoint /
the minimum validation loss); without a validation split the last epoch is kept.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medprobe import distributed as D
from medprobe.backbones.base import Backbone
from medprobe.protocols.segmentation.augment import DEFAULT_SEG_AUGMENT, augment_names, augment_pair
from medprobe.runtime import autocast

Inputs = Any  # a list of grid tensors, or an image tensor


class GridSource:
    """Patch grids of some blocks (arrays of shape (N, D, h, w), e.g. float16 memmaps) and masks."""

    def __init__(self, grids: Sequence[Any], masks: np.ndarray | None, rows: np.ndarray) -> None:
        self.grids, self.masks, self.rows = list(grids), masks, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray, device: torch.device, augment: bool = False,
              gen: torch.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        rows = self.rows[positions]
        order = np.argsort(rows, kind="stable")  # sorted reads from memory maps, then back to batch order
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        grids = [torch.from_numpy(np.asarray(g[rows[order]], dtype=np.float32)[inv]).to(device) for g in self.grids]
        target = None if self.masks is None else torch.from_numpy(self.masks[rows].astype(np.int64)).to(device)
        return grids, target


class ImageSource:
    """Preprocessed images (N, 3, S, S) and masks (N, S, S); augmentation is applied per batch."""

    def __init__(self, images: np.ndarray, masks: np.ndarray | None, rows: np.ndarray) -> None:
        self.images, self.masks, self.rows = images, masks, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray, device: torch.device, augment: bool | Sequence[str] = False,
              gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.rows[positions]
        x = torch.from_numpy(self.images[rows].astype(np.float32)).to(device)
        y = None if self.masks is None else torch.from_numpy(self.masks[rows].astype(np.int64)).to(device)
        names = augment_names(augment)
        if names:
            x, y = augment_batch(x, y, gen, names)
        return x, y


def augment_batch(images: torch.Tensor, masks: torch.Tensor | None, gen: torch.Generator | None,
                  names: Sequence[str] = DEFAULT_SEG_AUGMENT) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The paired augmentations ``names`` (default: random affine and brightness/contrast; no flips:
    left/right labels keep their side); see :mod:`medprobe.protocols.segmentation.augment`."""
    return augment_pair(images, masks, gen, names)


class FrozenSegmenter(nn.Module):
    """A trainable decoder on a frozen backbone.

    ``forward`` accepts cached grids (a list, one per block) or normalised images; images go
    through the backbone under ``torch.inference_mode`` (no graph, no gradients). The backbone
    is held outside the module tree, so it is neither trained, counted nor saved.
    """

    def __init__(self, decoder: nn.Module, out_size: tuple[int, int], backbone: Backbone | None = None,
                 blocks: Sequence[int] = (), precision: str = "fp32") -> None:
        super().__init__()
        self.decoder = decoder
        self.out_size = out_size
        self._backbone = [backbone]
        self.blocks = list(blocks)
        self.precision = precision
        self.backbone_calls = 0

    def grids(self, images: torch.Tensor) -> list[torch.Tensor]:
        backbone = self._backbone[0]
        if backbone is None:
            raise RuntimeError("this segmenter has no backbone; feed it cached grids")
        self.backbone_calls += 1
        with torch.inference_mode(), autocast(self.precision, images.device):
            out = backbone.forward_tokens(images, blocks=self.blocks)
        return [b.patch_grid.float().clone() for b in out.blocks]  # clone: leave inference mode

    def forward(self, inputs: Inputs) -> torch.Tensor:
        grids = self.grids(inputs) if isinstance(inputs, torch.Tensor) else inputs
        return self.decoder(grids, self.out_size)


@dataclass
class FitResult:
    best_epoch: int
    selected_on: str
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def _batches(n: int, batch_size: int, gen: torch.Generator | None) -> Iterator[np.ndarray]:
    order = torch.randperm(n, generator=gen).numpy() if gen is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def mean_loss(model: nn.Module, source: Any, loss_fn: nn.Module, batch_size: int, device: torch.device) -> float:
    """Size-weighted mean of the per-batch losses (batches in source order; with several processes
    each scores every ``world``-th batch and the sums are gathered, so the batches are the same)."""
    model.eval()
    world, rank = D.world_size(), D.rank()
    total, count = 0.0, 0
    for j, pos in enumerate(_batches(len(source), batch_size, None)):
        if j % world != rank:
            continue
        x, y = source.batch(pos, device)
        total += float(loss_fn(model(x), y)) * len(pos)
        count += len(pos)
    if world > 1:
        total, count = (float(v) for v in D.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64)))
    return total / max(count, 1)


def _backward_part(loss_fn: nn.Module, out: torch.Tensor, y: torch.Tensor, scale: float, gather: bool,
                   part_fraction: float) -> float:
    """Backward of this process's part of a micro-batch such that the gradients, averaged over the
    processes by DDP, are ``scale / world`` times those of the whole micro-batch's loss; returns that loss.

    A loss with batch statistics (:class:`DiceCELoss`) is linearised at the micro-batch's summed
    statistics (exact: the chain rule through the sums); any other loss is taken as a per-sample
    mean, weighted by this part's ``part_fraction`` of the micro-batch. ``gather`` is False when
    every process holds the whole micro-batch.
    """
    if hasattr(loss_fn, "statistics"):
        local = loss_fn.statistics(out, y)
        total = D.all_reduce_sum(local.detach()) if gather else local.detach()
        point = total.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn.from_statistics(point)
            (grad,) = torch.autograd.grad(loss, point)
        ((local * grad).sum() * scale).backward()
        return float(loss.detach())
    loss = loss_fn(out, y)
    (loss * (part_fraction * scale)).backward()
    value = loss.detach().double() * part_fraction
    return float(D.all_reduce_sum(value) if gather else value)


def fit(model: nn.Module, train: Any, val: Any | None, loss_fn: nn.Module, *, epochs: int, lr: float,
        weight_decay: float, batch_size: int, seed: int, device: torch.device, augment: bool | Sequence[str] = False,
        select_best: bool = True, log: Callable[[str], None] | None = None, grad_accum: int = 1) -> FitResult:
    """Train ``model``'s trainable parameters on ``train``; load the best validation epoch's weights.

    An optimizer step takes ``batch_size * grad_accum`` samples in ``grad_accum`` micro-batches
    (the step's loss is the sample-weighted mean of the micro-batches' losses, batch Dice within
    each). Under a ``torch.distributed`` process group the model is wrapped in
    DistributedDataParallel and each process takes one contiguous part of every micro-batch; the
    micro-batch's loss is computed from statistics summed over the processes, so the trained
    weights are those of one process (up to floating-point summation order).
    """
    t0 = time.perf_counter()
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    world, rank = D.world_size(), D.rank()
    model.to(device)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    effective = batch_size * grad_accum
    steps_per_epoch = max(1, math.ceil(len(train) / effective))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    gen = torch.Generator().manual_seed(int(seed))
    aug_seed = int(seed) + 7919 if world == 1 else int(np.random.SeedSequence([int(seed), rank, 7919]).generate_state(1)[0])
    aug_gen = torch.Generator().manual_seed(aug_seed)
    step_model: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        step_model = DistributedDataParallel(model, device_ids=None)
    plain = world == 1 and grad_accum == 1  # one batch per step in one process: the loss as it is
    best, best_state, best_epoch = math.inf, None, epochs
    use_val = val is not None and len(val) > 0 and select_best
    history, steps = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        run, seen = 0.0, 0
        for rows in _batches(len(train), effective, gen):
            opt.zero_grad(set_to_none=True)
            micros = np.array_split(rows, math.ceil(len(rows) / batch_size))
            step_loss = 0.0
            for i, micro in enumerate(micros):
                whole = len(micro) < world  # too few samples to share: every process takes all of them
                a, b = (0, len(micro)) if whole else D.shard_bounds(len(micro), world, rank)
                x, y = train.batch(micro[a:b], device, augment=augment, gen=aug_gen)
                sync = world == 1 or i == len(micros) - 1
                share = len(micro) / len(rows)
                with contextlib.nullcontext() if sync else step_model.no_sync():
                    out = step_model(x)
                    if plain:
                        loss = loss_fn(out, y)
                        loss.backward()
                        value = float(loss.detach())
                    else:
                        value = _backward_part(loss_fn, out, y, share * (1 if whole else world), not whole,
                                               (b - a) / len(micro))
                step_loss += share * value
            opt.step()
            sched.step()
            steps += 1
            run += step_loss * len(rows)
            seen += len(rows)
        row = {"epoch": epoch, "train_loss": run / max(seen, 1)}
        if use_val:
            D.broadcast_buffers(model)  # the same BatchNorm statistics in every process
            row["val_loss"] = mean_loss(model, val, loss_fn, batch_size, device)
            if row["val_loss"] < best:
                best, best_epoch = row["val_loss"], epoch
                best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
        history.append(row)
        if log and D.is_main_process():
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    del step_model
    D.broadcast_buffers(model)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch if use_val else epochs, "val_loss" if use_val else "last_epoch", history,
                     time.perf_counter() - t0, steps)


@torch.no_grad()
def predict(model: nn.Module, source: Any, batch_size: int, device: torch.device
            ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(positions, logits)`` over ``source`` in order (model in eval mode)."""
    model.eval()
    for pos in _batches(len(source), batch_size, None):
        x, _ = source.batch(pos, device)
        yield pos, model(x).float()
