"""Adapter for timm models: DINOv2, DeiT, MAE, supervised ViT, SAM's image encoder and CNNs.

All token extraction goes through timm's ``forward_intermediates``; ViTs are built with
``dynamic_img_size=True`` so position embeddings are interpolated for any input size.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from medprobe.backbones.base import Backbone, BlockTokens, TokenOutput
from medprobe.backbones.registry import BackboneSpec
from medprobe.backbones.weights import WeightsSource, hub_file, read_state_dict
from medprobe.errors import WeightsError


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    names = cls if isinstance(cls, (list, tuple)) else [cls]
    return tuple(f"{n}." for n in names)


def load_timm_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into a timm model through the model module's own checkpoint filter.

    The filter converts foreign layouts (DINOv2 original checkpoints, other position-embedding
    sizes). Classifier weights are dropped; any other missing or unexpected key is an error.
    """
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            sd = filter_fn(dict(sd), model)
        except Exception as e:
            raise WeightsError(f"weights {source} do not fit {type(model).__name__}: {e}") from None
    head = _classifier_prefixes(model)
    sd = {k: v for k, v in sd.items() if not k.startswith(head) or k in model.state_dict()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise WeightsError(f"weights {source} do not fit the architecture: {str(e)[:800]}") from None
    if missing or unexpected:
        raise WeightsError(f"weights {source} do not match the architecture: missing keys {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                           f"{' ...' if len(unexpected) > 10 else ''}")


class TimmBackbone(Backbone):
    """A timm ViT or CNN behind the medprobe token contract."""

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, overrides: dict[str, Any] | None = None,
                 timm_name: str | None = None) -> None:
        super().__init__()
        kwargs: dict[str, Any] = dict(overrides or {})
        if spec.is_vit and "samvit" not in spec.arch:
            kwargs.setdefault("dynamic_img_size", True)
        arch = timm_name or spec.arch
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        if weights.kind == "hub":
            repo = spec.hub_id.removeprefix("timm/") if spec.hub_id else arch
            path = hub_file(f"timm/{repo}", "model.safetensors", spec.name)
            load_timm_state_dict(self.model, read_state_dict(path), str(path))
        elif weights.kind in ("file", "dir"):
            load_timm_state_dict(self.model, read_state_dict(weights.path), str(weights.path))
        self.spec = spec
        self.name = spec.name
        self.is_vit = spec.is_vit
        self.is_sam = "samvit" in arch
        self.patch_size = spec.patch_size
        self.has_cls_token = spec.has_cls_token
        self.embed_dim = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.num_blocks = len(self.model.blocks) if self.is_vit else len(self.model.feature_info)
        self.default_image_size = spec.default_image_size
        self.preprocess = spec.preprocess
        self.weights_tag = weights.tag

    def block_modules(self) -> list[nn.Module]:
        if self.is_vit:
            return list(self.model.blocks)
        modules = dict(self.model.named_modules())
        return [modules[info["module"]] for info in self.model.feature_info]

    def truncate(self, k: int) -> None:
        self.resolve_blocks([k - 1])
        self.model.prune_intermediate_layers(indices=[k - 1], prune_norm=False, prune_head=True)
        self.num_blocks = k

    def forward_tokens(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> TokenOutput:
        idx = self.resolve_blocks(blocks)
        take = sorted(set(idx) | {self.num_blocks - 1})
        m = self.model
        if self.is_vit and not self.is_sam:
            final, inter = m.forward_intermediates(images, indices=take, return_prefix_tokens=True, norm=True,
                                                   output_fmt="NCHW")
            by_index = {}
            for i, (grid, prefix) in zip(take, inter):
                cls = prefix[:, 0] if self.has_cls_token and prefix.shape[1] else grid.mean(dim=(2, 3))
                by_index[i] = BlockTokens(i, cls, grid)
            last = by_index[self.num_blocks - 1]
            cls = final[:, 0] if self.has_cls_token else last.mean_patch
            grid = last.patch_grid
        else:  # SAM (neck applied to every block) and CNN stages: no class token
            final, inter = m.forward_intermediates(images, indices=take, norm=self.is_sam, output_fmt="NCHW")
            by_index = {i: BlockTokens(i, g.mean(dim=(2, 3)), g) for i, g in zip(take, inter)}
            grid = final if self.is_sam else by_index[self.num_blocks - 1].patch_grid
            cls = grid.mean(dim=(2, 3))
        return TokenOutput(cls=cls, mean_patch=grid.mean(dim=(2, 3)), patch_grid=grid,
                           blocks=[by_index[i] for i in idx])
