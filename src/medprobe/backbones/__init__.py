"""Backbones: one registry, three family adapters (timm, transformers, open_clip).

>>> bb = create_backbone("dinov2_vits14", weights="random")
>>> out = bb.forward_tokens(images, blocks=[-4, -3, -2, -1])
"""
from __future__ import annotations

from typing import Any

from typing import TYPE_CHECKING

from medprobe.backbones.registry import BackboneSpec, PreprocessSpec, get_spec, list_backbones, register_backbone
from medprobe.errors import ConfigError

if TYPE_CHECKING:
    from medprobe.backbones.base import Backbone, BlockTokens, TokenOutput

# torch-backed names load on first use, so `medprobe list backbones` and `--help` never import torch
_LAZY = {"Backbone": "medprobe.backbones.base", "BlockTokens": "medprobe.backbones.base",
         "TokenOutput": "medprobe.backbones.base", "parse_weights": "medprobe.backbones.weights",
         "save_dinov2_checkpoint": "medprobe.backbones.weights"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

RANDOM_INIT_SEED = 0

# family -> "module:class" of its adapter (imported on first use: each family pulls in its library)
FAMILIES: dict[str, str] = {
    "timm": "medprobe.backbones.timm_family:TimmBackbone",
    "hf": "medprobe.backbones.hf_family:HFBackbone",
    "open_clip": "medprobe.backbones.openclip_family:OpenCLIPBackbone",
    "open_clip_timm": "medprobe.backbones.openclip_family:OpenCLIPTimmBackbone",
}


def family_class(spec: BackboneSpec) -> type[Backbone]:
    """The adapter class building ``spec`` (see :data:`FAMILIES`)."""
    import importlib
    try:
        module, _, name = FAMILIES[spec.family].partition(":")
    except KeyError:
        raise ConfigError(f"backbone {spec.name!r}: unknown family {spec.family!r} "
                          f"(known: {', '.join(FAMILIES)})") from None
    return getattr(importlib.import_module(module), name)

__all__ = ["Backbone", "BackboneSpec", "BlockTokens", "PreprocessSpec", "TokenOutput", "create_backbone",
           "get_spec", "list_backbones", "register_backbone", "save_dinov2_checkpoint"]


def create_backbone(name: str, weights: str | None = "random", *, tiny: bool = False,
                    overrides: dict[str, Any] | None = None) -> Backbone:
    """Build a registered backbone in eval mode.

    ``weights`` is ``random``, ``hub`` or a local file/folder. ``tiny=True`` builds the small
    configuration of the same architecture class (tests, quick demos); ``overrides`` passes
    extra constructor arguments (e.g. ``{"depth": 6}``).
    """
    import torch

    from medprobe.backbones.weights import parse_weights
    spec = get_spec(name)
    source = parse_weights(weights)
    kwargs = {**(spec.tiny if tiny else {}), **(overrides or {})}
    cls = family_class(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # `random` weights are the same on every build and machine
        try:
            backbone = cls(spec, source, kwargs)
        except TypeError as e:
            if not overrides:
                raise
            raise ConfigError(f"architecture overrides {overrides} do not fit backbone {name!r} ({spec.arch}): {e}; "
                              f"use constructor arguments of that model (e.g. depth, embed_dim)") from None
    backbone.tiny = tiny
    backbone.overrides = kwargs
    return backbone.eval()
