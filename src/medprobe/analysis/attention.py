"""Last-layer CLS-to-patch self-attention per head (RAD-DINO Figure C.3, DINO's attention maps).

The attention matrix comes from :meth:`Backbone.attention` (each family knows how to form it:
timm and open_clip recompute it from the last block's input and q/k projections, transformers
models run one eager forward pass).

Each map is the CLS row of the softmax attention restricted to the patch tokens and
renormalised to sum to 1 (attention to the CLS token itself and to register tokens is
dropped; the share it took is reported as ``patch_mass``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medprobe.analysis.images import (ImageSet, device_of, ensure_dir, overlay, prepare, short_names, show_image,
                                      write_caption)
from medprobe.backbones.base import Backbone
from medprobe.errors import ConfigError


@dataclass
class AttentionResult:
    """``maps`` (N, heads, h, w): CLS-to-patch attention per head, each summing to 1 over patches;
    ``patch_mass`` (N, heads): the share of the CLS token's attention that went to patch tokens."""

    maps: np.ndarray
    patch_mass: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """Head-averaged maps (N, h, w)."""
        return self.maps.mean(axis=1)


def check_attention_support(backbone: Backbone) -> None:
    """:class:`ConfigError` for backbones without CLS self-attention (CNNs, SAM)."""
    if not backbone.is_vit or not backbone.patch_size:
        raise ConfigError(f"attention maps need a vision transformer; {backbone.name} is a CNN and has no "
                          f"self-attention. Choose a ViT backbone (e.g. dinov2_vits14, rad_dino, deit_s16)")
    if not backbone.has_cls_token or getattr(backbone, "is_sam", False):
        raise ConfigError(f"CLS attention maps need a ViT with a CLS token; {backbone.name} has none "
                          f"(its windowed encoder has no class token)")


@torch.no_grad()
def last_layer_attention(backbone: Backbone, inputs: torch.Tensor) -> torch.Tensor:
    """Full softmax attention (B, heads, N, N) of the last block, over all tokens (prefix first)."""
    check_attention_support(backbone)
    return backbone.attention(inputs.to(device_of(backbone))).float().cpu()


@torch.no_grad()
def cls_attention(backbone: Backbone, inputs: torch.Tensor, batch_size: int = 16) -> AttentionResult:
    """CLS-to-patch attention maps of the last block for normalised images (B, 3, S, S)."""
    check_attention_support(backbone)
    p = backbone.patch_size
    h, w = inputs.shape[-2] // p, inputs.shape[-1] // p
    maps, mass = [], []
    for s in range(0, len(inputs), batch_size):
        att = last_layer_attention(backbone, inputs[s:s + batch_size])
        prefix = att.shape[-1] - h * w
        if prefix < 1:
            raise ConfigError(f"{backbone.name}: attention has {att.shape[-1]} tokens for a {h}x{w} patch grid")
        row = att[:, :, 0, prefix:]  # CLS query -> patch keys
        total = row.sum(dim=-1, keepdim=True)
        maps.append((row / total.clamp_min(1e-12)).reshape(att.shape[0], att.shape[1], h, w))
        mass.append(total[..., 0])
    return AttentionResult(torch.cat(maps).numpy(), torch.cat(mass).numpy())


def attention_maps(backbone: Backbone, images: ImageSet, *, image_size: int | None = None, batch_size: int = 16
                   ) -> tuple[AttentionResult, np.ndarray]:
    """Preprocess ``images`` and return (attention result, display images)."""
    check_attention_support(backbone)
    prep = prepare(backbone, images, image_size)
    return cls_attention(backbone, prep.inputs, batch_size), prep.display


def plot_attention(result: AttentionResult, display: np.ndarray, names: list[str], path: Path, *, title: str = "",
                   max_heads: int = 12) -> Path:
    """One row per image: the image, the head mean, then each head (up to ``max_heads``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, heads = result.maps.shape[:2]
    shown = min(heads, max_heads)
    cols = 2 + shown
    fig, axes = plt.subplots(n, cols, figsize=(1.45 * cols, 1.55 * n + 0.5), squeeze=False)
    for i, name in enumerate(short_names(names, 22)):
        show_image(axes[i, 0], display[i], name)
        overlay(axes[i, 1], display[i], result.mean[i], title="mean of heads" if i == 0 else None, alpha=0.6)
        for j in range(shown):
            overlay(axes[i, 2 + j], display[i], result.maps[i, j], title=f"head {j}" if i == 0 else None, alpha=0.6)
    more = f" (first {shown} of {heads} heads)" if shown < heads else ""
    fig.suptitle(f"{title}\nlast-layer CLS-to-patch attention{more}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_attention(result: AttentionResult, display: np.ndarray, names: list[str], out_dir: str | Path, *,
                    title: str = "", stem: str = "attention") -> dict[str, Path]:
    """Write ``<stem>.png``, ``<stem>.npy`` (N, heads, h, w) and ``<stem>_patch_mass.csv``."""
    import pandas as pd
    out = ensure_dir(out_dir)
    files = {"png": plot_attention(result, display, names, out / f"{stem}.png", title=title),
             "npy": out / f"{stem}.npy", "csv": out / f"{stem}_patch_mass.csv"}
    np.save(files["npy"], result.maps.astype(np.float32))
    n, heads = result.patch_mass.shape
    pd.DataFrame({"image": np.repeat(names, heads), "head": np.tile(np.arange(heads), n),
                  "patch_mass": result.patch_mass.reshape(-1)}).to_csv(files["csv"], index=False)
    files["caption"] = write_caption(files["png"], title or "CLS attention maps",
                                     f"Last-layer CLS-to-patch attention of {heads} heads and their mean over "
                                     f"{n} images (each map sums to 1 over patches).", images=names)
    return files
