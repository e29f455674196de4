"""PCA of patch tokens fitted jointly over a set of images (DINOv2 Figure 1 / seed study Figure 2).

The recipe: (1) fit one PCA on the patch tokens of *all* images together and threshold its
first component to separate foreground from background; (2) fit a second PCA on the
foreground patches of all images together; (3) show its first three components as RGB,
each component min-max scaled over all images at once. Fitting per image (the common
mistake) gives every image its own basis, so equal colours would mean nothing across images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medprobe.analysis.images import (ImageSet, ensure_dir, overlay, patch_tokens, prepare, require_patch_tokens,
                                      short_names, show_image, write_caption)
from medprobe.backbones.base import Backbone
from medprobe.errors import ConfigError

Background = Literal["auto", "low", "high", "none"]


@dataclass
class Basis:
    """A fitted PCA: ``mean`` (D,), ``components`` (k, D) orthonormal rows, explained variance ratio (k,)."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components.T


def fit_pca(x: np.ndarray, k: int) -> Basis:
    """PCA of the rows of ``x`` (n, D) in float64; each component's sign makes its largest loading positive."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ConfigError(f"PCA needs at least 2 patch tokens, got {n}")
    k = min(k, d, n)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / (n - 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0, None), vecs[:, order]
    comps = vecs[:, :k].T.copy()
    flip = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps *= np.where(flip == 0, 1, flip)[:, None]
    total = vals.sum()
    return Basis(mean, comps, vals[:k] / total if total > 0 else np.zeros(k))


@dataclass
class PCAResult:
    """Joint PCA of patch tokens of N images on an h x w grid.

    ``rgb`` (N, h, w, 3) in [0, 1] (background black), ``foreground`` (N, h, w) bool,
    ``first_component`` (N, h, w): the first component of the all-patch PCA, min-max scaled
    to [0, 1] over all images and oriented so that background is low. ``basis`` is the
    foreground PCA shared by all images; ``rgb_range`` the per-component (min, max) used for
    colour scaling.
    """

    rgb: np.ndarray
    foreground: np.ndarray
    first_component: np.ndarray
    basis: Basis
    background_basis: Basis | None
    rgb_range: np.ndarray
    threshold: float
    background: str

    def project(self, tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """RGB (N, h, w, 3) of tokens (N, D, h, w) in this result's shared basis and colour scale
        (no background removal)."""
        x = _rows(tokens)
        n, _, h, w = (int(v) for v in tokens.shape)
        y = self.basis.transform(x)
        y = (y - self.rgb_range[:, 0]) / np.maximum(self.rgb_range[:, 1] - self.rgb_range[:, 0], 1e-12)
        rgb = np.zeros((len(x), 3))
        rgb[:, :y.shape[1]] = np.clip(y, 0, 1)
        return rgb.reshape(n, h, w, 3)


def _rows(tokens: np.ndarray | torch.Tensor) -> np.ndarray:
    t = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if t.ndim != 4:
        raise ConfigError(f"patch tokens must be (N, D, h, w), got shape {t.shape}")
    return np.ascontiguousarray(t.transpose(0, 2, 3, 1).reshape(-1, t.shape[1]), dtype=np.float64)


def _border(n: int, h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return np.broadcast_to(m, (n, h, w)).reshape(-1)


def pca_from_tokens(tokens: np.ndarray | torch.Tensor, *, threshold: float = 0.5, background: Background = "auto",
                    n_components: int = 3, clip_percentile: float = 1.0) -> PCAResult:
    """Joint PCA of patch tokens (N, D, h, w) of N images.

    ``background``: ``auto`` orients the first component so that the border patches (mostly
    background in medical images) are low; ``low``/``high`` say on which side of the first
    component the background lies; ``none`` keeps every patch. Patches whose scaled first
    component is <= ``threshold`` are background. Each RGB component is scaled to [0, 1]
    between its ``clip_percentile`` and ``100 - clip_percentile`` percentiles over the
    foreground patches of all images (0 = plain min-max, where a few outlying patches wash out
    the colours of all others).
    """
    if not 0.0 <= clip_percentile < 50.0:
        raise ConfigError(f"clip_percentile must be in [0, 50), got {clip_percentile}")
    if background not in ("auto", "low", "high", "none"):
        raise ConfigError(f"background must be auto, low, high or none, got {background!r}")
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"threshold must be in [0, 1) (the first component is scaled to [0, 1]), got {threshold}")
    x = _rows(tokens)
    n, _, h, w = (int(v) for v in tokens.shape)
    bg_basis = None
    if background == "none":
        pc1 = np.ones(len(x))
        fg = np.ones(len(x), dtype=bool)
    else:
        bg_basis = fit_pca(x, 1)
        s = bg_basis.transform(x)[:, 0]
        span = s.max() - s.min()
        s = (s - s.min()) / span if span > 0 else np.zeros_like(s)
        if background == "high":
            s = 1.0 - s
        elif background == "auto":
            border = _border(n, h, w)
            inner = ~border if (~border).any() else border
            if s[border].mean() > s[inner].mean():
                s = 1.0 - s
        pc1 = s
        fg = s > threshold
        if fg.sum() < 2:
            raise ConfigError(f"background removal left {int(fg.sum())} foreground patches (threshold {threshold}); "
                              f"lower --threshold or use --background none")
    basis = fit_pca(x[fg], n_components)
    y = basis.transform(x[fg])
    lo, hi = np.percentile(y, [clip_percentile, 100.0 - clip_percentile], axis=0)
    rgb = np.zeros((len(x), 3))
    rgb[fg, :y.shape[1]] = np.clip((y - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    return PCAResult(rgb=rgb.reshape(n, h, w, 3), foreground=fg.reshape(n, h, w),
                     first_component=pc1.reshape(n, h, w), basis=basis, background_basis=bg_basis,
                     rgb_range=np.stack([lo, hi], axis=1), threshold=threshold, background=background)


def patch_pca(backbone: Backbone, images: ImageSet, *, image_size: int | None = None, block: int = -1,
              threshold: float = 0.5, background: Background = "auto", clip_percentile: float = 1.0,
              batch_size: int = 16) -> tuple[PCAResult, np.ndarray]:
    """Run ``backbone`` on ``images`` and fit the joint patch PCA; returns (result, display images)."""
    require_patch_tokens(backbone, "PCA of patch tokens")
    prep = prepare(backbone, images, image_size)
    tokens = patch_tokens(backbone, prep.inputs, block=block, batch_size=batch_size)
    return pca_from_tokens(tokens, threshold=threshold, background=background,
                           clip_percentile=clip_percentile), prep.display


def plot_pca(result: PCAResult, display: np.ndarray, names: list[str], path: Path, title: str = "") -> Path:
    """Three rows per image: the input, the first component with the background threshold, the RGB overlay."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(display)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n + 0.4, 6.2), squeeze=False)
    for i, name in enumerate(short_names(names, 24)):
        show_image(axes[0, i], display[i], name)
        overlay(axes[1, i], display[i], np.where(result.foreground[i], result.first_component[i], np.nan),
                cmap="viridis", alpha=0.7, vmin=0, vmax=1)
        show_image(axes[2, i], display[i])
        s = display.shape[1]
        rgba = np.concatenate([result.rgb[i], result.foreground[i][..., None] * 0.85], axis=-1)
        axes[2, i].imshow(rgba, extent=(0, s, s, 0), interpolation="nearest")
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel(f"PC1 > {result.threshold:g}" if result.background != "none" else "all patches", fontsize=8)
    axes[2, 0].set_ylabel("PC1-3 as RGB", fontsize=8)
    ev = ", ".join(f"{v:.0%}" for v in result.basis.explained_variance_ratio)
    fig.suptitle(f"{title}\njoint PCA over {n} images; foreground PCA explains {ev}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_pca(result: PCAResult, display: np.ndarray, names: list[str], out_dir: str | Path, *,
              title: str = "", stem: str = "pca") -> dict[str, Path]:
    """Write ``<stem>.png``, ``<stem>_rgb.npy``, ``<stem>_foreground.npy``, ``<stem>_pc1.npy`` and
    ``<stem>_components.csv`` (explained variance) into ``out_dir``."""
    import pandas as pd
    out = ensure_dir(out_dir)
    files = {"png": plot_pca(result, display, names, out / f"{stem}.png", title)}
    for key, arr in (("rgb", result.rgb.astype(np.float32)), ("foreground", result.foreground),
                     ("pc1", result.first_component.astype(np.float32))):
        files[key] = out / f"{stem}_{key}.npy"
        np.save(files[key], arr)
    files["csv"] = out / f"{stem}_components.csv"
    pd.DataFrame({"component": np.arange(1, len(result.basis.explained_variance_ratio) + 1),
                  "explained_variance_ratio_foreground": result.basis.explained_variance_ratio}
                 ).to_csv(files["csv"], index=False)
    fg = float(result.foreground.mean())
    files["caption"] = write_caption(files["png"], title or "PCA of patch tokens",
                                     f"Joint PCA over {len(names)} images ({fg:.0%} of patches kept as foreground); "
                                     "first three components as RGB.", images=names)
    return files
