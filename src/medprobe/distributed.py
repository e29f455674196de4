"""Process-group helpers shared by pretraining, extraction, the adaptation loops and the runner.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment)
:func:`setup_distributed` joins the process group (nccl on GPUs, gloo on CPUs) and picks the
process's device; without it everything degrades to one process (rank 0 of 1), so callers
never branch on "distributed or not" beyond :func:`world_size` > 1.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import torch
import torch.distributed as dist
from torch import nn

from medprobe.errors import ConfigError


@dataclass
class Dist:
    """This process's place in the job: rank, number of processes, device, whether it started the group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the process group if this object started it."""
        if self.owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def launched_distributed() -> bool:
    """Whether the environment asks for several processes (``torchrun`` sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(device_pref: str = "auto", key: str = "device") -> Dist:
    """Join (or start, from torchrun's environment) the process group and pick the device.

    ``device_pref`` is ``auto``, ``cpu`` or ``cuda``; ``key`` names the option in errors.
    """
    cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is 'cuda' but no CUDA device is available; use auto or cpu")
    owns = False
    if not initialized() and launched_distributed():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if initialized() else (0, 1)
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device, owns)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes results, checkpoints and logs (before the
    process group is joined or after it is left, the rank torchrun gave this process)."""
    return rank() == 0 if initialized() else int(os.environ.get("RANK", "0")) == 0


def free_port() -> int:
    """A free TCP port on this machine (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over the ranks (a new tensor; ``values`` itself in one process)."""
    if world_size() == 1:
        return values
    out = values.detach().clone()
    if dist.get_backend() == "nccl" and not out.is_cuda:  # nccl reduces GPU tensors only
        out = out.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(out)
    return out.to(values.device)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (e.g. BatchNorm running statistics)."""
    if world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def shard_bounds(n: int, world: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are cut into ``world`` contiguous parts
    whose sizes differ by at most one (earlier parts are the larger ones, as ``numpy.array_split``)."""
    base, extra = divmod(n, world)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass
class MicroBatch:
    """This process's rows of one micro-batch and how its mean loss enters the step.

    ``grad_scale`` multiplies the loss before ``backward`` (DDP then averages over the processes);
    ``loss_share`` weights the loss in the step's reported loss (summed over the processes).
    """

    rows: np.ndarray
    grad_scale: float
    loss_share: float
    last: bool  # the step's last micro-batch: gradients are synchronised and the optimizer steps


def split_micro(micro: np.ndarray, world: int, rank: int, share: Callable[[np.ndarray], float]) -> MicroBatch:
    """This process's part of one micro-batch: a contiguous part, or the whole micro-batch in every
    process when it has fewer samples than there are processes (each then counts 1/world of it).
    ``share(rows)`` is the rows' share of the step's loss normaliser."""
    if len(micro) >= world:
        a, b = shard_bounds(len(micro), world, rank)
        part = micro[a:b]
        w = share(part)
        return MicroBatch(part, w * world, w, False)
    w = share(micro)
    return MicroBatch(micro, w, w / world, False)


def _spawned(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    dist.init_process_group(backend="gloo", rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def spawn_local(fn: Callable[..., Any], nprocs: int, *args: Any, threads: int | None = None) -> None:
    """Run ``fn(*args)`` in ``nprocs`` CPU processes joined in a gloo process group, like
    ``torchrun --nproc_per_node nprocs`` on one machine (``fn`` must be importable by name)."""
    import torch.multiprocessing as mp
    threads = threads or max(1, (os.cpu_count() or 1) // nprocs)
    mp.spawn(_spawned, args=(nprocs, free_port(), fn, args, threads), nprocs=nprocs, join=True)
