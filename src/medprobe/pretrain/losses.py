"""Self-supervised losses: DINO (image level), iBOT (masked patches), KoLeo, and teacher centring.

Teacher targets are either Sinkhorn-Knopp normalised (SwAV/DINOv2: every prototype gets
equal mass over the batch) or softmax-centred (DINO: an EMA centre is subtracted). With
``torch.distributed`` initialised, batch statistics (Sinkhorn sums, centres, counts) are
all-reduced, so targets are those of the global batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes in place (no-op without torch.distributed)."""
    if _distributed():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, iterations: int = 3,
                   n_total: int | torch.Tensor | None = None) -> torch.Tensor:
    """Teacher targets (n, K) by Sinkhorn-Knopp on ``exp(logits / temp)``.

    Alternately normalises prototype (row of Q = K x n) and sample sums; every sample's
    target sums to 1 and, at convergence, each prototype receives n/K of the mass.
    ``n_total`` is the number of samples over all processes (default: all-reduced n).
    """
    logits = teacher_logits.float()
    shift = logits.max().detach() if logits.numel() else torch.tensor(float("-inf"), device=logits.device)
    if _distributed():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    shift = shift if torch.isfinite(shift) else torch.zeros_like(shift)
    q = torch.exp((logits - shift) / temp).t()  # (K, n); a global shift cancels out
    if n_total is None:
        n_total = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device))
    n_total = torch.as_tensor(n_total, dtype=q.dtype, device=q.device)
    k = q.shape[0]
    total = all_reduce_sum(q.sum())
    q = q / total.clamp_min(torch.finfo(q.dtype).tiny)
    for _ in range(iterations):
        rows = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q = q / rows.clamp_min(torch.finfo(q.dtype).tiny) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny) / n_total
    return (q * n_total).t()


class SoftmaxCenter(nn.Module):
    """DINO's centring: ``softmax((t - c) / temp)`` with ``c`` an EMA of the teacher's batch mean."""

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Move the centre towards the mean of this (global) batch; skipped for an empty batch."""
        stats = torch.cat([teacher_logits.float().sum(0), torch.tensor([float(teacher_logits.shape[0])],
                                                                      device=teacher_logits.device)])
        stats = all_reduce_sum(stats)
        if stats[-1] > 0:
            mean = stats[:-1] / stats[-1]
            self.center.mul_(self.momentum).add_(mean.view(1, -1), alpha=1 - self.momentum)


def cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-sample ``-sum_k t_k log softmax(s / student_temp)_k``."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], student_temp: float = 0.1
              ) -> torch.Tensor:
    """Sum over every (student view, teacher view) pair of the batch-mean cross-entropy (DINOv2's DINOLoss)."""
    total = torch.zeros((), device=student[0].device)
    for s in student:
        for t in teacher:
            total = total + cross_entropy(s, t, student_temp).mean()
    return total


def ibot_loss(student_masked: torch.Tensor, teacher_masked: torch.Tensor, masks: torch.Tensor,
              student_temp: float = 0.1) -> torch.Tensor:
    """iBOT patch loss: cross-entropy on masked patches, averaged per image, then over all images.

    ``student_masked``/``teacher_masked`` are (M, K) for the M True entries of ``masks``
    (B, N) in row-major order; images without masked patches count with 0.
    """
    if masks.shape[0] == 0:
        return torch.zeros((), device=student_masked.device)
    per_image = masks.sum(-1).clamp_min(1).float()
    weight = (1.0 / per_image)[:, None].expand_as(masks)[masks]
    return (cross_entropy(student_masked, teacher_masked, student_temp) * weight).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate: ``-mean log(distance to nearest neighbour)`` of L2-normalised rows."""
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    n = x.shape[0]
    if n < 2:
        return torch.zeros((), device=x.device)
    with torch.no_grad():
        dots = x @ x.t()
        dots.view(-1)[:: n + 1].fill_(-2.0)  # exclude self
        nearest = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(dist_nn + eps).mean()
