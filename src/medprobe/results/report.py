"""``medprobe report``: a rich table, ``results.csv``, ``report.md`` and plots for one output folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medprobe.results.plots import fewshot_curves, protocol_bars
from medprobe.results.tables import fmt, headline_metric, load_results, summarize


@dataclass
class Report:
    summary: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    headline: dict[str, str] = field(default_factory=dict)


def build_report(output_dir: str | Path, write: bool = True) -> Report:
    out = Path(output_dir)
    df = load_results(out)
    summary = summarize(df)
    headline = {d: headline_metric(summary, d) for d in summary["dataset"].unique()}
    report = Report(summary, headline=headline)
    if not write:
        return report
    df.to_csv(out / "results.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    report.files += [out / "results.csv", out / "summary.csv"]
    report.files += fewshot_curves(summary, plots)
    report.files += protocol_bars(summary, plots, headline)
    md = out / "report.md"
    md.write_text(markdown(report, plots, out))
    report.files.append(md)
    return report


def _cell(row: pd.Series) -> str:
    return fmt(row["mean"], row["sd"], int(row["n"]), row["ci_low"], row["ci_high"])


def markdown(report: Report, plots: Path, out: Path) -> str:
    s = report.summary
    lines = ["# Results", "", "Cells: mean over seeds ± sd [mean bootstrap 95% CI on the test split]. "
             "Backbones with `random` weights were not pretrained.", ""]
    for dataset, sub in s.groupby("dataset", sort=False):
        metric = report.headline.get(dataset)
        lines += [f"## {dataset} — {metric}", ""]
        sub = sub[sub["metric"] == metric]
        backbones = list(dict.fromkeys(f"{b} ({w})" for b, w in zip(sub["backbone"], sub["weights"])))
        lines.append("| protocol | " + " | ".join(backbones) + " |")
        lines.append("|---|" + "---|" * len(backbones))
        for variant, v in sub.groupby("variant", sort=False):
            cells = {f"{r['backbone']} ({r['weights']})": _cell(r) for _, r in v.iterrows()}
            lines.append(f"| {variant} | " + " | ".join(cells.get(b, "") for b in backbones) + " |")
        lines.append("")
    figs = sorted(plots.glob("*.png"))
    if figs:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in figs]
    return "\n".join(lines) + "\n"


def print_report(report: Report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    s = report.summary
    for dataset, sub in s.groupby("dataset", sort=False):
        metric = report.headline.get(dataset)
        sub = sub[sub["metric"] == metric]
        from rich.markup import escape
        table = Table(title=escape(f"{dataset}: {metric} (mean ± sd over seeds [bootstrap 95% CI])"))
        for col in ("backbone", "weights", "protocol", "variant", "n", metric or "value"):
            table.add_column(col)
        for _, r in sub.iterrows():
            table.add_row(r["backbone"], r["weights"], r["protocol"], r["variant"], str(int(r["n"])), _cell(r))
        console.print(table)
