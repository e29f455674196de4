"""Distributed setup of pretraining: the process group (shared helpers in :mod:`medprobe.distributed`),
local spawning, gradient averaging.

Under ``torchrun`` (or :func:`spawn_local`) each process takes its slice of every global
batch; :func:`average_gradients` averages gradients with one all-reduce per step, so all
processes keep identical weights.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medprobe.distributed import Dist, free_port
from medprobe.distributed import setup_distributed as _setup
from medprobe.pretrain.config import PretrainConfig

__all__ = ["Dist", "setup_distributed", "spawn_local", "average_gradients"]


def setup_distributed(device_pref: str) -> Dist:
    """Join (or start, from torchrun's environment) the process group and pick the device
    (:func:`medprobe.distributed.setup_distributed`, errors naming ``train.device``)."""
    return _setup(device_pref, key="train.device")


_free_port = free_port


def _spawn_worker(rank: int, world_size: int, port: int, config: PretrainConfig, kwargs: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend="gloo", rank=rank, world_size=world_size)
    try:
        from medprobe.pretrain.trainer import pretrain_in_process
        pretrain_in_process(config, **kwargs)
    finally:
        dist.destroy_process_group()


def spawn_local(config: PretrainConfig, nprocs: int, **kwargs: Any) -> Path:
    """Run :func:`pretrain_in_process` in ``nprocs`` CPU processes (gloo), like ``torchrun`` on one machine."""
    import torch.multiprocessing as mp
    mp.spawn(_spawn_worker, args=(nprocs, _free_port(), config, kwargs), nprocs=nprocs, join=True)
    from medprobe.pretrain.trainer import TEACHER_FILE
    return config.output_path / TEACHER_FILE


def average_gradients(params: Sequence[nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over the processes (one flat all-reduce)."""
    if world_size == 1:
        return
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
