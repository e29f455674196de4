"""Report figures: few-shot curves and per-protocol bar charts (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from medprobe.fsutil import slug  # noqa: E402


def _legend_below(ax: plt.Axes, offset: float = 0.2) -> None:
    """The legend ``offset`` (axes fraction) under the axes: long backbone/weights labels never cover the data."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -offset), frameon=False)


def fewshot_curves(summary: pd.DataFrame, out_dir: Path, metric: str = "auroc") -> list[Path]:
    """One figure per dataset and few-shot probe: metric vs shots, a line per backbone (± sd)."""
    fs = summary[(summary["protocol"] == "fewshot") & (summary["metric"] == metric) & summary["mean"].notna()].copy()
    if fs.empty:
        return []
    parts = fs["variant"].str.extract(r"fewshot (?P<probe>\w+) (?P<shots>\d+)-shot")
    fs = fs.join(parts).dropna(subset=["shots"])
    if fs.empty:
        return []
    fs["shots"] = fs["shots"].astype(int)
    paths = []
    for (dataset, probe), sub in fs.groupby(["dataset", "probe"]):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for backbone, b in sub.groupby("backbone"):
            b = b.sort_values("shots")
            ax.errorbar(b["shots"], b["mean"], yerr=b["sd"], marker="o", capsize=3, label=f"{backbone} ({b['weights'].iloc[0]})")
        ax.set_xscale("log", base=2)
        shots = sorted(sub["shots"].unique())
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.set_xlabel("patients per class")
        ax.set_ylabel(metric.upper())
        ax.set_title(f"{dataset}: few-shot {probe}")
        ax.grid(alpha=0.3)
        _legend_below(ax)
        fig.tight_layout()
        path = out_dir / f"fewshot_{slug(dataset, limit=None)}_{slug(probe, limit=None)}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def protocol_bars(summary: pd.DataFrame, out_dir: Path, metric_for: dict[str, str]) -> list[Path]:
    """One bar chart per dataset × protocol: the headline metric of each backbone and variant."""
    paths = []
    for (dataset, protocol), sub in summary.groupby(["dataset", "protocol"]):
        metric = metric_for.get(dataset)
        sub = sub[(sub["metric"] == metric) & sub["mean"].notna()]  # undefined values: "n/a" in the tables
        if sub.empty or protocol == "fewshot":
            continue
        pivot = sub.pivot_table(index="variant", columns="backbone", values="mean", sort=False)
        err = sub.pivot_table(index="variant", columns="backbone", values="sd", sort=False)
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(pivot)), 3.5))
        pivot.plot.bar(yerr=err, ax=ax, capsize=2, rot=20)
        ax.set_ylabel(metric)
        ax.set_title(f"{dataset}: {protocol}")
        ax.set_xlabel("")  # the tick labels name the variants
        ax.grid(axis="y", alpha=0.3)
        _legend_below(ax, offset=0.3)  # below the rotated tick labels
        fig.tight_layout()
        path = out_dir / f"bars_{slug(dataset, limit=None)}_{slug(protocol, limit=None)}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
