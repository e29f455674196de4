"""The dataset adapter registry: a name -> a builder ``(root, **options) -> ImageDataset``.

An adapter module registers its builder with :func:`register_adapter`; the modules listed
in :data:`ADAPTER_MODULES` are imported at the bottom of this file, so importing the
registry registers them all. To add an adapter, write ``adapters/<name>.py`` and append
its module name to that tuple.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medprobe.data.base import ImageDataset
from medprobe.errors import ConfigError, suggest


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter: its name, a one-line summary, longer details and its builder."""

    name: str
    summary: str
    details: str
    builder: Callable[..., ImageDataset]

    def options(self) -> dict[str, Any]:
        """The builder's options and their defaults (``inspect.Parameter.empty`` if required)."""
        params = list(inspect.signature(self.builder).parameters.values())[1:]
        return {p.name: p.default for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


_REGISTRY: dict[str, AdapterInfo] = {}


def register_adapter(name: str, summary: str, details: str = "") -> Callable[[Callable[..., ImageDataset]],
                                                                            Callable[..., ImageDataset]]:
    """Decorator registering ``builder(root, **options) -> ImageDataset`` under ``name``."""
    def decorate(builder: Callable[..., ImageDataset]) -> Callable[..., ImageDataset]:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"dataset adapter {name!r} is registered twice")
        text = details or inspect.cleandoc(builder.__doc__ or "")
        _REGISTRY[name] = AdapterInfo(name, summary, text, builder)
        return builder
    return decorate


def list_adapters() -> list[AdapterInfo]:
    """All registered adapters, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_adapter(name: str) -> AdapterInfo:
    """The adapter called ``name``; :class:`ConfigError` with the closest names otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(suggest(str(name), _REGISTRY, "dataset adapter"))
    return _REGISTRY[name]


def build_dataset(adapter: str, root: str | Path | None = None, **options: Any) -> ImageDataset:
    """Build a dataset with adapter ``adapter`` from ``root`` (a file or folder) and its options."""
    info = get_adapter(adapter)
    params = inspect.signature(info.builder).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        allowed = list(info.options())
        for key in options:
            if key not in allowed:
                import difflib
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"dataset adapter {adapter!r} has no option {key!r}.{hint} "
                                  f"Allowed options: {', '.join(allowed) or '(none)'}.")
    if isinstance(root, str) and root.strip() == "":
        root = None
    return info.builder(Path(root).expanduser() if root is not None else None, **options)


# --------------------------------------------------------------------------- helpers for builders
def require_root(adapter: str, root: Path | None, what: str) -> Path:
    """``root`` or a :class:`ConfigError` saying what the adapter needs."""
    if root is None:
        raise ConfigError(f"dataset adapter {adapter!r} needs a root: {what}")
    return Path(root)


# --------------------------------------------------------------------------- adapter modules
# Importing these registers their adapters. Add new adapter modules here.
ADAPTER_MODULES: tuple[str, ...] = (
    "phantom",
    "medmnist",
    "manifest",
    "nih_chestxray14",
    "chexpert",
    "montgomery",
    "shenzhen",
    "sarscov2_ct",
    "amos",
    "msd",
    "figshare_brain_tumor",
    "vindr_cxr",
    "rsna_pneumonia",
    "candid_ptx",
    "aptos2019",
    "cbis_ddsm",
    "isic2019",
    "padchest",
    "mimic_cxr",
    "mimic_cxr_jpg",
    "siim_acr",
    "vindr_ribcxr",
    "btcv",
    "iu_xray",
)

for _module in ADAPTER_MODULES:
    importlib.import_module(f"{__name__}.{_module}")
