"""``medprobe report OUTPUT_DIR --html``: one self-contained ``report.html``.

The page is built in two steps. This module turns the report model of an output folder
(:func:`medprobe.results.report.build_report`: summary over seeds, headline metrics, notes,
failed units, environments) into plain data: :class:`Section` objects holding paragraphs,
:class:`Table` (columns, rows of :class:`Cell` with text, sort key and numeric flag, best-row
flags, caption) and :class:`Figure` (PNG data URI, caption, alt text). The jinja2 templates
under ``templates/`` render all markup with autoescaping, so every string from a results
database (dataset and backbone names, weights paths, error messages) is escaped; no HTML is
built here. The CSS and the table-sorting script are package data under ``static/``, inlined
into the page with the pictures, so nothing is fetched when the page is opened.

Sections: overview, headline results with confidence intervals per dataset, few-shot curves,
segmentation decoders, the cross-task ranking, every picture under ``OUTPUT_DIR/analysis/``,
notes, failed units, run environments and all metrics. A new section is one more
:class:`Section` in :func:`build_sections`.
"""
from __future__ import annotations

import base64
import json
import math
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from medprobe.errors import ConfigError, MedprobeError
from medprobe.results.report import Report, build_report
from medprobe.results.store import connect_readonly

_FEWSHOT = re.compile(r"fewshot (?P<probe>\w+) (?P<shots>\d+)-shot")
_SEGMENTATION = ("dice_jaccard_mean", "dice")
NA = "n/a"


# --------------------------------------------------------------------------- the page model
@dataclass(frozen=True)
class Code:
    """An inline code span in a paragraph."""

    code: str


# A paragraph: plain text, a code span, or a sequence of those.
Paragraph = Union[str, Code, Sequence[Union[str, Code]]]


@dataclass
class Cell:
    """One table cell: its ``text``; ``sort`` overrides the text when sorting (``""`` sorts last)."""

    text: str
    sort: str | None = None
    numeric: bool = False
    na: bool = False
    title: str | None = None  # tooltip, e.g. why a value is undefined
    detail: str | None = None  # long text shown folded under the cell text (a traceback)
    css: str | None = None


@dataclass
class Column:
    name: str
    numeric: bool = False


@dataclass
class Table:
    columns: list[Column]
    rows: list[list[Cell]]
    best: list[bool] = field(default_factory=list)
    caption: str = ""
    sortable: bool = True
    header: bool = True  # a header row with the column names
    row_header: bool = False  # the first cell of each row is its header
    collapsed: str | None = None  # shown folded under this summary text


@dataclass
class Figure:
    data_uri: str
    caption: str
    alt: str
    wide: bool = False
    title: str | None = None
    path: str | None = None


@dataclass
class Section:
    """A titled part of the page: intro paragraphs, tables, figures, a list of notes, then subsections."""

    id: str
    title: str
    intro: list[Paragraph] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[Paragraph] = field(default_factory=list)
    subsections: list[Section] = field(default_factory=list)
    nav: str | None = None  # short name in the navigation bar


# --------------------------------------------------------------------------- cells and tables
def is_na(v: object) -> bool:
    """None, NaN or pandas' missing value."""
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    try:
        return isinstance(v, (float, np.floating)) and math.isnan(v)
    except TypeError:
        return False


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def fmt_number(v: object, digits: int = 3) -> str:
    """``0.912`` for a float, ``3`` for an integer, ``n/a`` for an undefined value."""
    if is_na(v):
        return NA
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def sort_key(v: object) -> str:
    """The ``data-sort`` value of ``v``: the number itself, ``""`` (last) when undefined."""
    return "" if is_na(v) else repr(float(v))


def cell(v: object, *, numeric: bool | None = None, sort: object = None, title: str | None = None) -> Cell:
    """A cell from a value: numbers formatted (sorted by value), undefined values as ``n/a``."""
    if isinstance(v, Cell):
        return v
    number = _is_number(v)
    if is_na(v):
        return Cell(NA, sort="", numeric=bool(numeric), na=True, title=title)
    text = fmt_number(v) if number else str(v)
    if sort is None:
        key = sort_key(v) if number else None
    else:
        key = sort_key(sort) if is_na(sort) or _is_number(sort) else str(sort)
    return Cell(text, sort=key, numeric=number if numeric is None else numeric, title=title)


