"""Reliability diagram (matplotlib PNG): observed frequency against mean predicted probability per bin."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_reliability(curves: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], title: str, path: Path) -> Path:
    """Write one diagram: a line per class view (``(name, mean predicted, observed, count)``), the
    diagonal of perfect calibration, and the number of samples per bin below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    n_bins = len(curves[0][3]) if curves else 10
    centers = (np.arange(n_bins) + 0.5) / n_bins
    width = 1 / n_bins / max(1, len(curves))
    for i, (name, pred, true, count) in enumerate(curves):
        ok = count > 0
        ax.plot(pred[ok], true[ok], marker="o", ms=3, label=name or "positive class")
        hist.bar(centers - 0.5 / n_bins + (i + 0.5) * width, count, width=width)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    hist.set_xlabel("mean predicted probability")
    hist.set_ylabel("samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
