"""The backbone contract every model family implements.

A :class:`Backbone` wraps a network from timm, Hugging Face transformers or open_clip and
exposes one uniform call, :meth:`Backbone.forward_tokens`, plus the facts a protocol
needs (embedding width, patch size, number of blocks, preprocessing).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from medprobe.backbones.registry import PreprocessSpec  # noqa: F401  (defined there: torch-free)


@dataclass
class BlockTokens:
    """Output of one intermediate block: its CLS (or pooled) token and its patch grid."""

    index: int
    cls: torch.Tensor  # (B, D_i)
    patch_grid: torch.Tensor  # (B, D_i, h, w)

    @property
    def mean_patch(self) -> torch.Tensor:
        return self.patch_grid.mean(dim=(2, 3))


@dataclass
class TokenOutput:
    """What :meth:`Backbone.forward_tokens` returns.

    ``cls`` is the final (normalised) CLS token, or the mean patch token / global pooled map
    for models without one (SAM, CNNs). ``patch_grid`` is (B, D, h, w). ``blocks`` holds the
    requested intermediate blocks in the order they were requested.
    """

    cls: torch.Tensor
    mean_patch: torch.Tensor
    patch_grid: torch.Tensor
    blocks: list[BlockTokens] = field(default_factory=list)


class Backbone(nn.Module):
    """A vision model with the medprobe token contract.

    Attributes: ``name`` (registry name), ``embed_dim``, ``patch_size`` (None for CNNs),
    ``num_blocks``, ``default_image_size``, ``preprocess`` (:class:`PreprocessSpec`),
    ``has_cls_token``, ``weights_tag`` (``random``, ``hub:<id>`` or ``file:<sha256-prefix>``)
    and ``model`` (the wrapped network, e.g. a timm ``VisionTransformer``).
    """

    name: str
    embed_dim: int
    patch_size: int | None
    num_blocks: int
    default_image_size: int
    preprocess: PreprocessSpec
    has_cls_token: bool
    is_vit: bool
    weights_tag: str = "random"
    tiny: bool = False  # built at the registry's tiny configuration (set by create_backbone)
    overrides: dict = {}  # constructor arguments applied over the registry's (set by create_backbone)
    model: nn.Module
    load_report: object = None  # medprobe.backbones.loading.LoadReport when weights were read
    lora_targets: tuple[str, ...] = ()  # the family's attention + MLP layer names (LoRA defaults)

    def forward_tokens(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> TokenOutput:
        """Run the model on normalised images (B, 3, H, W).

        ``blocks`` are block indices (0-based; negative counts from the end, -1 = last)
        whose outputs are returned in ``TokenOutput.blocks``. Intermediate tokens are
        passed through the model's final norm, as DINOv2's ``get_intermediate_layers``.
        """
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pooled embedding
        return self.forward_tokens(images).cls

    def attention(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax self-attention of the last block (B, heads, N, N) over all tokens, prefix tokens
        first, for normalised images. Families without CLS self-attention raise ConfigError."""
        from medprobe.errors import ConfigError
        if not self.is_vit or not self.patch_size:
            raise ConfigError(f"attention maps need a vision transformer; {self.name} is a CNN and has no "
                              f"self-attention. Choose a ViT backbone (e.g. dinov2_vits14, rad_dino, deit_s16)")
        raise ConfigError(f"CLS attention maps need a ViT with a CLS token; {self.name} has none "
                          f"(e.g. a windowed encoder without class token)")

    def input_of(self, module: nn.Module, images: torch.Tensor, name: str) -> torch.Tensor:
        """The first input of ``module`` (positional, or the keyword ``name``) during a forward pass of
        ``images``: what family ``attention`` methods recompute the last block's attention from."""
        captured: dict[str, torch.Tensor] = {}

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["x"] = args[0] if args else kwargs[name]

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.forward_tokens(images)
        finally:
            handle.remove()
        return captured["x"]

    def block_modules(self) -> list[nn.Module]:
        """The transformer blocks / CNN stages in order (for freezing and truncation)."""
        raise NotImplementedError

    def truncate(self, k: int) -> None:
        """Keep only the first ``k`` blocks (decapitation); later blocks are removed."""
        raise NotImplementedError

    def resolve_blocks(self, blocks: Sequence[int]) -> list[int]:
        out = []
        for b in blocks:
            i = b + self.num_blocks if b < 0 else b
            if not 0 <= i < self.num_blocks:
                from medprobe.errors import ConfigError
                raise ConfigError(f"block index {b} out of range for {self.name} with {self.num_blocks} blocks "
                                  f"(use 0..{self.num_blocks - 1} or -1..-{self.num_blocks})")
            out.append(i)
        return out
