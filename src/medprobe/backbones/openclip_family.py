"""Adapter for open_clip image towers (OpenAI CLIP, OpenCLIP, BiomedCLIP).

Native open_clip ViTs get position embeddings resampled on the fly for any input size.
BiomedCLIP's tower is a timm ViT trunk inside open_clip: its tokens come from that trunk.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from timm.layers import resample_abs_pos_embed
from torch import nn

from medprobe.backbones.base import Backbone, BlockTokens, TokenOutput
from medprobe.backbones.registry import BackboneSpec
from medprobe.backbones.timm_family import TimmBackbone, load_timm_state_dict
from medprobe.backbones.weights import WeightsSource, hub_file, read_state_dict, strip_prefix
from medprobe.errors import WeightsError

_CHECKPOINT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _hub_checkpoint(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    if spec.hub_id and spec.hub_id.startswith("hf-hub:"):
        repo = spec.hub_id.removeprefix("hf-hub:")
    else:
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.hub_id) or {}
        repo = (cfg.get("hf_hub") or "").strip("/")
        if not repo:
            raise WeightsError(f"open_clip has no hub location for {spec.arch} / {spec.hub_id}")
    last: Exception | None = None
    for name in _CHECKPOINT_FILES:
        try:
            return read_state_dict(hub_file(repo, name, spec.name))
        except WeightsError as e:
            last = e
    raise last  # type: ignore[misc]


class OpenCLIPBackbone(Backbone):
    """The image tower of an open_clip model behind the medprobe token contract."""

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        cfg = open_clip.get_model_config(spec.arch)
        if cfg is None:
            raise WeightsError(f"open_clip does not know architecture {spec.arch!r}")
        vision = CLIPVisionCfg(**{**cfg["vision_cfg"], **(overrides or {})})
        self.model = _build_vision_tower(cfg["embed_dim"], vision, quick_gelu=cfg.get("quick_gelu", False))
        if weights.kind == "hub":
            self._load(_hub_checkpoint(spec), f"{spec.arch}/{spec.hub_id}")
        elif weights.kind in ("file", "dir"):
            self._load(read_state_dict(weights.path), str(weights.path))
        self.spec = spec
        self.name = spec.name
        self.is_vit = True
        self.has_cls_token = True
        self.patch_size = int(vision.patch_size)
        self.embed_dim = int(vision.width)
        self.num_blocks = len(self.model.transformer.resblocks)
        self.default_image_size = spec.default_image_size
        self.preprocess = spec.preprocess
        self.weights_tag = weights.tag

    def _load(self, sd: dict[str, torch.Tensor], source: str) -> None:
        sd = strip_prefix(sd, "visual.")
        grid = self.model.grid_size
        pos = sd.get("positional_embedding")
        if pos is not None and pos.shape != self.model.positional_embedding.shape:  # other pretraining size
            old = int(round((pos.shape[0] - 1) ** 0.5))
            sd["positional_embedding"] = resample_abs_pos_embed(pos[None], list(grid), [old, old], num_prefix_tokens=1)[0]
        try:
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise WeightsError(f"weights {source} do not fit the open_clip tower: {str(e)[:800]}") from None
        if missing or unexpected:
            raise WeightsError(f"weights {source} do not match the open_clip tower: missing keys {missing[:10]}, "
                               f"unexpected keys {unexpected[:10]}")

    def block_modules(self) -> list[nn.Module]:
        return list(self.model.transformer.resblocks)

    def truncate(self, k: int) -> None:
        self.resolve_blocks([k - 1])
        self.model.transformer.prune_intermediate_layers(indices=[k - 1])
        self.num_blocks = k

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        m = self.model
        x = m.conv1(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = m.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = m.positional_embedding.to(x.dtype)[None]
        if (h, w) != tuple(m.grid_size):
            pos = resample_abs_pos_embed(pos, [h, w], list(m.grid_size), num_prefix_tokens=1)
        x = m.patch_dropout(x + pos)
        return m.ln_pre(x), h, w

    def forward_tokens(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> TokenOutput:
        idx = self.resolve_blocks(blocks)
        x, h, w = self._embed(images)
        take = sorted(set(idx) | {self.num_blocks - 1})
        _, inter = self.model.transformer.forward_intermediates(x, indices=take)
        by_index = {}
        for i, tokens in zip(take, inter):
            tokens = self.model.ln_post(tokens)
            grid = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            by_index[i] = BlockTokens(i, tokens[:, 0], grid)
        last = by_index[self.num_blocks - 1]
        return TokenOutput(cls=last.cls, mean_patch=last.mean_patch, patch_grid=last.patch_grid,
                           blocks=[by_index[i] for i in idx])


class OpenCLIPTimmBackbone(TimmBackbone):
    """An open_clip tower whose trunk is a timm model (BiomedCLIP): tokens from the trunk."""

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, overrides: dict[str, Any] | None = None) -> None:
        timm_name = spec.arch.removeprefix("timm:")
        super().__init__(spec, WeightsSource("random"), overrides, timm_name=timm_name)
        if weights.kind == "hub":
            sd, source = _hub_checkpoint(spec), spec.hub_id
        elif weights.kind in ("file", "dir"):
            sd, source = read_state_dict(weights.path), str(weights.path)
        else:
            sd = None
        if sd is not None:
            load_timm_state_dict(self.model, strip_prefix(sd, "visual.trunk."), str(source))
        self.weights_tag = weights.tag
