"""Linear evaluation with augmented online features (``linear`` with ``mode: augmented``; DINOv2's protocol).

Instead of the cached features, every training epoch recomputes the features of freshly
augmented training images (random resized crop with area in ``CROP_SCALE`` and aspect 3/4..4/3,
horizontal flip: DINOv2's linear-evaluation transform) with the frozen backbone under
``torch.inference_mode``. Each mini-batch of features feeds every head of the sweep (input
variants x learning rates) at once, with the same momentum SGD, cosine schedule and head
initialisation as :func:`medprobe.protocols.linear.linear_sweep`. Standardisation uses the
statistics of the un-augmented training features; validation and test features are computed
from the un-augmented images (the store is not read). 2D datasets only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from medprobe.backbones.base import Backbone
from medprobe.data.base import ImageDataset
from medprobe.errors import ConfigError
from medprobe.protocols.adapt.augment import AugmentSpec, Augmenter
from medprobe.protocols.adapt.data import ImageSource
from medprobe.protocols.linear import SweepResult, _targets, init_head, inverse_frequency_weights, select_head, \
    sgd_step
from medprobe.runtime import autocast

CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as in DINOv2's linear evaluation
AUGMENT = AugmentSpec(names=("random_resized_crop", "hflip"), crop_scale=CROP_SCALE)


def variant_features(backbone: Backbone, images: torch.Tensor, variants: Sequence[str], precision: str
                     ) -> dict[str, torch.Tensor]:
    """``{"cls@n" | "cls+mean@n": (B, D)}`` from one forward pass, as the feature store builds them:
    the CLS tokens of the last n blocks (oldest first), then the last block's mean patch token."""
    parsed = [(v, v.split("@")[0], int(v.split("@")[1])) for v in variants]
    blocks = list(range(backbone.num_blocks - max(n for _, _, n in parsed), backbone.num_blocks))
    with torch.inference_mode(), autocast(precision, images.device):
        out = backbone.forward_tokens(images, blocks=blocks)
    by_index = {b.index: b for b in out.blocks}
    feats = {}
    for name, kind, n in parsed:
        chosen = [by_index[i] for i in blocks[-n:]]
        parts = [b.cls.float() for b in chosen]
        if kind == "cls+mean":
            parts.append(chosen[-1].mean_patch.float())
        feats[name] = torch.cat(parts, dim=1).clone()  # clone: leave inference mode
    return feats


def _features(backbone: Backbone, source: ImageSource, variants: Sequence[str], batch_size: int, device: torch.device,
              precision: str) -> dict[str, torch.Tensor]:
    rows = np.arange(len(source))
    parts: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    for batch in source.load([rows[i:i + batch_size] for i in range(0, len(rows), batch_size)], device=device):
        for v, x in variant_features(backbone, batch.inputs, variants, precision).items():
            parts[v].append(x.cpu())
    return {v: torch.cat(p) for v, p in parts.items()}


def augmented_sweep(backbone: Backbone, dataset: ImageDataset, pre, splits: dict[str, np.ndarray],
                    labels: dict[str, np.ndarray], *, variants: Sequence[str], task: str, num_classes: int,
                    lrs: Sequence[float], epochs: int, batch_size: int, weight_decay: float = 0.0,
                    class_weighting: bool = False, seed: int = 0, select_metric: str = "auroc",
                    device: torch.device = torch.device("cpu"), precision: str = "fp32",
                    feature_batch: int = 64) -> SweepResult:
    """Train the sweep's heads on online features of augmented training images; select on val, score test.

    ``splits`` maps ``train``/``test`` (and optionally ``val``) to dataset indices, ``labels`` to their
    targets. The augmentations and shuffling are drawn from ``seed`` on the CPU: a seed gives the same result.
    """
    if dataset.ndim != 2:
        raise ConfigError(f"linear mode augmented: {dataset.name} is 3D; online augmented features are for 2D "
                          "images (use mode: cached)")
    backbone = backbone.to(device).eval()
    sources = {s: ImageSource(dataset, idx, pre) for s, idx in splits.items() if len(idx)}
    if "train" not in sources or "test" not in sources:
        raise ConfigError("linear mode augmented: needs train and test images")
    clean = {s: _features(backbone, src, variants, feature_batch, device, precision) for s, src in sources.items()}
    stats = {}
    for v in variants:  # standardise with the statistics of the un-augmented training features
        mean, std = clean["train"][v].mean(0), clean["train"][v].std(0, unbiased=False)
        stats[v] = (mean, torch.where(std > 0, std, torch.ones_like(std)))

    def standardise(xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {v: (x - stats[v][0].to(x.device)) / stats[v][1].to(x.device) for v, x in xs.items()}

    n = len(splits["train"])
    ytr = _targets(labels["train"], task, num_classes, n, "train")
    has_val = "val" in sources
    yva = _targets(labels["val"], task, num_classes, len(splits["val"]), "val") if has_val else None
    lrs = [float(lr) for lr in lrs]
    heads, c_out = len(lrs), 1 if task == "binary" else num_classes
    lr = torch.tensor(lrs).view(heads, 1, 1).to(device)
    weight = inverse_frequency_weights(ytr, task, num_classes).to(device) if class_weighting else None
    params = {v: [p.to(device).requires_grad_() for p in init_head(seed, v, heads, clean["train"][v].shape[1], c_out)]
              for v in variants}
    buffers = {v: [torch.zeros_like(p) for p in params[v]] for v in variants}
    ydev = ytr.to(device)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 7919)
    augmenter = Augmenter(AUGMENT)
    total = epochs * math.ceil(n / batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        chunks = [perm[i:i + batch_size].numpy() for i in range(0, n, batch_size)]
        for rows, batch in zip(chunks, sources["train"].load(chunks, device=device, augment=augmenter,
                                                               generator=aug_gen)):
            feats = standardise(variant_features(backbone, batch.inputs, variants, precision))
            scale = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = torch.from_numpy(rows).to(device)
            for v in variants:
                sgd_step(params[v], buffers[v], feats[v], ydev[idx], task, weight, scale, weight_decay)
            step += 1
    std = {s: standardise(x) for s, x in clean.items()}
    return select_head(params, lrs, std["train"], ytr, std.get("val", {}), yva, std["test"], task, num_classes,
                       select_metric, epochs, step, stats)


class DatasetRows:
    """The record keys and patient ids of a dataset's splits, shaped like the feature store's (for predictions)."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset
        self.splits = [s for s in dataset.splits() if len(dataset.indices(s))]

    def keys(self, split: str) -> list[str]:
        return [self.dataset.records[int(i)].key for i in self.dataset.indices(split)]

    def patient_ids(self, split: str) -> list[str]:
        return [self.dataset.records[int(i)].patient_id for i in self.dataset.indices(split)]