def table(columns: Sequence[str | Column], rows: Iterable[Sequence[object]], *, best: Sequence[bool] | None = None,
          caption: str = "", sortable: bool = True, header: bool = True, row_header: bool = False,
          collapsed: str | None = None) -> Table:
    """A :class:`Table` from plain values (see :func:`cell`); a column is numeric when named as ``Column(.., True)``."""
    cols = [c if isinstance(c, Column) else Column(str(c)) for c in columns]
    body = []
    for r in rows:
        r = list(r)
        if len(r) != len(cols):
            raise ValueError(f"row of {len(r)} cells for {len(cols)} columns: {r}")
        body.append([cell(v, numeric=c.numeric) for v, c in zip(r, cols)])
    return Table(cols, body, best=list(best) if best is not None else [], caption=caption, sortable=sortable,
                 header=header, row_header=row_header, collapsed=collapsed)


def num(name: str) -> Column:
    return Column(name, numeric=True)


def ci_text(lo: object, hi: object) -> str:
    return "" if is_na(lo) or is_na(hi) else f"[{float(lo):.3f}, {float(hi):.3f}]"


def mean_cell(r: Any, with_ci: bool = False) -> Cell:
    """``mean ± sd`` (and ``[CI]``) of a summary row, sorted by the mean; ``n/a`` with the reason when undefined."""
    note = _note(r)
    if is_na(r.mean):
        return Cell(NA, sort="", numeric=True, na=True, title=note)
    text = f"{float(r.mean):.3f}"
    if not is_na(r.sd) and int(r.n) > 1:
        text += f" ± {float(r.sd):.3f}"
    if with_ci and ci_text(r.ci_low, r.ci_high):
        text += " " + ci_text(r.ci_low, r.ci_high)
    return Cell(text, sort=sort_key(r.mean), numeric=True, title=note)


def sd_cell(r: Any) -> Cell:
    """The sd over seeds of a summary row; ``n/a`` when fewer than two seeds have a value."""
    if is_na(r.mean) or is_na(r.sd) or int(r.n) < 2:
        return Cell(NA, sort="", numeric=True, na=True, title=None if is_na(r.mean) else "fewer than two seeds")
    return Cell(fmt_number(r.sd), sort=sort_key(r.sd), numeric=True)


def _note(r: Any) -> str | None:
    note = getattr(r, "note", None)
    return None if is_na(note) or not note else str(note)


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(path: Path, caption: str = "", alt: str = "", *, wide: bool = False, title: str | None = None,
           shown_path: str | None = None) -> Figure:
    return Figure(png_data_uri(path), caption, alt or caption or Path(path).stem, wide=wide, title=title,
                  path=shown_path)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"


# --------------------------------------------------------------------------- backbone labels
def backbone_labels(summary: pd.DataFrame) -> dict[Any, str]:
    """``{backbone identity: "name (weights)"}``; backbones sharing name and weights but differing in
    identity (overrides, weights content) get the start of their key appended."""
    labels: dict[Any, str] = {}
    for k, b, w in zip(_bkeys(summary), summary["backbone"], summary["weights"]):
        labels.setdefault(k, f"{b} ({w})")
    counts: dict[str, int] = {}
    for text in labels.values():
        counts[text] = counts.get(text, 0) + 1
    return {k: (f"{t} [{str(k).split(':')[-1][:6]}]" if counts[t] > 1 else t) for k, t in labels.items()}


def _bkeys(df: pd.DataFrame) -> list[Any]:
    if "backbone_key" in df and not df.empty and df["backbone_key"].notna().all():
        return list(df["backbone_key"])
    return [f"{b}:{w}" for b, w in zip(df["backbone"], df["weights"])]


