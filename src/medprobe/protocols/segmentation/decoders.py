"""Segmentation heads on frozen patch grids: ``linear``, ``unet``, ``upernet``, ``vitdet``.

Every decoder takes a list of patch grids ``[(B, D_i, h_i, w_i), ...]`` (one per requested
transformer block, oldest first; single-block decoders use the last one) and the output
size ``(H, W)``, and returns logits ``(B, C, H, W)``. Grids need not be square and any patch
size works: every resampling step goes to an explicit size.

* ``linear`` — a 1x1 convolution on the last block's grid, bilinear upsampling (the
  linear-decoder baseline of the DINOv2-for-radiology study and RAD-DINO; (D + 1) x C
  parameters).
* ``unet`` — four decoder blocks (3x3 conv, batch norm, ReLU). Block k works at 2^k times the
  grid resolution and is fed the previous block's output (upsampled 2x) concatenated with a
  skip from one of four transformer blocks (deepest block first), projected by a 1x1 conv and
  brought to that resolution by a learned transposed convolution; a 1x1 classifier and a
  bilinear resize to the input size follow (the hierarchical decoder of the DINOv2-for-radiology
  study).
* ``upernet`` — four blocks reshaped to four scales (4x, 2x by transposed convolutions, 1x,
  0.5x by max pooling), a pyramid pooling module on the coarsest scale and an FPN top-down
  path, fused at the finest scale (UPerNet, Xiao et al. 2018, as used in RAD-DINO).
* ``vitdet`` — the simple feature pyramid of ViTDet (Li et al. 2022) built from the last block
  only (4x, 2x by transposed convolutions, 1x, 0.5x by pooling) and a light head: levels
  summed at the finest scale, one 3x3 conv-BN-ReLU, a 1x1 classifier.

Widths. ``width`` is the channel count of the unet/upernet/vitdet decoders, or ``"paper"``:
the width that gives the trainable-parameter count the studies report, as a fraction of the
feature dimension D of the backbone (:data:`PAPER_WIDTHS`, rounded to a multiple of 8). The
fractions were fitted to the published counts at the published feature dimensions: U-Net 17M
on ViT-L/14 (D = 1024) in the DINOv2-radiology Table 6 (which also gives 38M on ViT-g/14,
D = 1536: the same fraction reproduces it), UPerNet 39.3M and ViTDet 24.8M on RAD-DINO's
4 x 768 features (RAD-DINO Table 3). Their architectures are not published in full, so the
match is in size, not layer by layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medprobe.errors import ConfigError

FROZEN_DECODERS: tuple[str, ...] = ("linear", "unet", "upernet", "vitdet")
MULTI_BLOCK: tuple[str, ...] = ("unet", "upernet")  # decoders fed by four blocks; the others use the last one


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _upsampler(channels: int, factor: int) -> nn.Module:
    """Learned upsampling by ``factor`` (a power of two): one transposed conv, kernel = stride = factor."""
    if factor == 1:
        return nn.Identity()
    return nn.ConvTranspose2d(channels, channels, kernel_size=factor, stride=factor)


class LinearDecoder(nn.Module):
    """1x1 convolution on the last block's patch grid, bilinear upsampling to the input size."""

    def __init__(self, dims: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(int(dims[-1]), num_classes, kernel_size=1)

    def forward(self, grids: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        return _resize(self.classifier(grids[-1]), out_size)


class UNetDecoder(nn.Module):
    """Hierarchical decoder: four conv-BN-ReLU blocks with skips from four transformer blocks."""

    def __init__(self, dims: Sequence[int], num_classes: int, width: int = 128) -> None:
        super().__init__()
        if len(dims) != 4:
            raise ConfigError(f"the unet decoder needs 4 blocks, got {len(dims)}")
        ch = [max(8, width // 2 ** k) for k in range(4)]
        self.channels = ch
        # stage k (k = 0 coarsest) takes the skip from block 3 - k, at 2^k x the grid resolution
        self.skips = nn.ModuleList(
            nn.Sequential(nn.Conv2d(int(dims[3 - k]), ch[k], kernel_size=1), _upsampler(ch[k], 2 ** k))
            for k in range(4))
        self.blocks = nn.ModuleList(conv_bn_relu(ch[k] + (ch[k - 1] if k else 0), ch[k]) for k in range(4))
        self.classifier = nn.Conv2d(ch[3], num_classes, kernel_size=1)

    def forward(self, grids: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        h, w = grids[-1].shape[-2:]
        x: torch.Tensor | None = None
        for k in range(4):
            size = (h * 2 ** k, w * 2 ** k)
            skip = _resize(self.skips[k](grids[3 - k]), size)
            x = skip if x is None else torch.cat([_resize(x, size), skip], dim=1)
            x = self.blocks[k](x)
        assert x is not None
        return _resize(self.classifier(x), out_size)


def _rescale_ops(cin: int, cout: int) -> nn.ModuleList:
    """ViT single-scale grid -> scales 4x, 2x, 1x, 0.5x (each ends with ``cout`` channels)."""
    mid = max(cout, cin // 2)
    return nn.ModuleList([
        nn.Sequential(nn.ConvTranspose2d(cin, mid, 2, stride=2), nn.BatchNorm2d(mid), nn.GELU(),
                      nn.ConvTranspose2d(mid, cout, 2, stride=2)),
        nn.ConvTranspose2d(cin, cout, 2, stride=2),
        nn.Conv2d(cin, cout, kernel_size=1),
        nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(cin, cout, kernel_size=1)),
    ])


def _scale_sizes(h: int, w: int) -> list[tuple[int, int]]:
    return [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (max(1, (h + 1) // 2), max(1, (w + 1) // 2))]


class UPerNetDecoder(nn.Module):
    """Four blocks at four scales, pyramid pooling on the coarsest, FPN top-down, fused at the finest."""

    def __init__(self, dims: Sequence[int], num_classes: int, width: int = 128,
                 pool_scales: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        if len(dims) != 4:
            raise ConfigError(f"the upernet decoder needs 4 blocks, got {len(dims)}")
        # neck: block i -> scale i (4x, 2x, 1x, 0.5x), width channels
        self.neck = nn.ModuleList(
            nn.Sequential(nn.Conv2d(int(d), width, kernel_size=1), op)
            for d, op in zip(dims, _rescale_ops(width, width)))
        self.pool_scales = tuple(int(s) for s in pool_scales)
        # pooled branches have no batch norm: a 1x1 map of a batch of one has no statistics
        self.ppm = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(inplace=True))
                                 for _ in self.pool_scales)
        self.bottleneck = conv_bn_relu(width * (1 + len(self.pool_scales)), width)
        self.laterals = nn.ModuleList(conv_bn_relu(width, width, k=1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(width, width) for _ in range(3))
        self.fuse = conv_bn_relu(4 * width, width)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, grids: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        sizes = _scale_sizes(*grids[-1].shape[-2:])
        feats = [_resize(op(g), s) for op, g, s in zip(self.neck, grids, sizes)]
        top = feats[3]
        pooled = [_resize(branch(F.adaptive_avg_pool2d(top, s)), top.shape[-2:])
                  for s, branch in zip(self.pool_scales, self.ppm)]
        levels = [lat(f) for lat, f in zip(self.laterals, feats[:3])] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(2, -1, -1):  # top-down
            levels[i] = levels[i] + _resize(levels[i + 1], levels[i].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, levels[:3])] + [levels[3]]
        fine = outs[0].shape[-2:]
        x = self.fuse(torch.cat([_resize(o, fine) for o in outs], dim=1))
        return _resize(self.classifier(x), out_size)


class ViTDetDecoder(nn.Module):
    """ViTDet simple feature pyramid from the last block + a light fusion head."""

    def __init__(self, dims: Sequence[int], num_classes: int, width: int = 128) -> None:
        super().__init__()
        d = int(dims[-1])
        half, quarter = max(8, d // 2), max(8, d // 4)
        self.pyramid = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, half, 2, stride=2), nn.BatchNorm2d(half), nn.GELU(),
                          nn.ConvTranspose2d(half, quarter, 2, stride=2)),
            nn.ConvTranspose2d(d, half, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2, ceil_mode=True),
        ])
        ins = [quarter, half, d, d]
        self.outputs = nn.ModuleList(nn.Sequential(conv_bn_relu(c, width, k=1), conv_bn_relu(width, width))
                                     for c in ins)
        self.head = conv_bn_relu(width, width)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def forward(self, grids: Sequence[torch.Tensor], out_size: Sequence[int]) -> torch.Tensor:
        g = grids[-1]
        sizes = _scale_sizes(*g.shape[-2:])
        feats = [out(_resize(op(g), s)) for op, out, s in zip(self.pyramid, self.outputs, sizes)]
        fine = feats[0].shape[-2:]
        x = sum(_resize(f, fine) for f in feats)
        return _resize(self.classifier(self.head(x)), out_size)


@dataclass(frozen=True)
class PaperWidth:
    """A decoder width as a fraction of the feature dimension, fitted to a published parameter count."""

    fraction: float
    source: str
    params: float  # the published trainable-parameter count
    dim: int  # the feature dimension it was published for
    num_classes: int  # output classes of the published count

    def width(self, dim: int) -> int:
        return max(8, 8 * round(self.fraction * dim / 8))

    def describe(self) -> str:
        return f"paper: {self.fraction} x feature dim, multiple of 8 ({self.source}: {self.params / 1e6:.1f}M at D={self.dim})"


PAPER_WIDTHS: dict[str, PaperWidth] = {
    "unet": PaperWidth(0.836, "DINOv2-radiology Table 6, ViT-L/14 (38M on ViT-g/14)", 17e6, 1024, 1),
    "upernet": PaperWidth(0.708, "RAD-DINO Table 3, 4x768 features", 39.3e6, 768, 2),
    "vitdet": PaperWidth(0.885, "RAD-DINO Table 3, 4x768 features", 24.8e6, 768, 2),
}


def resolve_width(name: str, width: int | str, dims: Sequence[int]) -> int:
    """The channel width of decoder ``name``: ``width`` itself, or the ``"paper"`` width for these feature dims."""
    if isinstance(width, int):
        return width
    if width != "paper":
        raise ConfigError(f"width: a number of channels or 'paper', got {width!r}")
    if name not in PAPER_WIDTHS:
        return 128  # a decoder without a width (linear) or without a published count
    return PAPER_WIDTHS[name].width(int(dims[-1]))


def width_identity(name: str, width: int | str) -> int | str:
    """What ``width`` means for decoder ``name``, for unit identities: the number, or the paper rule."""
    if width == "paper" and name in PAPER_WIDTHS:
        return PAPER_WIDTHS[name].describe()
    return width


def build_decoder(name: str, dims: Sequence[int], num_classes: int, width: int | str = 128) -> nn.Module:
    """A frozen-backbone decoder by name; ``dims`` are the channel widths of its input grids."""
    width = resolve_width(name, width, dims)
    if name == "linear":
        return LinearDecoder(dims, num_classes)
    if name == "unet":
        return UNetDecoder(dims, num_classes, width)
    if name == "upernet":
        return UPerNetDecoder(dims, num_classes, width)
    if name == "vitdet":
        return ViTDetDecoder(dims, num_classes, width)
    raise ConfigError(f"unknown frozen decoder {name!r}; allowed: {', '.join(FROZEN_DECODERS)}")


def count_trainable(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad))
