"""Activation checkpointing: recompute a block's activations in the backward pass instead of storing them.

:func:`enable_activation_checkpointing` switches a backbone to checkpointing through its own
library where the library offers it (timm's ``set_grad_checkpointing``, whose
``forward_intermediates`` honours it; transformers' ``gradient_checkpointing_enable`` (``activation_checkpointing_enable`` since v5);
open_clip's ``set_grad_checkpointing``) and otherwise wraps every block of
:meth:`Backbone.block_modules` in ``torch.utils.checkpoint`` (:func:`checkpoint_modules`).
Always non-reentrant checkpointing: it works with frozen inputs (LoRA, BitFit) and with DDP.
Results are unchanged (same gradients); memory drops to about one block's activations.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from medprobe.backbones.base import Backbone


def _checkpointed_forward(forward: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_modules(modules: Iterable[nn.Module]) -> int:
    """Make each module's forward a non-reentrant ``torch.utils.checkpoint`` call; returns how many."""
    n = 0
    for module in modules:
        if getattr(module, "_medprobe_checkpointed", False):
            continue
        module.forward = functools.partial(_checkpointed_forward, module.forward)
        module._medprobe_checkpointed = True
        n += 1
    return n


def enable_activation_checkpointing(backbone: Backbone) -> str:
    """Turn on activation checkpointing over ``backbone``'s blocks; returns how (for the unit's info)."""
    model = backbone.model
    if getattr(model, "supports_gradient_checkpointing", False):  # transformers (renamed in v5)
        for method, kwargs in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                               ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
            if hasattr(model, method):
                getattr(model, method)(**{kwargs: {"use_reentrant": False}})
                return f"transformers {method}"
    if hasattr(model, "set_grad_checkpointing"):
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, RuntimeError):  # e.g. timm VGG: not supported
            pass
        else:
            if _flag_on(model):
                return f"{type(model).__module__.split('.')[0]} set_grad_checkpointing"
    n = checkpoint_modules(backbone.block_modules())
    return f"torch.utils.checkpoint over {n} blocks"


def _flag_on(model: nn.Module) -> bool:
    """Whether ``set_grad_checkpointing`` switched a ``grad_checkpointing`` flag on somewhere in ``model``."""
    return any(getattr(m, "grad_checkpointing", False) is True for m in model.modules())