# --------------------------------------------------------------------------- sections
def _run_counts(out: Path) -> tuple[dict[str, int], int]:
    """Runs per status, and the finished runs whose environment was not recorded."""
    conn = connect_readonly(out / "results.db")
    try:
        counts = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
        have = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        where = "env_json IS NULL" if "env_json" in have else "1"
        unrecorded = conn.execute(f"SELECT COUNT(*) FROM runs WHERE status = 'done' AND {where}").fetchone()[0]
    except sqlite3.DatabaseError:
        return {}, 0
    finally:
        conn.close()
    return {str(k): int(v) for k, v in counts.items()}, int(unrecorded)


def _overview(report: Report, df_experiments: list[str], counts: dict[str, int]) -> Section:
    s = report.summary
    labels = backbone_labels(s) if not s.empty else {}
    items = [("experiment(s)", ", ".join(df_experiments) or "—"),
             ("datasets", ", ".join(str(d) for d in s["dataset"].unique()) or "—"),
             ("backbones", ", ".join(sorted(labels.values())) or "—"),
             ("runs", ", ".join(f"{n} {st}" for st, n in sorted(counts.items())) or "none")]
    overview = table(["item", "value"], items, sortable=False, header=False, row_header=True)
    return Section("overview", "Overview", tables=[overview])


_RESULTS_INTRO = ("Headline metric per dataset: mean over seeds ± sd and the mean bootstrap 95% confidence interval "
                  "on the test split. The best mean of each dataset is highlighted; few-shot results have their own "
                  "section. An undefined value shows as n/a (hover it for the reason). Click a column header to sort.")


def _headline(report: Report) -> Section:
    s, subs = report.summary, []
    for dataset in s["dataset"].unique():
        metric = report.headline.get(dataset)
        sub = s[(s["dataset"] == dataset) & (s["metric"] == metric) & (s["protocol"] != "fewshot")]
        if sub.empty:
            continue
        best_value = sub["mean"].max()  # NaN-skipping; NaN when every value is undefined
        rows, best = [], []
        for r in sub.itertuples():
            rows.append([r.backbone, r.weights, r.protocol, r.variant, int(r.n),
                         Cell(NA, sort="", numeric=True, na=True, title=_note(r)) if is_na(r.mean)
                         else Cell(fmt_number(r.mean), sort=sort_key(r.mean), numeric=True, title=_note(r)),
                         sd_cell(r),
                         Cell(ci_text(r.ci_low, r.ci_high), sort=sort_key(r.ci_low))])
            best.append(bool(not is_na(best_value) and r.mean == best_value))
        subs.append(Section(f"ds-{slug(dataset)}", f"{dataset} — {metric}", tables=[table(
            ["backbone", "weights", "protocol", "variant", num("seeds"), num(f"{metric} mean"), num("sd"), "95% CI"],
            rows, best=best)]))
    return Section("results", "Results", intro=[_RESULTS_INTRO] + ([] if subs else ["No headline results."]),
                   subsections=subs)


def _figures_per_dataset(make: Callable[[pd.DataFrame, Path], list[Path]], summary: pd.DataFrame, tmp: Path,
                         datasets: Sequence[str], caption: Callable[[Path], str]) -> dict[str, list[Figure]]:
    """Pictures drawn per dataset (each in its own folder, so none is attributed to the wrong dataset)."""
    out: dict[str, list[Figure]] = {}
    for i, d in enumerate(datasets):
        folder = tmp / f"{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = make(summary[summary["dataset"] == d], folder)
        out[d] = [figure(p, caption(p), p.stem) for p in paths]
    return out


def _stem_caption(p: Path) -> str:
    return p.stem.replace("_", " ")


