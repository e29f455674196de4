"""Strict loading: every tensor of a model comes from the checkpoint, or a WeightsError names the file and keys.

One helper for every family: :func:`load_strict` loads a state dict already converted to the
model's layout; :func:`check_accounted` judges loading info a library reports itself
(transformers' ``from_pretrained(..., output_loading_info=True)``). :class:`LoadReport` records
what was read (layout, conversions) for ``medprobe check-weights``.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from medprobe.errors import WeightsError


@dataclass
class LoadReport:
    """What loading a checkpoint did: the file, the layout recognised and each conversion applied."""

    source: str
    layout: str
    conversions: list[str] = field(default_factory=list)
    tensors: int = 0


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_accounted(source: str, target: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                    mismatched: Iterable[str] = (), hint: str = "") -> None:
    """Raise a :class:`WeightsError` naming ``source`` and the keys unless all three lists are empty."""
    missing, unexpected, mismatched = list(missing), list(unexpected), list(mismatched)
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model are not in the file: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the file have no place in the model: {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} tensor(s) have another shape: {_listing(mismatched, 5)}")
    raise WeightsError(f"weights {source} do not fit {target}: " + "; ".join(parts)
                       + (f". {hint}" if hint else ". Check that the file is for this backbone (and size), or pass "
                          "the matching architecture with --arch KEY=VALUE."))


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], source: str, target: str, hint: str = "") -> None:
    """Load ``sd`` into ``module``; any missing, unexpected or differently shaped tensor is a WeightsError."""
    own = module.state_dict()
    mismatched = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})" for k, v in sd.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        check_accounted(source, target, missing, unexpected, mismatched, hint)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    check_accounted(source, target, missing, unexpected, (), hint)
