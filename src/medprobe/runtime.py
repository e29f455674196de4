"""Device, precision and seeding: one place decides where and how models run."""
from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from medprobe.errors import check_choice

Precision = Literal["auto", "bf16", "fp32"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def bf16_supported(device_type: str = "cpu") -> bool:
    """Whether bf16 autocast is fast on this device (AVX-512 BF16/AMX on CPU, Ampere+ on GPU)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` becomes ``bf16`` where supported, else ``fp32``."""
    check_choice(precision, ("auto", "bf16", "fp32"), "precision")
    if precision == "auto":
        return "bf16" if bf16_supported(device.type) else "fp32"
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
