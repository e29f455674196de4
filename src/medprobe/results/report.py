"""``medprobe report``: the report model of one output folder, rendered to the terminal, CSV,
Markdown and plots (the HTML rendering is :mod:`medprobe.results.html`).

The model is computed once (:func:`build_report`) from ``results.db``: the summary over seeds
per configuration (:mod:`medprobe.results.tables`), the headline metric per dataset, notes
(undefined metrics and why, the k a kNN actually used, dataset warnings), failed units with
their error and the environments the runs were computed in. It never fails on a well-formed
results database; in a read-only folder it renders to the terminal and writes nothing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medprobe.results.plots import fewshot_curves, protocol_bars
from medprobe.results.store import connect_readonly
from medprobe.results.tables import fmt, headline_metric, load_results, summarize


@dataclass
class Report:
    summary: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    headline: dict[str, str] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environments: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    written: bool = False


def load_failed(output_dir: Path) -> list[dict[str, Any]]:
    """Failed units of ``output_dir`` with their error (newest attempt)."""
    conn = connect_readonly(output_dir / "results.db")
    try:
        rows = conn.execute("SELECT dataset, backbone, weights, protocol, variant, seed, error FROM runs "
                            "WHERE status = 'failed' ORDER BY dataset, backbone, protocol, variant, seed").fetchall()
    finally:
        conn.close()
    cols = ("dataset", "backbone", "weights", "protocol", "variant", "seed", "error")
    return [dict(zip(cols, r)) for r in rows]


def load_environments(output_dir: Path) -> list[tuple[dict[str, Any], int]]:
    """The distinct environments (versions, device, precision) of the finished runs and how many used each."""
    conn = connect_readonly(output_dir / "results.db")
    try:
        if "env_json" not in {r[1] for r in conn.execute("PRAGMA table_info(runs)")}:
            return []
        rows = conn.execute("SELECT env_json, COUNT(*) FROM runs WHERE status = 'done' AND env_json IS NOT NULL "
                            "GROUP BY env_json").fetchall()
    finally:
        conn.close()
    out = []
    for text, n in rows:
        try:
            out.append((json.loads(text), int(n)))
        except ValueError:
            continue
    return out


def describe_environment(env: dict[str, Any]) -> str:
    pk = env.get("packages") or {}
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    git = str(env.get("git_sha") or "")
    sha = f" ({git[:12]}{'-dirty' if git.endswith('-dirty') else ''})" if git else ""  # dirty: uncommitted edits
    return (f"medprobe {env.get('medprobe')}{sha}, python {env.get('python')}, {versions}; device "
            f"{env.get('device')} ({env.get('device_name')}), precision {env.get('precision')}")


NOTED_METRICS = ("k_used",)  # metrics whose note is always worth a line (e.g. the k a kNN could use)


def _notes(df: pd.DataFrame, summary: pd.DataFrame, headline: dict[str, str | None]) -> list[str]:
    """Notes worth a reader's attention: undefined values and why, notes on each dataset's headline
    metric, the k a kNN used, dataset warnings (descriptive notes of cost metrics stay in the tables)."""
    notes = []
    for r in summary.itertuples():
        wanted = r.mean != r.mean or r.metric in NOTED_METRICS or r.metric == headline.get(r.dataset)
        if wanted and isinstance(r.note, str) and r.note:
            value = "n/a" if r.mean != r.mean else f"{r.mean:.3f}"
            notes.append(f"{r.dataset} / {r.backbone} / {r.variant}: {r.metric} {value}: {r.note}")
    if "info_json" in df:
        for text in df.drop_duplicates("run_key")["info_json"].dropna():
            try:
                info = json.loads(text)
            except ValueError:
                continue
            for w in info.get("warnings", []) if isinstance(info, dict) else []:
                notes.append(str(w))
    return list(dict.fromkeys(notes))


def build_report(output_dir: str | Path, write: bool = True) -> Report:
    out = Path(output_dir)
    df = load_results(out)
    summary = summarize(df)
    headline = {d: headline_metric(summary, d) for d in summary["dataset"].unique()}
    report = Report(summary, headline=headline, failed=load_failed(out), notes=_notes(df, summary, headline),
                    environments=load_environments(out))
    if not write or not os.access(out, os.W_OK):
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
    report.written = True
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
    if report.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    if report.failed:
        lines += ["## Failed units", "", "| dataset | backbone | protocol | variant | seed | error |",
                  "|---|---|---|---|---|---|"]
        for f in report.failed:
            err = " ".join(str(f["error"] or "").split())[:300].replace("|", "\\|")
            lines.append(f"| {f['dataset']} | {f['backbone']} | {f['protocol']} | {f['variant']} | {f['seed']} | {err} |")
        lines.append("")
    if report.environments:
        lines += ["## Environment", ""] + [f"- {n} run(s): {describe_environment(e)}" for e, n in report.environments]
        lines.append("")
    figs = sorted(plots.glob("*.png"))
    if figs:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in figs]
    return "\n".join(lines) + "\n"


def print_report(report: Report, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    console = console or Console()
    s = report.summary
    for dataset, sub in s.groupby("dataset", sort=False):
        metric = report.headline.get(dataset)
        sub = sub[sub["metric"] == metric]
        table = Table(title=escape(f"{dataset}: {metric} (mean ± sd over seeds [bootstrap 95% CI])"))
        for col in ("backbone", "weights", "protocol", "variant", "n", metric or "value"):
            table.add_column(col)
        for _, r in sub.iterrows():
            table.add_row(r["backbone"], r["weights"], r["protocol"], r["variant"], str(int(r["n"])), _cell(r))
        console.print(table)
    for note in report.notes:
        console.print(escape(f"note: {note}"), highlight=False)
    for f in report.failed:
        err = " ".join(str(f["error"] or "").split())
        console.print(escape(f"failed: {f['dataset']} / {f['backbone']} / {f['variant']} seed {f['seed']}: "
                             f"{err[:300]}"), highlight=False)
    for env, n in report.environments:
        console.print(escape(f"environment ({n} runs): {describe_environment(env)}"), highlight=False)
