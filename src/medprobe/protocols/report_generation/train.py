"""Training (projector, and the LM fully or through LoRA) and batched generation.

Recipe of LLaVA-1.5 / RAD-DINO: AdamW, cosine schedule with linear warm-up over the first
``warmup`` fraction of steps, gradient clipping at 1.0, gradient accumulation to reach the
effective batch, bf16 autocast where the device supports it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medprobe.errors import ConfigError
from medprobe.protocols.report_generation.model import ReportModel


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    warmup: float
    weight_decay: float
    batch_size: int
    grad_accum: int
    precision: str  # "bf16" or "fp32" (resolved)
    seed: int
    max_grad_norm: float = 1.0


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that supports it, else fp32 (CPU bf16 is slow and lossy)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision: bf16 asked but this GPU does not support bfloat16; use fp32 or auto")
    return precision


def encode_reports(tokenizer: Any, reports: Sequence[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of each report followed by the end token, and how many were cut to ``max_tokens``."""
    out, cut = [], 0
    for text in reports:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        if len(ids) > max_tokens:
            ids, cut = ids[:max_tokens], cut + 1
        out.append(ids)
    return out, cut


def image_batch(grids: Any, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, h*w, D)`` float32 patch tokens of ``rows`` from a ``(N, D, h, w)`` store array."""
    order = np.argsort(rows)
    x = np.asarray(grids[rows[order]], dtype=np.float32)[np.argsort(order)]
    t = torch.from_numpy(x)
    return t.flatten(2).transpose(1, 2).contiguous().to(device)


def _pad(batch: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(b) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, :len(b)] = torch.tensor(b, dtype=torch.long)
        mask[i, :len(b)] = 1
    return ids.to(device), mask.to(device)


def train(model: ReportModel, grids: Any, targets: list[list[int]], settings: TrainSettings, device: torch.device,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` on (patch tokens, report ids) pairs."""
    from transformers import get_cosine_schedule_with_warmup
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(targets)
    per_step = settings.batch_size * settings.grad_accum
    steps = settings.epochs * math.ceil(n / per_step)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(settings.warmup * steps), steps)
    gen = torch.Generator().manual_seed(settings.seed)
    pad = model.tokenizer.pad_token_id
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if settings.precision == "bf16" else nullcontext()
    model.train()
    epoch_losses = []
    for epoch in range(settings.epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        total, count = 0.0, 0
        for start in range(0, n, per_step):
            step_rows = perm[start:start + per_step]
            micro = [step_rows[i:i + settings.batch_size] for i in range(0, len(step_rows), settings.batch_size)]
            opt.zero_grad(set_to_none=True)
            for rows in micro:
                ids, mask = _pad([targets[i] for i in rows], pad, device)
                with amp:
                    loss = model.loss(image_batch(grids, rows, device), ids, mask)
                (loss * len(rows) / len(step_rows)).backward()
                total, count = total + loss.detach().item() * len(rows), count + len(rows)
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            opt.step()
            sched.step()
        epoch_losses.append(total / max(count, 1))
        if log:
            log(f"report_generation epoch {epoch + 1}/{settings.epochs}: loss {epoch_losses[-1]:.4f}")
    model.eval()
    return {"steps": steps, "epoch_losses": [round(x, 5) for x in epoch_losses]}


def generate(model: ReportModel, grids: Any, rows: np.ndarray, batch_size: int, max_new_tokens: int,
             num_beams: int, device: torch.device) -> list[str]:
    """Reports for ``rows`` of ``grids`` (float32, batch by batch)."""
    model.eval()
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        out += model.generate(image_batch(grids, rows[start:start + batch_size], device), max_new_tokens, num_beams)
    return out
