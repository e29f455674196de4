"""PNG overlays of ground truth vs prediction, every decoder side by side (matplotlib Agg).

Each unit saves the predictions of a few fixed test cases under
``<output_dir>/plots/.segmentation/<dataset>__<backbone>/`` and then redraws one PNG per
case, ``<output_dir>/plots/segmentation_<dataset>_<backbone>_<case>.png``, with a column for
the image, the ground truth and every decoder saved so far (lowest seed, full training set).
Files on disk (not memory) hold the predictions, so a resumed run still draws all decoders.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medprobe.fsutil import atomic_write, slug


@dataclass
class CasePicture:
    """One test case as drawn: a 2D image (or the most-foreground slice of a volume)."""

    key: str
    image: np.ndarray  # (H, W) native intensities
    truth: np.ndarray  # (H, W) labels
    pred: np.ndarray  # (H, W) labels



def save_cases(folder: Path, variant: str, seed: int, cases: Sequence[CasePicture]) -> Path:
    """Store one unit's overlay cases (image, truth, prediction) for :func:`draw`."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for k, c in enumerate(cases):
        arrays[f"image{k}"] = c.image.astype(np.float32)
        arrays[f"truth{k}"] = c.truth.astype(np.int16)
        arrays[f"pred{k}"] = c.pred.astype(np.int16)
    meta = {"variant": variant, "seed": int(seed), "keys": [c.key for c in cases]}
    path = folder / f"{slug(variant)}__seed{int(seed)}.npz"
    return atomic_write(path, lambda fh: np.savez_compressed(fh, meta=np.asarray(json.dumps(meta)), **arrays))


def _load(folder: Path) -> dict[str, dict]:
    """variant -> saved cases of its lowest seed."""
    best: dict[str, dict] = {}
    for f in sorted(folder.glob("*.npz")):
        if f.name.endswith(".tmp.npz"):
            continue
        with np.load(f) as z:
            meta = json.loads(str(z["meta"]))
            if meta["variant"] in best and best[meta["variant"]]["seed"] <= meta["seed"]:
                continue
            cases = {key: CasePicture(key, z[f"image{k}"], z[f"truth{k}"], z[f"pred{k}"])
                     for k, key in enumerate(meta["keys"])}
        best[meta["variant"]] = {"seed": meta["seed"], "cases": cases}
    return best


def _overlay(image: np.ndarray, labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    gray = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    fg = labels > 0
    if fg.any():
        col = colors[np.clip(labels[fg] - 1, 0, len(colors) - 1)]
        rgb[fg] = 0.45 * rgb[fg] + 0.55 * col
    return rgb


def _dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        if p.any() or t.any():
            scores.append(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return float(np.mean(scores)) if scores else float("nan")


def draw(folder: Path, plots_dir: Path, prefix: str, class_names: Sequence[str],
         order: Sequence[str] = ()) -> list[Path]:
    """Redraw one PNG per saved case with all variants side by side; returns the PNG paths."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    saved = _load(folder)
    if not saved:
        return []
    rank = {v: i for i, v in enumerate(order)}
    variants = sorted(saved, key=lambda v: (rank.get(v.split(" ")[0], len(rank)), v))
    keys: list[str] = []
    for v in variants:
        keys += [k for k in saved[v]["cases"] if k not in keys]
    n_cls = len(class_names)
    cmap = matplotlib.colormaps["tab10" if n_cls <= 11 else "tab20"]
    colors = np.asarray([cmap(k % cmap.N)[:3] for k in range(max(1, n_cls - 1))])
    plots_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in keys:
        ref = next(saved[v]["cases"][key] for v in variants if key in saved[v]["cases"])
        cols = [("image", None), ("ground truth", ref.truth)] + \
               [(v, saved[v]["cases"][key].pred) for v in variants if key in saved[v]["cases"]]
        fig = Figure(figsize=(2.6 * len(cols), 3.0), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(cols), squeeze=False)[0]
        for ax, (title, lab) in zip(axes, cols):
            if lab is None:
                lo, hi = np.percentile(ref.image, [0.5, 99.5])
                ax.imshow(ref.image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            else:
                ax.imshow(_overlay(ref.image, lab, colors))
                if title != "ground truth":
                    title = f"{title}\nDice {_dice(lab, ref.truth, n_cls):.3f}"
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        handles = [Patch(color=colors[c - 1], label=class_names[c]) for c in range(1, n_cls)]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
        fig.suptitle(f"{prefix}: {key}", fontsize=9)
        fig.tight_layout(rect=(0, 0.06, 1, 0.95))
        path = plots_dir / f"segmentation_{slug(prefix)}_{slug(key)}.png"
        fig.savefig(path)
        paths.append(path)
    return paths
