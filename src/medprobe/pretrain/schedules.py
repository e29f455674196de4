"""Per-step schedules (pure functions of the step, so a resumed run continues them exactly)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from medprobe.pretrain.config import TrainConfig


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total``); ``end`` afterwards."""
    if total <= 0 or step >= total:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total))


def warmup_cosine(step: int, total: int, peak: float, final: float, warmup: int, warmup_start: float = 0.0) -> float:
    """Linear warm-up from ``warmup_start`` to ``peak`` over ``warmup`` steps, then cosine to ``final`` at ``total``."""
    if step < warmup:
        return warmup_start + (peak - warmup_start) * step / warmup
    return cosine(step - warmup, total - warmup, peak, final)


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` steps, then constant ``end``."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


@dataclass(frozen=True)
class StepValues:
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    last_layer_lr_scale: float


class Schedules:
    """Learning rate, weight decay, teacher momentum and temperature for every step (DINOv2's recipe)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def at(self, step: int) -> StepValues:
        c = self.cfg
        return StepValues(
            lr=warmup_cosine(step, c.steps, c.lr, c.min_lr, min(c.warmup_steps, c.steps)),
            weight_decay=cosine(step, c.steps, c.weight_decay[0], c.weight_decay[1]),
            momentum=cosine(step, c.steps, c.momentum[0], c.momentum[1]),
            teacher_temp=linear_warmup(step, c.teacher_temp_warmup_steps, c.teacher_temp[0], c.teacher_temp[1]),
            last_layer_lr_scale=0.0 if step < c.freeze_last_layer_steps else 1.0,
        )
