"""Cross-task ranking of backbones (DINOv2-for-radiology Figure 1): the computation and its scatter.

For every dataset, each backbone's score is its best headline metric (mean over seeds) over
the protocols and variants run (or over the ``protocols`` asked for). Backbones are ranked
per dataset (rank 1 = best; ties share the average of their ranks), and the ranks are
averaged over the datasets of each task family: classification (headline AUROC/accuracy)
and segmentation (headline Dice). The scatter puts the segmentation rank on x and the
classification rank on y. Used by the HTML report and by ``medprobe analyze ranking``
(:mod:`medprobe.analysis.ranking`, which writes the files).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medprobe.errors import MedprobeError

SEGMENTATION_METRICS = ("dice_jaccard_mean", "dice", "jaccard", "iou", "miou")
CLASSIFICATION_METRICS = ("auroc", "accuracy", "balanced_accuracy", "f1", "auprc", "kappa")
FAMILIES = ("classification", "segmentation")


def task_family(metric: str) -> str | None:
    """``classification`` or ``segmentation`` for a headline metric, else None."""
    if metric in SEGMENTATION_METRICS:
        return "segmentation"
    if metric in CLASSIFICATION_METRICS:
        return "classification"
    return None


def _labels(summary: pd.DataFrame) -> pd.Series:
    """``backbone`` alone, or ``backbone (weights)`` where one backbone appears with several weights."""
    several = summary.groupby("backbone")["weights"].nunique()
    return summary.apply(lambda r: f"{r['backbone']} ({r['weights']})" if several.get(r["backbone"], 1) > 1
                         else r["backbone"], axis=1)


def dataset_scores(summary: pd.DataFrame, protocols: Sequence[str] | None = None) -> pd.DataFrame:
    """Best headline score of each backbone on each dataset.

    ``summary`` is :func:`medprobe.results.tables.summarize` output. Returns columns dataset,
    family, metric, backbone (label), score, protocol, variant (where the best score came from).
    """
    from medprobe.results.tables import headline_metric
    s = summary.copy()
    if protocols:
        s = s[s["protocol"].isin(list(protocols))]
        if s.empty:
            raise MedprobeError(f"no results for protocol(s) {', '.join(protocols)}; the database has "
                                f"{', '.join(sorted(summary['protocol'].unique()))}")
    if s.empty:
        return pd.DataFrame(columns=["dataset", "family", "metric", "backbone", "score", "protocol", "variant"])
    s["label"] = _labels(s)
    rows = []
    for dataset in s["dataset"].unique():
        metric = headline_metric(s, dataset)
        family = task_family(metric) if metric else None
        if family is None:
            continue
        sub = s[(s["dataset"] == dataset) & (s["metric"] == metric)].dropna(subset=["mean"])
        for label, g in sub.groupby("label", sort=False):
            best = g.loc[g["mean"].idxmax()]
            rows.append({"dataset": dataset, "family": family, "metric": metric, "backbone": label,
                         "score": float(best["mean"]), "protocol": best["protocol"], "variant": best["variant"]})
    return pd.DataFrame(rows, columns=["dataset", "family", "metric", "backbone", "score", "protocol", "variant"])


@dataclass
class Ranking:
    """``per_dataset``: scores and ranks per dataset; ``average``: one row per backbone with the average
    rank and number of datasets per family (NaN where a backbone has no result of that family)."""

    per_dataset: pd.DataFrame
    average: pd.DataFrame

    def families(self) -> list[str]:
        return [f for f in FAMILIES if f"{f}_rank" in self.average and self.average[f"{f}_rank"].notna().any()]


def average_ranks(scores: pd.DataFrame) -> Ranking:
    """Rank backbones per dataset (1 = best, ties averaged) and average the ranks per task family."""
    if scores.empty:
        raise MedprobeError("no classification or segmentation results to rank")
    per = scores.copy()
    per["rank"] = per.groupby("dataset")["score"].rank(method="average", ascending=False)
    per["n_backbones"] = per.groupby("dataset")["backbone"].transform("count")
    avg = per.groupby(["backbone", "family"])["rank"].agg(["mean", "count"]).unstack("family")
    out = pd.DataFrame(index=avg.index)
    for fam in FAMILIES:
        out[f"{fam}_rank"] = avg[("mean", fam)] if ("mean", fam) in avg.columns else np.nan
        out[f"n_{fam}"] = avg[("count", fam)].fillna(0).astype(int) if ("count", fam) in avg.columns else 0
    out = out.reset_index().sort_values([f"{f}_rank" for f in FAMILIES], na_position="last", kind="stable")
    return Ranking(per.sort_values(["family", "dataset", "rank"], kind="stable").reset_index(drop=True),
                   out.reset_index(drop=True))


def ranking_from_output(output_dir: str | Path, protocols: Sequence[str] | None = None) -> Ranking:
    """The cross-task ranking of the results database ``output_dir/results.db``."""
    from medprobe.results.tables import load_results, summarize
    return average_ranks(dataset_scores(summarize(load_results(output_dir)), protocols))


def require_both_families(ranking: Ranking) -> None:
    fams = ranking.families()
    missing = [f for f in FAMILIES if f not in fams]
    if missing:
        have = ", ".join(f"{f}: {', '.join(sorted(ranking.per_dataset.loc[ranking.per_dataset['family'] == f, 'dataset'].unique()))}"
                         for f in fams) or "none"
        raise MedprobeError(f"the cross-task ranking needs both classification and segmentation results; no "
                            f"{' or '.join(missing)} dataset was found (datasets by family: {have})")


def plot_ranking(ranking: Ranking, path: Path, title: str = "") -> Path:
    """Scatter of average segmentation rank (x) vs average classification rank (y); best is top right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    require_both_families(ranking)
    a = ranking.average.dropna(subset=["classification_rank", "segmentation_rank"])
    n = int(max(ranking.per_dataset["n_backbones"].max(), 2))
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    ax.plot([1, n], [1, n], ls="--", c="0.7", lw=1, zorder=0)
    colours = plt.get_cmap("tab10")
    seen: dict[tuple[float, float], int] = {}
    for i, r in enumerate(a.itertuples()):
        x, y = r.segmentation_rank, r.classification_rank
        ax.scatter([x], [y], s=80, color=colours(i % 10), edgecolor="k", zorder=3)
        k = seen.get((x, y), 0)
        seen[(x, y)] = k + 1
        ax.annotate(r.backbone, (x, y), xytext=(7, 5 - 11 * k), textcoords="offset points", fontsize=8)
    ax.set_xlim(n + 0.5, 0.5)
    ax.set_ylim(n + 0.5, 0.5)
    ax.set_xlabel("average rank on segmentation  (better →)")
    ax.set_ylabel("average rank on classification  (better →)")
    nc = ranking.per_dataset.loc[ranking.per_dataset["family"] == "classification", "dataset"].nunique()
    ns = ranking.per_dataset.loc[ranking.per_dataset["family"] == "segmentation", "dataset"].nunique()
    ax.set_title(title or f"cross-task ranking (rank 1 = best; {nc} classification, {ns} segmentation datasets)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
