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
import torch.nn.functional as F

from medprobe.backbones.loading import LoadReport, load_strict
from medprobe.backbones.timm_family import TimmBackbone, load_timm_weights
from medprobe.backbones.weights import Checkpoint, WeightsSource, hub_file, read_checkpoint, strip_prefix
from medprobe.errors import WeightsError

_CHECKPOINT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _hub_checkpoint(spec: BackboneSpec) -> tuple[Checkpoint, str]:
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
            path = hub_file(repo, name, spec.name)
            return read_checkpoint(path), str(path)
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
        self.spec = spec
        self.load_report: LoadReport | None = None
        if weights.kind == "hub":
            self.load_report = self._load(*_hub_checkpoint(spec))
        elif weights.kind in ("file", "dir"):
            self.load_report = self._load(read_checkpoint(weights.path), str(weights.path))
        self.spec = spec
        self.name = spec.name
        self.is_vit = True
        # nn.MultiheadAttention as one target (peft adapts its in- and out-projections) + the MLP
        self.lora_targets = spec.lora_targets or ("attn", "c_fc", "c_proj")
        self.has_cls_token = True
        self.patch_size = int(vision.patch_size)
        self.embed_dim = int(vision.width)
        self.num_blocks = len(self.model.transformer.resblocks)
        self.default_image_size = spec.default_image_size
        self.preprocess = spec.preprocess
        self.weights_tag = weights.tag

    def _load(self, ckpt: Checkpoint, source: str) -> LoadReport:
        report = LoadReport(source, ckpt.layout, list(ckpt.conversions))
        sd = ckpt.state_dict
        if any(k.startswith("visual.") for k in sd):
            sd = strip_prefix(sd, "visual.")
            report.conversions.append("kept the image tower (visual.*); text tower and logit scale dropped")
        grid = self.model.grid_size
        pos = sd.get("positional_embedding")
        if pos is not None and pos.shape != self.model.positional_embedding.shape:  # other pretraining size
            old = int(round((pos.shape[0] - 1) ** 0.5))
            sd = dict(sd)
            sd["positional_embedding"] = resample_abs_pos_embed(pos[None], list(grid), [old, old], num_prefix_tokens=1)[0]
            report.conversions.append(f"position embedding resampled from {old}x{old} to {grid[0]}x{grid[1]}")
        load_strict(self.model, sd, source, f"{self.spec.name} (open_clip {self.spec.arch} image tower)")
        report.tensors = len(sd)
        return report

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


    def attention(self, images: torch.Tensor) -> torch.Tensor:
        """Last-block softmax attention (B, heads, N, N), recomputed from the input of the last
        ``nn.MultiheadAttention`` (captured with a hook) and its own in-projection."""
        mha = self.model.transformer.resblocks[-1].attn
        h = self.input_of(mha, images, "query")
        if not getattr(mha, "batch_first", False):
            h = h.transpose(0, 1)
        b, n, d = h.shape
        heads = mha.num_heads
        q, k, _ = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q = q.reshape(b, n, heads, d // heads).transpose(1, 2)
        k = k.reshape(b, n, heads, d // heads).transpose(1, 2)
        return ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)


class OpenCLIPTimmBackbone(TimmBackbone):
    """An open_clip tower whose trunk is a timm model (BiomedCLIP): tokens from the trunk."""

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, overrides: dict[str, Any] | None = None) -> None:
        timm_name = spec.arch.removeprefix("timm:")
        super().__init__(spec, WeightsSource("random"), overrides, timm_name=timm_name)
        if weights.kind == "hub":
            ckpt, source = _hub_checkpoint(spec)
        elif weights.kind in ("file", "dir"):
            ckpt, source = read_checkpoint(weights.path), str(weights.path)
        else:
            ckpt = None
        if ckpt is not None:
            sd = ckpt.state_dict
            if any(k.startswith("visual.trunk.") for k in sd):
                sd = strip_prefix(sd, "visual.trunk.")
                ckpt = Checkpoint(sd, ckpt.layout, ckpt.conversions + ["kept the timm trunk of the image tower "
                                                                       "(visual.trunk.*); text tower, projection "
                                                                       "head and logit scale dropped"])
            self.load_report = load_timm_weights(self.model, ckpt, source, f"{spec.name} ({timm_name})")
        self.weights_tag = weights.tag