def _fewshot(report: Report, tmp: Path) -> Section:
    from medprobe.results.plots import fewshot_curves
    s = report.summary
    fs = s[s["protocol"] == "fewshot"]
    section = Section("fewshot", "Few-shot curves", nav="Few-shot")
    if fs.empty:
        section.intro.append("No few-shot results in this run.")
        return section
    datasets = list(fs["dataset"].unique())
    figs = _figures_per_dataset(
        lambda sub, folder: fewshot_curves(sub, folder, report.headline.get(str(sub["dataset"].iloc[0])) or "auroc"),
        fs, tmp, datasets, _stem_caption)
    labels = backbone_labels(fs)
    for dataset in datasets:
        metric = report.headline.get(dataset)
        sub = fs[(fs["dataset"] == dataset) & (fs["metric"] == metric)]
        parsed = sub["variant"].astype(str).str.extract(_FEWSHOT)
        sub = sub.join(parsed).dropna(subset=["shots"])
        if sub.empty:
            continue
        sub = sub.assign(shots=sub["shots"].astype(int), bkey=_bkeys(sub),
                         rest=[_FEWSHOT.sub("", v, count=1).strip() for v in sub["variant"].astype(str)])
        shots = sorted(sub["shots"].unique())
        rows = []
        for (bkey, probe, rest), g in sub.groupby(["bkey", "probe", "rest"], sort=False):
            by = {int(n): r for n, r in zip(g["shots"], g.itertuples())}
            b, w = g["backbone"].iloc[0], g["weights"].iloc[0]
            shown = b if labels[bkey] == f"{b} ({w})" else labels[bkey]  # name (weights) [key] when ambiguous
            rows.append([shown, w, f"{probe} {rest}".strip(),
                         *[mean_cell(by[n]) if n in by else Cell("", sort="", numeric=True) for n in shots]])
        section.subsections.append(Section(
            f"fs-{slug(dataset)}", f"{dataset} — {metric} vs patients per class",
            tables=[table(["backbone", "weights", "probe", *[num(f"{n}-shot") for n in shots]], rows,
                          caption="mean ± sd over seeds and repeats")],
            figures=figs.get(dataset, [])))
    if not section.subsections:
        section.intro.append("No few-shot results in this run.")
    return section


def _segmentation(report: Report, tmp: Path) -> Section:
    from medprobe.results.plots import protocol_bars
    s = report.summary
    section = Section("decoders", "Segmentation decoders", nav="Decoders")
    datasets = [d for d in s["dataset"].unique() if report.headline.get(d) in _SEGMENTATION]
    seg = s[s["dataset"].isin(datasets)]
    figs = _figures_per_dataset(lambda sub, folder: protocol_bars(sub, folder, report.headline), seg, tmp,
                                datasets, _stem_caption)
    for dataset in datasets:
        metric = report.headline[dataset]
        sub = seg[(seg["dataset"] == dataset) & (seg["metric"] == metric)]
        labels = backbone_labels(sub)
        sub = sub.assign(bkey=_bkeys(sub))
        order = list(dict.fromkeys(sub["bkey"]))
        rows = []
        for (protocol, variant), g in sub.groupby(["protocol", "variant"], sort=False):
            by = {k: r for k, r in zip(g["bkey"], g.itertuples())}
            rows.append([protocol, variant, *[mean_cell(by[k], with_ci=True) if k in by
                                              else Cell("", sort="", numeric=True) for k in order]])
        section.subsections.append(Section(
            f"seg-{slug(dataset)}", f"{dataset} — {metric} by decoder",
            tables=[table(["protocol", "decoder / variant", *[num(labels[k]) for k in order]], rows,
                          caption="mean ± sd over seeds [mean bootstrap 95% CI]")],
            figures=figs.get(dataset, [])))
    if not section.subsections:
        section.intro.append("No segmentation results in this run.")
    return section


