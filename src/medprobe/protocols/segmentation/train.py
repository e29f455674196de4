"""One training loop for every segmentation model.

A model sees batches from a *source*:

* :class:`GridSource` — cached multi-block patch grids (feature store or memory) and masks:
  frozen decoders with augmentations off; the backbone is never run during training.
* :class:`ImageSource` — preprocessed images and masks, optionally augmented (random affine,
  brightness/contrast), for scratch models and for frozen decoders with augmentations on;
  :class:`FrozenSegmenter` then runs the backbone under ``torch.inference_mode`` on each
  batch and trains only the decoder.

:func:`fit` trains with AdamW and a cosine schedule, evaluates the validation loss after each
epoch and keeps the weights of the best epoch (the studies report the best checkpoint /
the minimum validation loss); without a validation split the last epoch is kept.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medprobe.backbones.base import Backbone
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

    def batch(self, positions: np.ndarray, device: torch.device, augment: bool = False,
              gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.rows[positions]
        x = torch.from_numpy(self.images[rows].astype(np.float32)).to(device)
        y = None if self.masks is None else torch.from_numpy(self.masks[rows].astype(np.int64)).to(device)
        if augment:
            x, y = augment_batch(x, y, gen)
        return x, y


def augment_batch(images: torch.Tensor, masks: torch.Tensor | None, gen: torch.Generator | None,
                  rotate_deg: float = 10.0, scale: float = 0.1, shift: float = 0.05,
                  contrast: float = 0.15, brightness: float = 0.15) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random affine (same for image and mask; bilinear / nearest) and brightness/contrast jitter.

    No flips: left/right labels (lungs, hemispheres) must keep their side.
    """
    b = images.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    ang = u(-rotate_deg, rotate_deg) * math.pi / 180
    s = u(1 - scale, 1 + scale)
    tx, ty = u(-shift, shift) * 2, u(-shift, shift) * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # fill outside with the image minimum (the background after normalisation)
    low = images.amin(dim=(2, 3), keepdim=True)
    warped = F.grid_sample(images - low, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + low
    c = u(1 - contrast, 1 + contrast).view(b, 1, 1, 1).to(images)
    br = u(-brightness, brightness).view(b, 1, 1, 1).to(images)
    mean = warped.mean(dim=(1, 2, 3), keepdim=True)
    warped = (warped - mean) * c + mean + br
    if masks is not None:
        m = F.grid_sample(masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        masks = m[:, 0].round().long()
    return warped, masks


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
    model.eval()
    total, count = 0.0, 0
    for pos in _batches(len(source), batch_size, None):
        x, y = source.batch(pos, device)
        total += float(loss_fn(model(x), y)) * len(pos)
        count += len(pos)
    return total / max(count, 1)


def fit(model: nn.Module, train: Any, val: Any | None, loss_fn: nn.Module, *, epochs: int, lr: float,
        weight_decay: float, batch_size: int, seed: int, device: torch.device, augment: bool = False,
        select_best: bool = True, log: Callable[[str], None] | None = None) -> FitResult:
    """Train ``model``'s trainable parameters on ``train``; load the best validation epoch's weights."""
    t0 = time.perf_counter()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train) / batch_size))
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    gen = torch.Generator().manual_seed(int(seed))
    aug_gen = torch.Generator().manual_seed(int(seed) + 7919)
    best, best_state, best_epoch = math.inf, None, epochs
    use_val = val is not None and len(val) > 0 and select_best
    history, steps = [], 0
    for epoch in range(1, epochs + 1):
        model.train()
        run, seen = 0.0, 0
        for pos in _batches(len(train), batch_size, gen):
            x, y = train.batch(pos, device, augment=augment, gen=aug_gen)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            run += float(loss.detach()) * len(pos)
            seen += len(pos)
        row = {"epoch": epoch, "train_loss": run / max(seen, 1)}
        if use_val:
            row["val_loss"] = mean_loss(model, val, loss_fn, batch_size, device)
            if row["val_loss"] < best:
                best, best_epoch = row["val_loss"], epoch
                best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
        history.append(row)
        if log:
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
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
