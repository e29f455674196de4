"""Cross-task ranking files for ``medprobe analyze ranking``: scatter, average and per-dataset ranks.

The computation (and the scatter, which the HTML report shows too) lives in
:mod:`medprobe.results.ranking`; this module writes them next to the other analysis pictures.
"""
from __future__ import annotations

from pathlib import Path

from medprobe.analysis.images import ensure_dir, write_caption
from medprobe.results.ranking import (CLASSIFICATION_METRICS, FAMILIES, SEGMENTATION_METRICS, Ranking,  # noqa: F401
                                      average_ranks, dataset_scores, plot_ranking, ranking_from_output,
                                      require_both_families, task_family)


def write_ranking(ranking: Ranking, out_dir: str | Path, *, title: str = "", stem: str = "ranking") -> dict[str, Path]:
    """Write ``<stem>.png`` (scatter), ``<stem>.csv`` (average ranks) and ``<stem>_per_dataset.csv``."""
    out = ensure_dir(out_dir)
    files = {"csv": out / f"{stem}.csv", "per_dataset": out / f"{stem}_per_dataset.csv"}
    ranking.average.to_csv(files["csv"], index=False)
    ranking.per_dataset.to_csv(files["per_dataset"], index=False)
    files["png"] = plot_ranking(ranking, out / f"{stem}.png", title)
    files["caption"] = write_caption(files["png"], title or "Cross-task ranking",
                                     "Average rank of each backbone over classification datasets (y) and "
                                     "segmentation datasets (x); rank 1 = best, ties share the average rank.")
    return files
