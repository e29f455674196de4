"""``medprobe report OUTPUT_DIR --html``: one self-contained ``report.html``.

Everything is inside the file: pictures are PNG data URIs, CSS and the table-sorting script
are inline, nothing is fetched from the network. Sections: overview, headline results with
confidence intervals per dataset, few-shot curves, segmentation decoder comparison, the
cross-task ranking scatter, every picture under ``OUTPUT_DIR/analysis/``, failed runs and
all metrics. Every table sorts by clicking a column header.
"""
from __future__ import annotations

import base64
import json
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from medprobe.results.tables import headline_metric, load_results, summarize

_FEWSHOT = re.compile(r"fewshot (?P<probe>\w+) (?P<shots>\d+)-shot")
_SEGMENTATION = ("dice_jaccard_mean", "dice")

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dee7; --head:#eef1f6; --accent:#2f5fb3; --best:#e7f3e8; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       margin: 0 auto; padding: 24px 32px 64px; max-width: 1400px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 36px 0 8px; border-bottom: 2px solid var(--line);
     padding-bottom: 4px; } h3 { font-size: 15px; margin: 22px 0 6px; }
p.note, .muted { color: var(--muted); font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; font-size: 13px; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 9px; text-align: left; white-space: nowrap; }
td.num { text-align: right; }
th { background: var(--head); position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #9aa3b2; font-size: 11px; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; color: var(--accent); }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; color: var(--accent); }
tbody tr:nth-child(even) { background: #f8f9fb; }
tr.best td { background: var(--best); font-weight: 600; }
.figs { display: flex; flex-wrap: wrap; gap: 16px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; }
figure.wide img { max-width: min(100%, 1300px); }
figcaption { font-size: 12px; color: var(--muted); max-width: 640px; margin-top: 4px; }
code { background: #f1f3f7; padding: 0 3px; border-radius: 3px; }
.error { color: #9b1c1c; white-space: pre-wrap; }
"""

JS = r"""
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message || e));
    document.body.setAttribute('data-errors', errors.join(' | '));
  });
  function key(cell) {
    if (!cell) return {e: true};
    var raw = cell.getAttribute('data-sort');
    var t = (raw !== null ? raw : cell.textContent).trim();
    if (t === '' || t === 'nan' || t === 'n/a') return {e: true};
    var x = Number(t);
    return isFinite(x) ? {n: x} : {s: t.toLowerCase()};
  }
  function compare(a, b, sign) {
    if (a.e && b.e) return 0;
    if (a.e) return 1;
    if (b.e) return -1;
    if (a.n !== undefined && b.n !== undefined) return sign * (a.n - b.n);
    if (a.n !== undefined) return -sign;
    if (b.n !== undefined) return sign;
    return sign * a.s.localeCompare(b.s);
  }
  function sortBy(th) {
    var table = th.closest('table');
    var body = table.tBodies[0];
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir);
    var sign = dir === 'ascending' ? 1 : -1;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) { return compare(key(a.cells[idx]), key(b.cells[idx]), sign); });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  window.medprobeSort = sortBy;
  document.querySelectorAll('table.sortable thead th').forEach(function (th) {
    th.tabIndex = 0;
    th.addEventListener('click', function () { sortBy(th); });
    th.addEventListener('keydown', function (e) { if (e.key === 'Enter') sortBy(th); });
  });
  function columnValues(table, idx) {
    return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return key(r.cells[idx]); })
      .filter(function (k) { return k.n !== undefined; }).map(function (k) { return k.n; });
  }
  function sorted(values, sign) {
    for (var i = 1; i < values.length; i++) if (sign * (values[i] - values[i - 1]) < 0) return false;
    return true;
  }
  function selftest() {
    var tables = document.querySelectorAll('table.sortable');
    for (var t = 0; t < tables.length; t++) {
      var ths = tables[t].querySelectorAll('thead th');
      for (var i = 0; i < ths.length; i++) {
        if (ths[i].getAttribute('data-type') !== 'number' || tables[t].tBodies[0].rows.length < 3) continue;
        ths[i].click();
        var up = sorted(columnValues(tables[t], i), 1);
        ths[i].click();
        var down = sorted(columnValues(tables[t], i), -1);
        return up && down ? 'pass' : 'fail: ' + (up ? 'descending' : 'ascending') + ' order wrong in table ' + t;
      }
    }
    return 'fail: no sortable numeric column with 3 rows';
  }
  window.addEventListener('load', function () {
    var imgs = Array.prototype.slice.call(document.images);
    var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
    var b = document.body;
    b.setAttribute('data-images', String(imgs.length));
    b.setAttribute('data-images-broken', String(broken));
    var overflow = imgs.filter(function (i) {  // a picture wider than its card would be cut off
      var box = (i.closest('figure') || b).getBoundingClientRect();
      return i.getBoundingClientRect().right > box.right + 1;
    }).length;
    b.setAttribute('data-images-overflow', String(overflow));
    b.setAttribute('data-tables', String(document.querySelectorAll('table').length));
    if (location.hash === '#selftest') b.setAttribute('data-selftest', selftest());
    b.setAttribute('data-render', broken ? 'broken-images' : 'ok');
  });
})();
"""


# --------------------------------------------------------------------------- small HTML helpers
def _num(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return escape(str(v))


def _sort_key(v: object) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return repr(float(v)) if isinstance(v, (int, float, np.integer, np.floating)) else escape(str(v), quote=True)


def table(columns: Sequence[str], rows: Iterable[Sequence[object]], *, numeric: Sequence[bool] | None = None,
          sort_keys: Iterable[Sequence[object]] | None = None, best: Sequence[bool] | None = None,
          caption: str = "") -> str:
    """A sortable HTML table; ``sort_keys`` (per cell) override the text used for sorting."""
    rows = [list(r) for r in rows]
    numeric = list(numeric) if numeric is not None else [False] * len(columns)
    keys = [list(k) for k in sort_keys] if sort_keys is not None else [[None] * len(columns) for _ in rows]
    best = list(best) if best is not None else [False] * len(rows)
    num_attr = ' data-type="number"'
    head = "".join(f'<th scope="col"{num_attr if n else ""}>{escape(c)}</th>' for c, n in zip(columns, numeric))
    body = []
    for r, k, b in zip(rows, keys, best):
        cells = []
        for j, v in enumerate(r):
            is_number = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            key = k[j] if k[j] is not None else (v if is_number else None)
            sk = f' data-sort="{_sort_key(key)}"' if key is not None else ""
            cls = ' class="num"' if numeric[j] else ""
            text = _num(v) if is_number else escape(str(v))
            cells.append(f"<td{cls}{sk}>{text}</td>")
        row_cls = ' class="best"' if b else ""
        body.append(f"<tr{row_cls}>{''.join(cells)}</tr>")
    cap = f"<caption class='muted'>{escape(caption)}</caption>" if caption else ""
    return (f'<div class="table-wrap"><table class="sortable">{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(path: Path, caption: str, alt: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return (f'<figure{cls}><img src="{png_data_uri(path)}" alt="{escape(alt, quote=True)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _ci(lo: object, hi: object) -> str:
    if lo is None or hi is None or (isinstance(lo, float) and lo != lo) or (isinstance(hi, float) and hi != hi):
        return ""
    return f"[{float(lo):.3f}, {float(hi):.3f}]"


def _label(backbone: str, weights: str) -> str:
    return f"{backbone} ({weights})"


# --------------------------------------------------------------------------- sections
def _overview(out: Path, df: pd.DataFrame, summary: pd.DataFrame) -> str:
    counts = {}
    with sqlite3.connect(out / "results.db") as conn:
        for status, n in conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            counts[status] = n
    experiments = ", ".join(sorted(df["experiment"].unique())) if not df.empty else "—"
    items = [("experiment(s)", experiments), ("datasets", ", ".join(summary["dataset"].unique()) or "—"),
             ("backbones", ", ".join(sorted({_label(b, w) for b, w in zip(summary["backbone"], summary["weights"])}))
              or "—"),
             ("runs", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")]
    rows = "".join(f"<tr><th scope='row'>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in items)
    return f"<table class='overview'><tbody>{rows}</tbody></table>"


def _headline(summary: pd.DataFrame, headline: dict[str, str | None]) -> str:
    parts = []
    for dataset in summary["dataset"].unique():
        metric = headline.get(dataset)
        sub = summary[(summary["dataset"] == dataset) & (summary["metric"] == metric) &
                      (summary["protocol"] != "fewshot")]
        if sub.empty:
            continue
        best_value = sub["mean"].max()
        rows, keys, best = [], [], []
        for r in sub.itertuples():
            rows.append([r.backbone, r.weights, r.protocol, r.variant, int(r.n), r.mean, r.sd, _ci(r.ci_low, r.ci_high)])
            keys.append([None, None, None, None, None, None, None, r.ci_low])
            best.append(bool(r.mean == best_value))
        parts.append(f"<h3 id='ds-{escape(_slug(dataset))}'>{escape(dataset)} — {escape(str(metric))}</h3>")
        parts.append(table(["backbone", "weights", "protocol", "variant", "seeds", f"{metric} mean", "sd", "95% CI"],
                           rows, numeric=[False, False, False, False, True, True, True, False], sort_keys=keys,
                           best=best))
    return "".join(parts) or "<p class='note'>No headline results.</p>"


def _fewshot(summary: pd.DataFrame, headline: dict[str, str | None], figs: list[Path]) -> str:
    fs = summary[summary["protocol"] == "fewshot"]
    if fs.empty:
        return "<p class='note'>No few-shot results in this run.</p>"
    parts = []
    for dataset in fs["dataset"].unique():
        metric = headline.get(dataset)
        sub = fs[(fs["dataset"] == dataset) & (fs["metric"] == metric)].copy()
        parsed = sub["variant"].str.extract(_FEWSHOT)
        sub = sub.join(parsed).dropna(subset=["shots"])
        if sub.empty:
            continue
        sub["shots"] = sub["shots"].astype(int)
        shots = sorted(sub["shots"].unique())
        rows, keys = [], []
        for (backbone, weights, probe), g in sub.groupby(["backbone", "weights", "probe"], sort=False):
            by = {int(s): r for s, r in zip(g["shots"], g.itertuples())}
            cells = [f"{by[s].mean:.3f} ± {by[s].sd:.3f}" if s in by else "" for s in shots]
            rows.append([backbone, weights, probe, *cells])
            keys.append([None, None, None, *[by[s].mean if s in by else "" for s in shots]])
        parts.append(f"<h3>{escape(dataset)} — {escape(str(metric))} vs patients per class</h3>")
        parts.append(table(["backbone", "weights", "probe", *[f"{s}-shot" for s in shots]], rows,
                           numeric=[False, False, False, *[True] * len(shots)], sort_keys=keys,
                           caption="mean ± sd over seeds and repeats"))
    pics = [figure(p, escape(p.stem.replace("_", " ")), p.stem) for p in figs]
    if pics:
        parts.append(f"<div class='figs'>{''.join(pics)}</div>")
    return "".join(parts) or "<p class='note'>No few-shot results in this run.</p>"


def _segmentation(summary: pd.DataFrame, headline: dict[str, str | None], figs: dict[str, list[Path]]) -> str:
    parts = []
    for dataset in summary["dataset"].unique():
        metric = headline.get(dataset)
        if metric not in _SEGMENTATION:
            continue
        sub = summary[(summary["dataset"] == dataset) & (summary["metric"] == metric)]
        labels = list(dict.fromkeys(_label(b, w) for b, w in zip(sub["backbone"], sub["weights"])))
        rows, keys = [], []
        for (protocol, variant), g in sub.groupby(["protocol", "variant"], sort=False):
            cell = {_label(r.backbone, r.weights): r for r in g.itertuples()}
            rows.append([protocol, variant, *[f"{cell[lab].mean:.3f} ± {cell[lab].sd:.3f} "
                                              f"{_ci(cell[lab].ci_low, cell[lab].ci_high)}".strip()
                                              if lab in cell else "" for lab in labels]])
            keys.append([None, None, *[cell[lab].mean if lab in cell else "" for lab in labels]])
        parts.append(f"<h3>{escape(dataset)} — {escape(metric)} by decoder</h3>")
        parts.append(table(["protocol", "decoder / variant", *labels], rows,
                           numeric=[False, False, *[True] * len(labels)], sort_keys=keys,
                           caption="mean ± sd over seeds [mean bootstrap 95% CI]"))
        pics = [figure(p, escape(p.stem.replace("_", " ")), p.stem) for p in figs.get(dataset, [])]
        if pics:
            parts.append(f"<div class='figs'>{''.join(pics)}</div>")
    return "".join(parts) or "<p class='note'>No segmentation results in this run.</p>"


def _ranking(summary: pd.DataFrame, tmp: Path) -> tuple[str, bool]:
    from medprobe.analysis.ranking import average_ranks, dataset_scores, plot_ranking
    from medprobe.errors import MedprobeError
    scores = dataset_scores(summary)
    if scores.empty:
        return "<p class='note'>No classification or segmentation results to rank.</p>", False
    ranking = average_ranks(scores)
    fams = ranking.families()
    rows, keys = [], []
    for r in ranking.average.itertuples():
        rows.append([r.backbone, r.classification_rank, r.n_classification, r.segmentation_rank, r.n_segmentation])
    html = table(["backbone", "classification rank", "classification datasets", "segmentation rank",
                  "segmentation datasets"], rows, numeric=[False, True, True, True, True],
                 caption="average rank over datasets; rank 1 = best; ties share the average rank")
    if len(fams) < 2:
        return (f"<p class='note'>The cross-task scatter needs classification and segmentation results; this run has "
                f"{escape(' and '.join(fams) or 'neither')} only.</p>" + html), False
    try:
        path = plot_ranking(ranking, tmp / "ranking.png")
    except MedprobeError as e:
        return f"<p class='note'>{escape(str(e))}</p>" + html, False
    fig = figure(path, "Average rank on segmentation (x) vs classification (y); top right is best on both.",
                 "cross-task ranking scatter")
    return f"<div class='figs'>{fig}</div>" + html, True


def _analysis(out: Path, skip_ranking: bool) -> str:
    root = out / "analysis"
    pngs = sorted(root.rglob("*.png")) if root.is_dir() else []
    if skip_ranking:
        pngs = [p for p in pngs if not (p.parent.name == "ranking" and p.name == "ranking.png")]
    if not pngs:
        return ("<p class='note'>No analysis pictures under <code>analysis/</code>; create them with "
                "<code>medprobe analyze pca|cka|attention|correspondence ... --out "
                f"{escape(str(root))}/NAME</code>.</p>")
    figs = []
    for p in pngs:
        meta: dict = {}
        side = p.with_suffix(".json")
        if side.is_file():
            try:
                meta = json.loads(side.read_text())
            except (OSError, ValueError):
                meta = {}
        rel = p.relative_to(out).as_posix()
        cap = f"<b>{escape(str(meta.get('title', p.stem)))}</b><br>" if meta.get("title") else ""
        if meta.get("description"):
            cap += escape(str(meta["description"])) + "<br>"
        cap += f"<code>{escape(rel)}</code>"
        figs.append(figure(p, cap, str(meta.get("title", rel)), wide=True))
    return f"<div class='figs'>{''.join(figs)}</div>"


def _failed(out: Path) -> str:
    with sqlite3.connect(out / "results.db") as conn:
        rows = conn.execute("SELECT dataset, backbone, weights, protocol, variant, seed, error FROM runs "
                            "WHERE status = 'failed' ORDER BY dataset, backbone, variant, seed").fetchall()
    if not rows:
        return ""
    return ("<h2 id='failed'>Failed runs</h2>" +
            table(["dataset", "backbone", "weights", "protocol", "variant", "seed", "error"],
                  [[*r[:6], (r[6] or "")[:300]] for r in rows], numeric=[False] * 5 + [True, False]))


def _all_metrics(summary: pd.DataFrame) -> str:
    rows = [[r.dataset, r.backbone, r.weights, r.protocol, r.variant, r.metric, int(r.n), r.mean, r.sd, r.ci_low,
             r.ci_high] for r in summary.itertuples()]
    return table(["dataset", "backbone", "weights", "protocol", "variant", "metric", "n", "mean", "sd", "CI low",
                  "CI high"], rows, numeric=[False] * 6 + [True] * 5)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def render_html(output_dir: str | Path) -> str:
    """The report page of ``output_dir`` as one HTML string."""
    from medprobe.results.plots import fewshot_curves, protocol_bars
    out = Path(output_dir)
    df = load_results(out)
    summary = summarize(df)
    headline = {d: headline_metric(summary, d) for d in summary["dataset"].unique()}
    with tempfile.TemporaryDirectory(prefix="medprobe-html-") as tmpdir:
        tmp = Path(tmpdir)
        fs_figs = fewshot_curves(summary, tmp) if not summary.empty else []
        seg_summary = summary[summary["dataset"].map(lambda d: headline.get(d) in _SEGMENTATION)]
        bar_figs = protocol_bars(seg_summary, tmp, headline) if not seg_summary.empty else []
        seg_figs: dict[str, list[Path]] = {}
        for p in bar_figs:
            for d in seg_summary["dataset"].unique():
                if p.stem.startswith("bars_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", d).strip("_") + "_"):
                    seg_figs.setdefault(d, []).append(p)
        ranking_html, ranked = _ranking(summary, tmp)
        sections = [
            ("overview", "Overview", _overview(out, df, summary)),
            ("results", "Results", "<p class='note'>Headline metric per dataset: mean over seeds ± sd and the mean "
             "bootstrap 95% confidence interval on the test split. The best mean of each dataset is highlighted; "
             "few-shot results have their own section. Click a column header to sort.</p>" + _headline(summary, headline)),
            ("fewshot", "Few-shot curves", _fewshot(summary, headline, fs_figs)),
            ("decoders", "Segmentation decoders", _segmentation(summary, headline, seg_figs)),
            ("ranking", "Cross-task ranking", ranking_html),
            ("analysis", "Looking inside the features", _analysis(out, ranked)),
        ]
        body = "".join(f"<h2 id='{sid}'>{escape(title)}</h2>{content}" for sid, title, content in sections)
    body += _failed(out)
    body += ("<h2 id='all'>All metrics</h2><details><summary>every metric of every configuration "
             f"({len(summary)} rows)</summary>{_all_metrics(summary)}</details>")
    nav = "".join(f"<a href='#{sid}'>{escape(t)}</a>" for sid, t in
                  [("overview", "Overview"), ("results", "Results"), ("fewshot", "Few-shot"),
                   ("decoders", "Decoders"), ("ranking", "Ranking"), ("analysis", "Analysis"), ("all", "All metrics")])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>medprobe report — {escape(out.resolve().name)}</title><style>{CSS}</style></head>"
            f"<body data-render='pending'><h1>medprobe report</h1><p class='muted'>{escape(str(out.resolve()))} · "
            f"generated {stamp}</p><nav>{nav}</nav>{body}<script>{JS}</script></body></html>\n")


def write_html_report(output_dir: str | Path) -> Path:
    """Write ``OUTPUT_DIR/report.html`` (self-contained) and return its path."""
    out = Path(output_dir)
    page = render_html(out)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
