"""Trainable models: an encoder (backbone features or an appended DeiT) + slice pooling + a linear head.

* :class:`BackboneEncoder` — the backbone's CLS (or pooled) token, optionally with the mean
  patch token appended.
* :class:`AppendedDeiT` — the foundation's patch tokens projected into a DeiT whose patch
  embedding is bypassed; the DeiT's CLS token is the feature (the WACV "appended classifier").
* :class:`SlicePooling` — volumes: slice features pooled per volume (mean, max or gated
  attention) with segment operations, so volumes of different depth need no padding.
* :class:`Classifier` — encoder + pooling + head; its ``forward`` takes a :class:`Batch`.
* :func:`small_input_stem` — CIFAR-style stems for CNNs trained from scratch on tiny images.
* :func:`layer_ids` — which block each backbone parameter belongs to (freezing, layer decay).
"""
from __future__ import annotations

from typing import Literal

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from medprobe.backbones.base import Backbone
from medprobe.errors import ConfigError
from medprobe.protocols.adapt.data import Batch

HeadInput = Literal["cls", "cls+mean"]
PoolingKind = Literal["mean", "max", "attention"]


# --------------------------------------------------------------------------- encoders
class BackboneEncoder(nn.Module):
    """Images (N, 3, S, S) -> features (N, F) from the backbone's last block."""

    def __init__(self, backbone: Backbone, head_input: HeadInput = "cls") -> None:
        super().__init__()
        self.backbone = backbone
        self.head_input = head_input
        self.out_dim = backbone.embed_dim * (2 if head_input == "cls+mean" else 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_tokens(images)
        return torch.cat([out.cls, out.mean_patch], dim=1) if self.head_input == "cls+mean" else out.cls


class AppendedDeiT(nn.Module):
    """Foundation patch tokens -> linear projection -> DeiT blocks (no patch embedding) -> DeiT CLS token.

    ``deit`` is a timm ViT backbone (e.g. ``deit_b16``); its patch embedding is removed and its
    position embedding is resampled to the foundation's token grid.
    """

    def __init__(self, backbone: Backbone, deit: Backbone) -> None:
        super().__init__()
        vit = deit.model
        if not all(hasattr(vit, a) for a in ("blocks", "cls_token", "pos_embed", "norm", "patch_embed")):
            raise ConfigError(f"appended classifier {deit.name!r} is not a timm ViT with a class token; "
                              "use deit_s16 or deit_b16")
        self.backbone = backbone
        self.proj = nn.Linear(backbone.embed_dim, deit.embed_dim)
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.grid = tuple(vit.patch_embed.grid_size)
        self.prefix = int(getattr(vit, "num_prefix_tokens", 1))
        self.no_embed_class = bool(getattr(vit, "no_embed_class", False))
        self.norm_pre, self.blocks, self.norm = vit.norm_pre, vit.blocks, vit.norm
        self.out_dim = deit.embed_dim
        self.classifier_name = deit.name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.backbone.forward_tokens(images).patch_grid  # (N, D, h, w)
        n, _, h, w = grid.shape
        x = self.proj(grid.flatten(2).transpose(1, 2))  # (N, h*w, D_deit)
        pos = resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.grid,
                                     num_prefix_tokens=0 if self.no_embed_class else self.prefix)
        cls = self.cls_token.expand(n, -1, -1)
        if self.no_embed_class:
            x = torch.cat([cls, x + pos], dim=1)
        else:
            x = torch.cat([cls, x], dim=1) + pos
        x = self.norm(self.blocks(self.norm_pre(x)))
        return x[:, 0]


