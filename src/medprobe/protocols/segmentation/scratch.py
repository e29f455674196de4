"""Segmentation baselines trained end to end from scratch: U-Net and TransUNet.

* :class:`UNet` — the classic U-Net (Ronneberger et al. 2015): four 2x down-sampling stages
  of two 3x3 conv-BN-ReLU, a bottleneck, four transposed-conv up-sampling stages with
  concatenated skips. ``width=64`` gives the original widths 64-1024 (31 M parameters).
* :class:`TransUNet` — the **pure-ViT-encoder variant** of TransUNet ("ViT-None" in Chen et al.
  2021): 16x16 patch embedding, a stack of pre-norm transformer blocks (timm ``Block``),
  the tokens reshaped to a grid and decoded by the cascaded upsampler (four 2x stages of
  conv-BN-ReLU). The R50-ViT hybrid of the paper (ResNet-50 stem with CNN skips) is not
  implemented: it is too heavy to train on a CPU; this variant has no skip connections.

Both take normalised images (B, 3, H, W) of any size (padded internally to a multiple of 16)
and return logits (B, C, H, W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medprobe.protocols.segmentation.decoders import conv_bn_relu

SCRATCH_MODELS: tuple[str, ...] = ("unet_scratch", "transunet_scratch")
TRANSUNET_VARIANT = "TransUNet, pure ViT encoder (ViT-None variant, no R50 hybrid, no CNN skips)"


def _pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


class UNet(nn.Module):
    """Classic U-Net with batch norm and padded convolutions."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        ch = [width * 2 ** k for k in range(5)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in ch:
            self.down.append(nn.Sequential(conv_bn_relu(cin, c), conv_bn_relu(c, c)))
            cin = c
        self.up = nn.ModuleList(nn.ConvTranspose2d(ch[k + 1], ch[k], 2, stride=2) for k in range(3, -1, -1))
        self.dec = nn.ModuleList(nn.Sequential(conv_bn_relu(2 * ch[k], ch[k]), conv_bn_relu(ch[k], ch[k]))
                                 for k in range(3, -1, -1))
        self.classifier = nn.Conv2d(ch[0], num_classes, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, (h, w) = _pad_to(images, 16)
        skips = []
        for k, stage in enumerate(self.down):
            x = stage(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.classifier(x)[..., :h, :w]


class TransUNet(nn.Module):
    """TransUNet with a pure ViT encoder (ViT-None variant) and the cascaded upsampler decoder."""

    variant = TRANSUNET_VARIANT

    def __init__(self, num_classes: int, in_channels: int = 3, dim: int = 384, depth: int = 12, heads: int = 6,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 16), patch: int = 16) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        if patch != 2 ** len(decoder_channels):
            raise ValueError("the cascaded upsampler must undo the patch size (patch = 2 ** stages)")
        self.patch = patch
        self.embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, dim, 14, 14))  # interpolated to the grid size
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.conv_more = conv_bn_relu(dim, decoder_channels[0])
        stages, cin = [], decoder_channels[0]
        for c in decoder_channels:
            stages.append(nn.Sequential(conv_bn_relu(cin, c), conv_bn_relu(c, c)))
            cin = c
        self.cup = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(decoder_channels[-1], num_classes, kernel_size=3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, (h, w) = _pad_to(images, self.patch)
        x = self.embed(x)
        gh, gw = x.shape[-2:]
        pos = F.interpolate(self.pos, size=(gh, gw), mode="bicubic", align_corners=False)
        tokens = (x + pos).flatten(2).transpose(1, 2)
        tokens = self.norm(self.blocks(tokens))
        x = self.conv_more(tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
        for stage in self.cup:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.classifier(x)[..., :h, :w]


def build_scratch(name: str, num_classes: int, *, unet_width: int = 64, vit_dim: int = 384, vit_depth: int = 12,
                  vit_heads: int = 6) -> nn.Module:
    if name == "unet_scratch":
        return UNet(num_classes, width=unet_width)
    if name == "transunet_scratch":
        return TransUNet(num_classes, dim=vit_dim, depth=vit_depth, heads=vit_heads)
    raise ValueError(f"unknown scratch model {name!r}; allowed: {', '.join(SCRATCH_MODELS)}")