def _ranking(report: Report, tmp: Path) -> tuple[Section, bool]:
    """The cross-task ranking section, and whether it shows the scatter."""
    from medprobe.results.ranking import average_ranks, dataset_scores, plot_ranking
    section = Section("ranking", "Cross-task ranking", nav="Ranking")
    try:
        scores = dataset_scores(report.summary)
        if scores.empty:
            section.intro.append("No classification or segmentation results to rank.")
            return section, False
        ranking = average_ranks(scores)
    except MedprobeError as e:
        section.intro.append(str(e))
        return section, False
    fams = ranking.families()
    rows = [[r.backbone, r.classification_rank, r.n_classification, r.segmentation_rank, r.n_segmentation]
            for r in ranking.average.itertuples()]
    section.tables.append(table(["backbone", num("classification rank"), num("classification datasets"),
                                 num("segmentation rank"), num("segmentation datasets")], rows,
                                caption="average rank over datasets; rank 1 = best; ties share the average rank"))
    if len(fams) < 2:
        section.intro.append(f"The cross-task scatter needs classification and segmentation results; this run has "
                             f"{' and '.join(fams) or 'neither'} only.")
        return section, False
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        path = plot_ranking(ranking, tmp / "ranking.png")
    except MedprobeError as e:
        section.intro.append(str(e))
        return section, False
    section.figures.append(figure(path, "Average rank on segmentation (x) vs classification (y); top right is best "
                                        "on both.", "cross-task ranking scatter"))
    return section, True


def _analysis(out: Path, skip_ranking: bool) -> Section:
    section = Section("analysis", "Looking inside the features", nav="Analysis")
    root = out / "analysis"
    pngs = sorted(root.rglob("*.png")) if root.is_dir() else []
    if skip_ranking:  # the ranking section shows it already
        pngs = [p for p in pngs if not (p.parent.name == "ranking" and p.name == "ranking.png")]
    if not pngs:
        section.intro.append(["No analysis pictures under ", Code("analysis/"), "; create them with ",
                              Code(f"medprobe analyze pca|cka|attention|correspondence ... --out {root}/NAME"), "."])
        return section
    for p in pngs:
        meta: dict[str, Any] = {}
        side = p.with_suffix(".json")
        if side.is_file():
            try:
                loaded = json.loads(side.read_text())
                meta = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                meta = {}
        rel = p.relative_to(out).as_posix()
        title = str(meta["title"]) if meta.get("title") else None
        section.figures.append(figure(p, str(meta.get("description") or ""), title or rel, wide=True, title=title,
                                      shown_path=rel))
    return section


def _notes(report: Report) -> Section | None:
    if not report.notes:
        return None
    return Section("notes", "Notes", intro=["Undefined metrics and why, the settings a protocol actually used, and "
                                            "warnings about the data."], notes=list(report.notes))


def _error_cell(error: object) -> Cell:
    text = "" if is_na(error) else str(error)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    short = lines[-1].strip() if lines else ""  # a traceback's last line names the exception
    if len(short) > 300:
        short = short[:299] + "…"
    detail = text if (len(lines) > 1 or short != text.strip()) else None
    return Cell(short, sort=short.lower(), css="error", detail=detail)


def _comparison(out: Path) -> Section | None:
    """Paired backbone comparisons on the same test samples (from the stored predictions)."""
    from medprobe.errors import MedprobeError
    from medprobe.results.analyses import compare_table
    section = Section("compare", "Backbone comparison", nav="Compare")
    try:
        rows = [r for r in compare_table(out, "auroc", bootstrap=1000) if not r["detail"]]
    except MedprobeError as e:
        section.intro.append(f"No comparison: {e}")
        return section
    if not rows:
        return None
    section.intro.append("AUROC differences between backbones of one configuration on the same test samples "
                         "(A minus B, averaged over the seeds both ran): paired bootstrap 95% CI, DeLong's test "
                         "where it applies, Holm-adjusted p-values over the rows (medprobe compare prints more).")
    body = [[r["dataset"], r["label"], r["backbone_a"], r["backbone_b"], r["value_a"], r["value_b"], r["diff"],
             ci_text(r["ci_low"], r["ci_high"]), r["test"], r["p"], r["p_holm"]] for r in rows]
    section.tables.append(table(["dataset", "configuration", "backbone A", "backbone B", num("A"), num("B"),
                                 num("A - B"), "95% CI", "test", num("p"), num("p (Holm)")], body))
    return section


