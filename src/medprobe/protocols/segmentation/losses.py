"""Dice + cross-entropy loss for multi-class segmentation with a background class.

The loss is a function of batch sums (:meth:`DiceCELoss.statistics`: cross-entropy sum and
normaliser, per-class intersections and sizes), so a batch cut into parts (processes of a
distributed run) has exactly the loss of the whole batch: the parts' statistics are summed
and :meth:`DiceCELoss.from_statistics` applied to the sum.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_per_class(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice of every class over the whole batch ("batch Dice").

    ``probs`` (B, C, H, W) class probabilities, ``target`` (B, H, W) integer labels.
    Returns (C,): ``(2 |P∩G| + s) / (|P| + |G| + s)``; a class absent from both prediction
    and truth scores 1 (nothing to find, nothing found).
    """
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (2 * inter + smooth) / (denom + smooth)


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * (1 - weighted mean soft Dice)``.

    ``class_weights`` (one per class, background first) weight both the cross-entropy terms
    (as ``torch.nn.functional.cross_entropy(weight=...)``) and the per-class Dice average.
    ``dice_background=False`` leaves class 0 out of the Dice term (it stays in the CE).
    """

    def __init__(self, num_classes: int, *, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 class_weights: Sequence[float] | None = None, dice_background: bool = True,
                 smooth: float = 1e-5) -> None:
        super().__init__()
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
        w = torch.ones(num_classes) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", w)
        self.weighted = class_weights is not None
        self.num_classes = num_classes
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.dice_background = dice_background
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        logits = logits.float()
        loss = logits.new_zeros(())
        if self.ce_weight:
            ce = F.cross_entropy(logits, target, weight=self.class_weights if self.weighted else None)
            loss = loss + self.ce_weight * ce
        if self.dice_weight:
            dice = soft_dice_per_class(logits.softmax(dim=1), target, self.smooth)
            w = self.class_weights.clone()
            if not self.dice_background:
                w[0] = 0
            loss = loss + self.dice_weight * (1 - (w * dice).sum() / w.sum())
        return loss

    def statistics(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Batch sums the loss depends on: [CE sum, CE normaliser, intersections (C), sizes (C)]."""
        target = target.long()
        logits = logits.float()
        w = self.class_weights if self.weighted else None
        ce_sum = F.cross_entropy(logits, target, weight=w, reduction="sum")
        ce_norm = (self.class_weights[target].sum() if self.weighted else
                   torch.tensor(float(target.numel()), device=logits.device))
        probs = logits.softmax(dim=1)
        onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        inter = (probs * onehot).sum((0, 2, 3))
        denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        return torch.cat([ce_sum.reshape(1), ce_norm.reshape(1).to(ce_sum.dtype), inter, denom])

    def from_statistics(self, stats: torch.Tensor) -> torch.Tensor:
        """The loss of the batch whose :meth:`statistics` are ``stats`` (equal to :meth:`forward`)."""
        c = self.num_classes
        loss = stats.new_zeros(())
        if self.ce_weight:
            loss = loss + self.ce_weight * stats[0] / stats[1]
        if self.dice_weight:
            inter, denom = stats[2:2 + c], stats[2 + c:2 + 2 * c]
            dice = (2 * inter + self.smooth) / (denom + self.smooth)
            w = self.class_weights.clone()
            if not self.dice_background:
                w[0] = 0
            loss = loss + self.dice_weight * (1 - (w * dice).sum() / w.sum())
        return loss
