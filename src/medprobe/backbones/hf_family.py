"""Adapter for Hugging Face transformers vision models (RAD-DINO's Dinov2Model, ViT-MSN)."""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn

from medprobe.backbones.base import Backbone, BlockTokens, TokenOutput
from medprobe.backbones.registry import BackboneSpec
from medprobe.backbones.weights import WeightsSource, hub_file, read_state_dict, strip_prefix
from medprobe.errors import WeightsError

_CONFIGS = {"Dinov2Model": "Dinov2Config", "Dinov2WithRegistersModel": "Dinov2WithRegistersConfig",
            "ViTMSNModel": "ViTMSNConfig", "ViTModel": "ViTConfig"}


class HFBackbone(Backbone):
    """A transformers ViT-style model; intermediate blocks come from ``hidden_states``."""

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        model_cls = getattr(transformers, spec.arch)
        if weights.kind == "dir" and (weights.path / "config.json").is_file():
            self.model = model_cls.from_pretrained(str(weights.path))
        elif weights.kind == "hub":
            config_path = hub_file(spec.hub_id, "config.json", spec.name)
            hub_file(spec.hub_id, "model.safetensors", spec.name)
            self.model = model_cls.from_pretrained(str(config_path.parent))
        else:
            config = getattr(transformers, _CONFIGS[spec.arch])(**{**spec.arch_kwargs, **(overrides or {})})
            self.model = model_cls(config)
            if weights.kind in ("file", "dir"):
                self._load(read_state_dict(weights.path), str(weights.path))
        self.model.eval()
        cfg = self.model.config
        self.spec = spec
        self.name = spec.name
        self.is_vit = True
        self.patch_size = int(cfg.patch_size)
        self.has_cls_token = True
        self.embed_dim = int(cfg.hidden_size)
        self.num_blocks = int(cfg.num_hidden_layers)
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0))
        self.default_image_size = spec.default_image_size
        self.preprocess = spec.preprocess
        self.weights_tag = weights.tag
        self._interpolate_kw = ({"interpolate_pos_encoding": True}
                                if "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters else {})

    def _load(self, sd: dict[str, torch.Tensor], source: str) -> None:
        sd = strip_prefix(sd, self.model.base_model_prefix + ".")
        try:
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
        except RuntimeError as e:
            raise WeightsError(f"weights {source} do not fit {self.model.__class__.__name__}: {str(e)[:800]}") from None
        missing = [k for k in missing if not k.startswith("pooler.")]
        if missing or unexpected:
            raise WeightsError(f"weights {source} do not match {self.model.__class__.__name__}: missing keys "
                               f"{missing[:10]}, unexpected keys {unexpected[:10]}")

    def block_modules(self) -> list[nn.Module]:
        return list(self.model.encoder.layer)

    def truncate(self, k: int) -> None:
        self.resolve_blocks([k - 1])
        self.model.encoder.layer = self.model.encoder.layer[:k]
        self.model.config.num_hidden_layers = k
        self.num_blocks = k

    def forward_tokens(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> TokenOutput:
        idx = self.resolve_blocks(blocks)
        out = self.model(pixel_values=images, output_hidden_states=bool(idx), **self._interpolate_kw)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        p = self.num_prefix_tokens

        def split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            grid = tokens[:, p:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            return tokens[:, 0], grid

        cls, grid = split(out.last_hidden_state)
        norm = self.model.layernorm
        layer_blocks = []
        for i in idx:
            tokens = out.last_hidden_state if i == self.num_blocks - 1 else norm(out.hidden_states[i + 1])
            layer_blocks.append(BlockTokens(i, *split(tokens)))
        return TokenOutput(cls=cls, mean_patch=grid.mean(dim=(2, 3)), patch_grid=grid, blocks=layer_blocks)
