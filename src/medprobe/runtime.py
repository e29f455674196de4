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

from medprobe.options import option


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
    option("precision", precision, str, choices=("auto", "bf16", "fp32"), what="precision")
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


ENV_PACKAGES = ("torch", "timm", "transformers", "open_clip_torch", "peft", "numpy", "scikit-learn")


@functools.cache
def _git_sha() -> str | None:
    """The commit of the checkout medprobe runs from (None when installed from a wheel)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isdir(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device, precision: str) -> dict[str, object]:
    """What a result was computed with: versions, device and precision (recorded with every run)."""
    import platform
    from importlib import metadata
    from medprobe import __version__
    versions: dict[str, str | None] = {}
    for pkg in ENV_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"medprobe": __version__, "git_sha": _git_sha(), "python": platform.python_version(),
            "packages": versions, "device": str(device), "device_name": name, "precision": precision,
            "platform": platform.platform()}