def _text_examples(out: Path) -> Section | None:
    """A few generated reports beside their references, per report-generation unit (first seed)."""
    from medprobe.errors import MedprobeError
    from medprobe.results.runs import load_predictions, load_runs
    from medprobe.results.text_examples import text_examples
    runs = [r for r in load_runs(out) if r.protocol == "report_generation" and r.predictions]
    if not runs:
        return None
    section = Section("reports", "Generated reports", nav="Reports")
    section.intro.append("A few test images' generated findings beside the reference report (evenly spread over "
                         "the test split), per dataset, backbone and configuration.")
    seen = set()
    for run in runs:
        if (run.dataset, run.backbone_key, run.config_key) in seen:
            continue
        seen.add((run.dataset, run.backbone_key, run.config_key))
        try:
            rows = text_examples(load_predictions(out, run), n=3)
        except MedprobeError as e:
            section.notes.append(f"{run.dataset} / {run.backbone} / {run.label}: {e}")
            continue
        if not rows:
            continue
        extra = [c for c in rows[0] if c not in ("key", "patient_id", "reference", "generated")]
        columns = ["sample", "reference", "generated", *extra]
        body = [[r["key"], r.get("reference", ""), r.get("generated", ""), *[r.get(c, "") for c in extra]]
                for r in rows]
        t = table([c.replace("_", " ") for c in columns], body)
        t.caption = f"{run.dataset} / {run.backbone} ({run.weights}) / {run.label}, seed {run.seed}"
        section.tables.append(t)
    return section


def _failed(report: Report) -> Section:
    section = Section("failed", "Failed units", nav="Failed")
    if not report.failed:
        section.intro.append("No unit failed.")
        return section
    section.intro.append(f"{len(report.failed)} unit(s) failed; their results are missing from the tables above. "
                         "Rerunning the experiment retries them (finished units are kept).")
    rows = [[f.get("dataset"), f.get("backbone"), f.get("weights"), f.get("protocol"), f.get("variant"),
             f.get("seed"), _error_cell(f.get("error"))] for f in report.failed]
    section.tables.append(table(["dataset", "backbone", "weights", "protocol", "variant", num("seed"), "error"], rows))
    return section


_ENV_FIELDS = (("medprobe", "medprobe"), ("git_sha", "git SHA"), ("python", "python"))
_ENV_DEVICE = (("device", "device"), ("device_name", "device name"), ("precision", "precision"),
               ("platform", "platform"))


def _environment(report: Report, unrecorded: int) -> Section:
    section = Section("environment", "Environment", nav="Environment")
    envs = sorted(((e if isinstance(e, dict) else {}, int(n)) for e, n in report.environments),
                  key=lambda en: -en[1])  # the most used first
    if not envs:
        section.intro.append("No run recorded its environment." if unrecorded else "No finished runs.")
        return section
    packages = list(dict.fromkeys(k for e, _ in envs for k in (e.get("packages") or {})))
    fields = [*[(k, label, lambda e, k=k: e.get(k)) for k, label in _ENV_FIELDS],
              *[(f"packages.{p}", p, lambda e, p=p: (e.get("packages") or {}).get(p)) for p in packages],
              *[(k, label, lambda e, k=k: e.get(k)) for k, label in _ENV_DEVICE]]
    rows: list[list[object]] = [["finished runs", *[Cell(str(n), numeric=True) for _, n in envs]]]
    differ = []
    for _, label, get in fields:
        values = [get(e) for e, _ in envs]
        rows.append([label, *["—" if is_na(v) or v == "" else str(v) for v in values]])
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            differ.append(label)
    columns = [""] + [f"environment {i + 1}" for i in range(len(envs))]
    section.intro.append("What the finished runs were computed with: versions, device and precision.")
    section.tables.append(table(columns, rows, sortable=False, header=len(envs) > 1, row_header=True))
    if differ:
        section.notes.append(f"The runs were computed in {len(envs)} different environments (they differ in "
                             f"{', '.join(differ)}): numbers from different environments may not be exactly "
                             "comparable.")
    if unrecorded:
        section.notes.append(f"{unrecorded} finished run(s) recorded no environment (written by a medprobe version "
                             "that did not record it).")
    return section


