"""Distributed setup of pretraining: the process group, the device, local spawning, gradient averaging.

Under ``torchrun`` (or :func:`spawn_local`) each process takes its slice of every global
batch; :func:`average_gradients` averages gradients with one all-reduce per step, so all
processes keep identical weights.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medprobe.errors import ConfigError
from medprobe.pretrain.config import PretrainConfig


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> Dist:
    """Join (or start, from torchrun's environment) the process group and pick the device."""
    cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    owns = False
    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device, owns)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
