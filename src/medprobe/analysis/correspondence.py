"""Patch correspondences between images (RAD-DINO Figure 2 and C.4): for a query point on one
image, the cosine similarity of its patch token to every patch token of other images.

Query points are given in native pixel coordinates of the query image (x = column,
y = row) or as fractions of its width/height, and mapped through the backbone's resize/crop
to the patch that contains them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medprobe.analysis.images import (ImageSet, ensure_dir, overlay, patch_tokens, prepare, require_patch_tokens,
                                      short_names, show_image, write_caption)
from medprobe.backbones.base import Backbone
from medprobe.errors import ConfigError


@dataclass
class CorrespondenceResult:
    """``similarity`` (points, targets, h, w): cosine similarity of each query patch to every target
    patch; ``query_patches`` (points, 2) as (row, col); ``query_xy`` (points, 2) in model-input pixels;
    ``best`` (points, targets, 2) the (row, col) of the most similar target patch."""

    similarity: np.ndarray
    query_patches: np.ndarray
    query_xy: np.ndarray
    best: np.ndarray
    patch_size: int

    @property
    def best_similarity(self) -> np.ndarray:
        p, t = self.similarity.shape[:2]
        flat = self.similarity.reshape(p, t, -1)
        return flat.max(axis=-1)


def point_to_patch(point: tuple[float, float], geometry: dict[str, float], image_size: int, patch: int,
                   fraction: bool = False) -> tuple[tuple[int, int], tuple[float, float]]:
    """Map a native (x, y) point (or fractions of width/height) to ((row, col) patch, (x, y) input pixels)."""
    x, y = float(point[0]), float(point[1])
    w, h = geometry["w"], geometry["h"]
    if fraction:
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise ConfigError(f"fractional query point {point} must lie in [0, 1] x [0, 1]")
        x, y = min(x * w, w - 0.5), min(y * h, h - 0.5)
    elif not (0 <= x < w and 0 <= y < h):
        raise ConfigError(f"query point (x={x:g}, y={y:g}) lies outside the query image of width {w:g} and "
                          f"height {h:g} (x is the column, y the row)")
    xi = (x + 0.5) * geometry["sx"] - geometry["left"]
    yi = (y + 0.5) * geometry["sy"] - geometry["top"]
    if not (0 <= xi < image_size and 0 <= yi < image_size):
        raise ConfigError(f"query point (x={x:g}, y={y:g}) falls outside the centre crop the model sees; pick a "
                          f"point nearer the image centre")
    return (int(yi // patch), int(xi // patch)), (xi, yi)


def similarity_maps(query_tokens: torch.Tensor, target_tokens: torch.Tensor,
                    patches: Sequence[tuple[int, int]]) -> np.ndarray:
    """Cosine similarity (points, targets, h, w) of query patches of ``query_tokens`` (D, h, w) to every
    patch of ``target_tokens`` (T, D, h', w')."""
    q = torch.stack([query_tokens[:, r, c] for r, c in patches]).double()  # (P, D)
    t = target_tokens.double()
    sims = torch.einsum("pd,tdhw->pthw", F.normalize(q, dim=1), F.normalize(t, dim=1))
    return sims.float().numpy()


def patch_correspondence(backbone: Backbone, images: ImageSet, points: Sequence[tuple[float, float]], *,
                         image_size: int | None = None, block: int = -1, fraction: bool = False,
                         batch_size: int = 16) -> tuple[CorrespondenceResult, np.ndarray]:
    """Similarity of the query image's (``images[0]``) patches at ``points`` to every patch of each
    other image (``images[1:]``; with a single image, to itself). Returns (result, display images)."""
    require_patch_tokens(backbone, "patch correspondence")
    if not points:
        raise ConfigError("give at least one query point, e.g. --point 14,10 (x = column, y = row in pixels)")
    prep = prepare(backbone, images, image_size)
    tokens = patch_tokens(backbone, prep.inputs, block=block, batch_size=batch_size)
    patch = int(backbone.patch_size)
    mapped = [point_to_patch(pt, prep.geometry[0], prep.image_size, patch, fraction) for pt in points]
    patches = [m[0] for m in mapped]
    targets = tokens[1:] if len(images) > 1 else tokens[:1]
    sims = similarity_maps(tokens[0], targets, patches)
    p, t, h, w = sims.shape
    flat = sims.reshape(p, t, -1).argmax(axis=-1)
    best = np.stack([flat // w, flat % w], axis=-1)
    result = CorrespondenceResult(sims, np.array(patches), np.array([m[1] for m in mapped]), best, patch)
    return result, prep.display


_COLOURS = ("#ffd700", "#00e5ff", "#ff4fd8", "#7cff4f", "#ff8c00", "#ffffff")


def plot_correspondence(result: CorrespondenceResult, display: np.ndarray, names: list[str], path: Path, *,
                        title: str = "") -> Path:
    """One row per query point: the query image with the point, then each target's similarity heat map
    with its best match."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p, t = result.similarity.shape[:2]
    targets = display[1:] if len(display) > 1 else display[:1]
    tnames = short_names(names[1:] if len(names) > 1 else names[:1], 22)
    fig, axes = plt.subplots(p, 1 + t, figsize=(2.2 * (1 + t) + 0.6, 2.3 * p + 0.5), squeeze=False,
                             layout="constrained")
    ps = result.patch_size
    for i in range(p):
        colour = _COLOURS[i % len(_COLOURS)]
        show_image(axes[i, 0], display[0], short_names(names[:1], 22)[0] + " (query)" if i == 0 else None)
        qx, qy = result.query_xy[i]
        axes[i, 0].scatter([qx], [qy], s=70, facecolors="none", edgecolors=colour, linewidths=2)
        lo, hi = float(result.similarity[i].min()), float(result.similarity[i].max())  # one scale per row
        for j in range(t):
            art = overlay(axes[i, 1 + j], targets[j], result.similarity[i, j], cmap="inferno", alpha=0.6,
                          vmin=lo, vmax=hi, title=tnames[j] if i == 0 else None)
            r, c = result.best[i, j]
            axes[i, 1 + j].scatter([(c + 0.5) * ps], [(r + 0.5) * ps], s=60, marker="x", c=colour, linewidths=2)
        fig.colorbar(art, ax=list(axes[i, 1:]), fraction=0.046, label="cosine")
    fig.suptitle(f"{title}\nquery patch (circle) vs every target patch; x = best match", fontsize=8)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_correspondence(result: CorrespondenceResult, display: np.ndarray, names: list[str], out_dir: str | Path,
                         points: Sequence[tuple[float, float]], *, title: str = "",
                         stem: str = "correspondence") -> dict[str, Path]:
    """Write ``<stem>.png``, ``<stem>.npy`` (points, targets, h, w) and ``<stem>.csv`` (best matches)."""
    import pandas as pd
    out = ensure_dir(out_dir)
    files = {"png": plot_correspondence(result, display, names, out / f"{stem}.png", title=title),
             "npy": out / f"{stem}.npy", "csv": out / f"{stem}.csv"}
    np.save(files["npy"], result.similarity.astype(np.float32))
    tnames = names[1:] if len(names) > 1 else names[:1]
    rows = []
    for i, pt in enumerate(points):
        for j, tn in enumerate(tnames):
            rows.append({"point": i, "query_x": pt[0], "query_y": pt[1], "query_row": int(result.query_patches[i, 0]),
                         "query_col": int(result.query_patches[i, 1]), "target": tn,
                         "best_row": int(result.best[i, j, 0]), "best_col": int(result.best[i, j, 1]),
                         "best_similarity": float(result.best_similarity[i, j]),
                         "similarity_at_query_patch": float(result.similarity[i, j, result.query_patches[i, 0],
                                                                              result.query_patches[i, 1]])})
    pd.DataFrame(rows).to_csv(files["csv"], index=False)
    files["caption"] = write_caption(files["png"], title or "Patch correspondence",
                                     f"Cosine similarity of {len(points)} query patch(es) of {names[0]} to every patch "
                                     f"of {len(tnames)} target image(s).", images=names,
                                     points=[list(p) for p in points])
    return files
