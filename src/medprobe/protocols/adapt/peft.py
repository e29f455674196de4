"""Parameter-efficient adaptation: LoRA (through the ``peft`` library) and BitFit.

LoRA adds trainable low-rank updates to the chosen linear/conv layers inside the backbone's
blocks. The default targets are the attention and MLP layers of the backbone's family
(:meth:`default_lora_targets`: ``qkv``/``proj``/``fc1``/``fc2`` in timm ViTs,
``q_proj``/``k_proj``/``v_proj``/``o_proj``/``fc1``/``fc2`` in transformers' Dinov2/ViT,
the attention module and ``c_fc``/``c_proj`` in open_clip towers); every default target must
exist in the backbone, else a ConfigError (never a silent subset). BitFit trains only the bias
terms. In both the classification head stays trainable.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from medprobe.backbones.base import Backbone
from medprobe.errors import ConfigError

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")  # timm ViTs
_LORA_TYPES = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.MultiheadAttention)


def default_lora_targets(backbone: Backbone) -> tuple[str, ...]:
    """The attention and MLP layer names of the backbone's family (``Backbone.lora_targets``)."""
    targets = tuple(getattr(backbone, "lora_targets", ()) or ())
    return targets or DEFAULT_LORA_TARGETS


def _block_prefixes(backbone: Backbone) -> list[str]:
    blocks = {id(m) for m in backbone.block_modules()}
    return [name + "." for name, m in backbone.model.named_modules() if id(m) in blocks and name]


def adaptable_modules(backbone: Backbone) -> dict[str, str]:
    """Full name -> type of every layer LoRA can adapt inside the backbone's blocks."""
    prefixes = _block_prefixes(backbone)
    return {name: type(m).__name__ for name, m in backbone.model.named_modules()
            if isinstance(m, _LORA_TYPES) and (not prefixes or any(name.startswith(p) for p in prefixes))}


def _describe_names(modules: dict[str, str], limit: int = 30) -> str:
    """Distinct short names (last component, with the layer type) of adaptable modules."""
    short: dict[str, str] = {}
    for name, kind in modules.items():
        short.setdefault(name.rsplit(".", 1)[-1], kind)
    items = [f"{k} ({v})" for k, v in sorted(short.items())]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def lora_target_names(backbone: Backbone, targets: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """Full module names matching ``targets`` (by last name component or dotted suffix) and the unmatched targets.

    Raises :class:`ConfigError` listing the backbone's module names when any target (given, or
    the family's defaults) matches nothing: a target set must fit the family.
    """
    modules = adaptable_modules(backbone)
    wanted = list(targets) if targets is not None else list(default_lora_targets(backbone))

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    chosen = [name for name in modules if any(matches(name, t) for t in wanted)]
    unmatched = [t for t in wanted if not any(matches(name, t) for name in modules)]
    if not chosen or unmatched:
        what = ", ".join(unmatched) if chosen else ", ".join(wanted)
        have = _describe_names(modules) if modules else "(no linear or convolution layers)"
        raise ConfigError(f"targets: LoRA target module(s) {what} not found in backbone {backbone.name}; "
                          f"its block layers are named: {have}. Set protocols.lora.targets to some of these.")
    return chosen, unmatched


def apply_lora(backbone: Backbone, r: int, alpha: float, dropout: float, targets: Sequence[str] | None
               ) -> dict[str, object]:
    """Freeze ``backbone`` and inject LoRA adapters (peft) into the matching modules, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    names, unmatched = lora_target_names(backbone, targets)
    for p in backbone.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, backbone.model)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    return {"lora_modules": len(names), "lora_unmatched_targets": unmatched,
            "lora_targets": sorted({n.rsplit(".", 1)[-1] for n in names})}


def is_lora_param(name: str) -> bool:
    return "lora_" in name


def apply_bitfit(backbone: Backbone) -> int:
    """Train only the bias terms of ``backbone`` (all of them, norms included); returns how many tensors."""
    n = 0
    for name, p in backbone.named_parameters():
        keep = name.rsplit(".", 1)[-1] == "bias"
        p.requires_grad_(keep)
        n += keep
    if n == 0:
        raise ConfigError(f"bitfit: backbone {backbone.name} has no bias parameters to train")
    return n