def _all_metrics(summary: pd.DataFrame) -> Section:
    rows = [[r.dataset, r.backbone, r.weights, r.protocol, r.variant, r.metric, int(r.n),
             Cell(NA, sort="", numeric=True, na=True, title=_note(r)) if is_na(r.mean) else r.mean,
             sd_cell(r), r.ci_low, r.ci_high] for r in summary.itertuples()]
    t = table(["dataset", "backbone", "weights", "protocol", "variant", "metric", num("n"), num("mean"), num("sd"),
               num("CI low"), num("CI high")], rows,
              collapsed=f"every metric of every configuration ({len(summary)} rows)")
    return Section("all", "All metrics", tables=[t])


def build_sections(out: Path, report: Report, tmp: Path) -> list[Section]:
    """Every section of the page, in order (pictures are drawn under ``tmp`` and inlined)."""
    counts, unrecorded = _run_counts(out)
    experiments = _experiments(out)
    ranking, ranked = _ranking(report, tmp / "ranking")
    sections = [_overview(report, experiments, counts), _headline(report), _fewshot(report, tmp / "fewshot"),
                _segmentation(report, tmp / "decoders"), _comparison(out), _text_examples(out), ranking,
                _analysis(out, ranked),
                _notes(report),
                _failed(report), _environment(report, unrecorded), _all_metrics(report.summary)]
    return [s for s in sections if s is not None]


def _experiments(out: Path) -> list[str]:
    conn = connect_readonly(out / "results.db")
    try:
        return sorted(r[0] for r in conn.execute("SELECT DISTINCT experiment FROM runs WHERE status = 'done'"))
    finally:
        conn.close()


# --------------------------------------------------------------------------- rendering
def _resource(*parts: str) -> str:
    return resources.files("medprobe.results").joinpath(*parts).read_text(encoding="utf-8")


@cache
def jinja_env():  # -> jinja2.Environment
    """The jinja2 environment of the report templates (package data, read through importlib.resources)."""
    import jinja2

    def load(name: str) -> tuple[str, None, Callable[[], bool]] | None:
        try:
            return _resource("templates", name), None, lambda: True
        except (FileNotFoundError, IsADirectoryError):
            return None

    return jinja2.Environment(loader=jinja2.FunctionLoader(load), autoescape=True, undefined=jinja2.StrictUndefined,
                              extensions=["jinja2.ext.do"], trim_blocks=True, lstrip_blocks=True)


def _inline_asset(name: str, closing: str) -> Any:
    """A static file to inline verbatim in a ``<style>``/``<script>`` element (never one that could close it)."""
    from markupsafe import Markup
    text = _resource("static", name)
    if closing in text.lower():
        raise MedprobeError(f"package file medprobe/results/static/{name} contains {closing}; it cannot be inlined")
    return Markup(text)


def render_page(sections: Sequence[Section], *, name: str, folder: str, generated: str | None = None) -> str:
    """The HTML page of ``sections`` (every string autoescaped; CSS and JS inlined)."""
    page = {"name": name, "folder": folder,
            "generated": generated or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    return jinja_env().get_template("report.html.j2").render(
        page=page, sections=list(sections), css=_inline_asset("report.css", "</style"),
        js=_inline_asset("report.js", "</script")) + "\n"


def render_html(output_dir: str | Path, report: Report | None = None) -> str:
    """The report page of ``output_dir`` as one HTML string (``report``: its model, when already built)."""
    out = Path(output_dir)
    report = report if report is not None else build_report(out, write=False)
    with tempfile.TemporaryDirectory(prefix="medprobe-html-") as tmpdir:
        sections = build_sections(out, report, Path(tmpdir))
    return render_page(sections, name=out.resolve().name, folder=str(out.resolve()))


def write_html_report(output_dir: str | Path, report: Report | None = None) -> Path:
    """Write ``OUTPUT_DIR/report.html`` (self-contained) and return its path."""
    out = Path(output_dir)
    page = render_html(out, report)
    path = out / "report.html"
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}; check that the output folder is writable") from None
    return path