# --------------------------------------------------------------------------- pooling of slices
def _segment_max(x: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.full((n, *x.shape[1:]), float("-inf"), dtype=x.dtype, device=x.device)
    index = owners.view(-1, *([1] * (x.dim() - 1))).expand_as(x)
    return out.scatter_reduce(0, index, x, reduce="amax", include_self=True)


def _segment_sum(x: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add(0, owners, x)


class SlicePooling(nn.Module):
    """Slice features (N_slices, F) + owners (N_slices,) -> volume features (B, F).

    ``mean`` and ``max`` have no parameters; ``attention`` is gated attention-based MIL pooling
    (Ilse et al. 2018): weights softmax-normalised over the slices of each volume only.
    """

    def __init__(self, kind: PoolingKind, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.kind = kind
        if kind == "attention":
            self.value = nn.Linear(dim, hidden)
            self.gate = nn.Linear(dim, hidden)
            self.score = nn.Linear(hidden, 1)

    def weights(self, x: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
        """Attention weight of every slice (sums to 1 within each volume)."""
        a = self.score(torch.tanh(self.value(x)) * torch.sigmoid(self.gate(x))).squeeze(1).float()
        a = a - _segment_max(a.detach(), owners, n)[owners]
        e = a.exp()
        return e / _segment_sum(e, owners, n)[owners]

    def forward(self, x: torch.Tensor, owners: torch.Tensor, n: int) -> torch.Tensor:
        if self.kind == "max":
            return _segment_max(x, owners, n)
        if self.kind == "mean":
            counts = torch.bincount(owners, minlength=n).clamp(min=1).to(x.dtype)
            return _segment_sum(x, owners, n) / counts[:, None]
        if self.kind == "attention":
            w = self.weights(x, owners, n)
            return _segment_sum(x.float() * w[:, None], owners, n)
        raise ConfigError(f"unknown pooling {self.kind!r}; allowed: mean, max, attention")


# --------------------------------------------------------------------------- classifier
class Classifier(nn.Module):
    """``encoder`` features (pooled per volume for 3D batches) -> linear head -> logits.

    ``encoder`` may be None when the inputs are features already (cached slice embeddings).
    Slices are encoded in chunks of ``slice_batch`` (never one at a time).
    """

    def __init__(self, encoder: nn.Module | None, in_dim: int, num_outputs: int, *,
                 pooling: PoolingKind = "mean", slice_batch: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = SlicePooling(pooling, in_dim)
        self.head = nn.Linear(in_dim, num_outputs)
        self.slice_batch = max(1, int(slice_batch))

    @property
    def backbone(self) -> Backbone | None:
        """The (pre-trained) backbone, whose weights get ``backbone_lr`` and layer-wise decay."""
        return getattr(self.encoder, "backbone", None)

    def encode(self, x: torch.Tensor, chunked: bool) -> torch.Tensor:
        if self.encoder is None:
            return x
        if not chunked or x.shape[0] <= self.slice_batch:
            return self.encoder(x)
        return torch.cat([self.encoder(x[i:i + self.slice_batch]) for i in range(0, x.shape[0], self.slice_batch)])

    def forward(self, batch: Batch) -> torch.Tensor:
        feats = self.encode(batch.inputs, chunked=batch.owners is not None)
        if batch.owners is not None:
            feats = self.pool(feats.float(), batch.owners, batch.size)
        return self.head(feats)


# --------------------------------------------------------------------------- parameter bookkeeping
def layer_ids(backbone: Backbone) -> dict[str, int]:
    """Parameter name (as in ``backbone.named_parameters()``) -> layer id.

    0 = embeddings/stem (before the first block), ``i + 1`` = block ``i`` (parameters between
    blocks, e.g. DenseNet transitions, belong to the preceding block), ``L + 1`` = after the
    last block (final norm). Blocks are :meth:`Backbone.block_modules`.
    """
    blocks = backbone.block_modules()
    prefixes: dict[str, int] = {}
    index = {id(m): i for i, m in enumerate(blocks)}
    for name, module in backbone.named_modules():
        if id(module) in index and name:
            prefixes.setdefault(name, index[id(module)])
    ids: dict[str, int] = {}
    seen_block = -1
    last = len(blocks) - 1
    for name, _ in backbone.named_parameters():
        block = None
        for prefix, i in prefixes.items():
            if name.startswith(prefix + "."):
                block = i if block is None else max(block, i)
        if block is not None:
            seen_block = max(seen_block, block)
            ids[name] = block + 1
        elif seen_block < 0:
            ids[name] = 0
        else:
            ids[name] = seen_block + 1 if seen_block < last else len(blocks) + 1
    return ids


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (shared parameters counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total


# --------------------------------------------------------------------------- scratch CNN stems
def small_input_stem(backbone: Backbone) -> str | None:
    """Adapt a CNN to tiny inputs (e.g. 28 px MedMNIST) as CIFAR-style networks do.

    ResNet: 3x3 stride-1 first convolution, no max-pool. DenseNet: the same for ``conv0`` /
    ``pool0``. VGG: the first two max-pools removed. Returns what was changed (None for ViTs,
    whose patch size is set with backbone ``overrides`` instead).
    """
    m = backbone.model
    if backbone.is_vit:
        return None
    if hasattr(m, "conv1") and hasattr(m, "maxpool"):
        old = m.conv1
        m.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=old.bias is not None)
        m.maxpool = nn.Identity()
        return "conv1 3x3 stride 1, max-pool removed"
    features = getattr(m, "features", None)
    if features is not None and hasattr(features, "conv0"):
        old = features.conv0
        features.conv0 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=old.bias is not None)
        if hasattr(features, "pool0"):
            features.pool0 = nn.Identity()
        return "conv0 3x3 stride 1, pool0 removed"
    if isinstance(features, nn.Sequential):
        pools = [i for i, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)]
        for i in pools[:2]:
            features[i] = nn.Identity()
        return f"max-pools {pools[:2]} removed"
    return None
