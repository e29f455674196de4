"""The self-contained HTML report (rendered in headless Chromium) and the ranking command on a results.db."""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from medprobe.cli import main

RUNS = """
CREATE TABLE runs (key TEXT PRIMARY KEY, experiment TEXT NOT NULL, dataset TEXT NOT NULL, backbone TEXT NOT NULL,
    weights TEXT NOT NULL, protocol TEXT NOT NULL, variant TEXT NOT NULL, params_json TEXT NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL, started_at REAL, finished_at REAL, wall_s REAL, info_json TEXT, error TEXT);
CREATE TABLE metrics (run_key TEXT NOT NULL, split TEXT NOT NULL, metric TEXT NOT NULL, class TEXT, value REAL,
    ci_low REAL, ci_high REAL, note TEXT);
"""

# Scores per (dataset, backbone): classification AUROC or segmentation Dice.
# cls-a: vit 0.90, rad 0.90 (tie), cnn 0.70 -> ranks 1.5, 1.5, 3
# cls-b: rad 0.95, vit 0.85, cnn 0.80       -> ranks 2, 1, 3 (vit 2, rad 1)
# seg-a: vit 0.80, cnn 0.75, rad 0.60       -> ranks 1, 2, 3
# seg-b: cnn 0.70, vit 0.65, rad 0.50       -> vit 2, cnn 1, rad 3
SCORES = {
    "cls-a": {"dinov2_vits14": 0.90, "rad_dino": 0.90, "resnet18": 0.70},
    "cls-b": {"dinov2_vits14": 0.85, "rad_dino": 0.95, "resnet18": 0.80},
    "seg-a": {"dinov2_vits14": 0.80, "rad_dino": 0.60, "resnet18": 0.75},
    "seg-b": {"dinov2_vits14": 0.65, "rad_dino": 0.50, "resnet18": 0.70},
}
EXPECTED_RANKS = {"dinov2_vits14": (1.75, 1.5), "rad_dino": (1.25, 3.0), "resnet18": (3.0, 1.5)}


def make_results_db(out: Path) -> Path:
    """A results.db with classification (linear, knn, few-shot) and segmentation (two decoders) results."""
    out.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(out / "results.db")
    conn.executescript(RUNS)
    n = 0

    def add(dataset: str, backbone: str, protocol: str, variant: str, seed: int, metrics: dict[str, float],
            status: str = "done", error: str | None = None) -> None:
        nonlocal n
        n += 1
        key = f"k{n:04d}"
        conn.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     (key, "html-test", dataset, backbone, "random" if backbone == "resnet18" else "hub", protocol,
                      variant, "{}", seed, status, 0.0, 1.0, 1.0, json.dumps({}), error))
        if status == "done":
            for metric, value in metrics.items():
                conn.execute("INSERT INTO metrics VALUES (?,?,?,?,?,?,?,?)",
                             (key, "test", metric, None, value, value - 0.04, min(1.0, value + 0.04), None))
            conn.execute("INSERT INTO metrics VALUES (?,?,?,?,?,?,?,?)", (key, "test", "auroc" if "cls" in dataset
                         else "dice", "class_1", 0.5, None, None, None))

    for dataset, scores in SCORES.items():
        for backbone, score in scores.items():
            for seed in (0, 1):
                jitter = 0.01 * (seed - 0.5)
                if dataset.startswith("cls"):
                    add(dataset, backbone, "linear", "linear cls@1", seed, {"auroc": score + jitter, "accuracy": score - 0.1})
                    add(dataset, backbone, "knn", "knn k=20", seed, {"auroc": score - 0.05 + jitter})
                    for shots in (1, 4, 16):
                        add(dataset, backbone, "fewshot", f"fewshot logreg {shots}-shot", seed,
                            {"auroc": score - 0.3 / shots + jitter})
                else:
                    add(dataset, backbone, "segmentation", "linear decoder", seed,
                        {"dice_jaccard_mean": score - 0.1 + jitter, "dice": score - 0.08})
                    add(dataset, backbone, "segmentation", "unet decoder", seed,
                        {"dice_jaccard_mean": score + jitter, "dice": score + 0.02})
    add("cls-a", "resnet18", "linear", "linear cls@4", 0, {}, status="failed", error="CUDA out of memory (example)")
    conn.commit()
    conn.close()
    return out / "results.db"


def _analysis_picture(out: Path) -> None:
    from medprobe.analysis import images_from_dataset, patch_pca, write_pca
    from medprobe.backbones import create_backbone
    bb = create_backbone("dinov2_vits14", "random", tiny=True)
    imgs = images_from_dataset("phantom", None, {"n": 8, "size": 32}, n=8)  # a wide figure (8 columns)
    result, display = patch_pca(bb, imgs, image_size=28)
    write_pca(result, display, imgs.names, out / "analysis" / "pca", title="PCA test picture")


def test_ranking_command_with_ties(tmp_path, capsys):
    make_results_db(tmp_path / "run")
    assert main(["analyze", "ranking", str(tmp_path / "run")]) == 0
    import pandas as pd
    avg = pd.read_csv(tmp_path / "run" / "analysis" / "ranking" / "ranking.csv").set_index("backbone")
    for backbone, (cls_rank, seg_rank) in EXPECTED_RANKS.items():
        assert avg.loc[backbone, "classification_rank"] == pytest.approx(cls_rank)
        assert avg.loc[backbone, "segmentation_rank"] == pytest.approx(seg_rank)
        assert avg.loc[backbone, "n_classification"] == 2 and avg.loc[backbone, "n_segmentation"] == 2
    per = pd.read_csv(tmp_path / "run" / "analysis" / "ranking" / "ranking_per_dataset.csv")
    tie = per[per["dataset"] == "cls-a"].set_index("backbone")["rank"]
    assert tie["dinov2_vits14"] == tie["rad_dino"] == 1.5
    best = per[(per["dataset"] == "seg-a") & (per["backbone"] == "dinov2_vits14")].iloc[0]
    assert best["variant"] == "unet decoder"  # best variant counts
    assert (tmp_path / "run" / "analysis" / "ranking" / "ranking.png").stat().st_size > 5000
    assert "rad_dino: classification rank 1.25" in capsys.readouterr().out


def test_ranking_needs_both_families(tmp_path, capsys):
    make_results_db(tmp_path / "run")
    code = main(["analyze", "ranking", str(tmp_path / "run"), "--protocol", "linear"])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs both classification and segmentation" in err and "cls-a" in err
    assert main(["analyze", "ranking", str(tmp_path / "nowhere")]) == 2
    assert "no results database" in capsys.readouterr().err


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A run folder with results, an analysis picture and report.html written by `medprobe report --html`."""
    out = tmp_path_factory.mktemp("html") / "run"
    make_results_db(out)
    _analysis_picture(out)
    assert main(["report", str(out), "--html"]) == 0
    return out / "report.html"


def test_html_report_is_self_contained(report):
    from medprobe.results.html import write_html_report
    assert write_html_report(report.parent) == report  # the API writes the same file
    html = report.read_text()
    # no external resources: every src/href is a data URI or an in-page anchor
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", html)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs
    assert "<link" not in html and "@import" not in html and "url(" not in html
    for text in ("cls-a — auroc", "seg-a — dice_jaccard_mean by decoder", "unet decoder", "16-shot",
                 "[0.860, 0.940]", "PCA test picture", "analysis/pca/pca.png", "CUDA out of memory (example)",
                 "classification rank"):
        assert text in html, text
    # 2 few-shot curves + 2 decoder bar charts + ranking scatter + the analysis picture
    assert html.count("<img ") == 6
    assert html.count("<table class=\"sortable\">") >= 10


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    return exe


def _chrome(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={tmp}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_html_report_renders_in_chromium(report, tmp_path):
    exe = _chromium()
    page = report.resolve()
    dom = _chrome(exe, tmp_path / "profile1", "--dump-dom", page.as_uri() + "#selftest")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    assert attrs.get("data-render") == "ok", attrs
    assert attrs.get("data-images") == "6" and attrs.get("data-images-broken") == "0", attrs
    assert attrs.get("data-images-overflow") == "0", attrs  # every picture fits its card
    assert int(attrs.get("data-tables", 0)) >= 10, attrs
    assert attrs.get("data-selftest") == "pass", attrs  # clicking a header sorts ascending, then descending
    assert "data-errors" not in attrs, attrs
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    res = _chrome(exe, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,2000",
                  "--hide-scrollbars", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert not [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        assert len(im.convert("L").getcolors(1 << 16) or []) > 20  # not a blank page


# ------------------------------------------------------------------ template rendering: escaping, n/a, sections
class _Page(HTMLParser):
    """Tags, attributes and the text of every table cell of a page, as a browser's parser sees them."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[tuple[dict[str, str | None], str]] = []
        self.text: list[str] = []
        self._cell: tuple[dict[str, str | None], list[str]] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("td", "th"):
            self._cell = (dict(attrs), [])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell[1].append(data)


def _unit_db(out: Path, units: list[dict]) -> Path:
    """A results.db in the current schema with the given units (metrics: {name: (value, note)})."""
    from medprobe.results.store import SCHEMA
    out.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(out / "results.db")
    conn.executescript(SCHEMA)
    for i, u in enumerate(units):
        key = f"u{i:03d}"
        env = u.get("env")
        conn.execute("INSERT INTO runs (key, experiment, dataset, backbone, weights, protocol, variant, params_json, "
                     "seed, status, started_at, finished_at, wall_s, info_json, error, env_json) "
                     "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     (key, "t", u["dataset"], u.get("backbone", "vit_tiny"), u.get("weights", "random"),
                      u.get("protocol", "linear"), u.get("variant", "linear cls@1"), "{}", u.get("seed", 0),
                      u.get("status", "done"), float(i), float(i) + 1, 1.0, "{}", u.get("error"),
                      json.dumps(env, sort_keys=True) if env is not None else None))
        for metric, (value, note) in u.get("metrics", {}).items():
            lo, hi = (None, None) if value is None else (value - 0.05, value + 0.05)
            conn.execute("INSERT INTO metrics VALUES (?,?,?,?,?,?,?,?)",
                         (key, "test", metric, None, value, lo, hi, note))
    conn.commit()
    conn.close()
    return out


def test_html_escapes_names_paths_and_errors(tmp_path):
    """Dataset and backbone names, weights paths and error messages are text on the page, never markup."""
    from medprobe.results.html import render_html
    ds, bb = '<script>alert("ds")</script>', "vit<img src=x onerror=alert(1)>"
    weights = '/w/"><script>alert(2)</script>.pt'
    error = "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: <script>alert(3)</script> boom"
    units = [{"dataset": ds, "backbone": bb, "weights": weights, "seed": s, "metrics": {"auroc": (0.7 + 0.1 * s, None)}}
             for s in (0, 1)]
    units.append({"dataset": ds, "backbone": bb, "weights": weights, "seed": 2, "status": "failed", "error": error})
    html = render_html(_unit_db(tmp_path / "run", units))
    page = _Page(html)
    assert [t for t, _ in page.tags].count("script") == 1  # the page's own sorting script only
    assert not [t for t, _ in page.tags if t == "img"]  # no picture here: the backbone name made none
    assert not [(t, a) for t, a in page.tags if any(k.startswith("on") for k in a)]
    text = "".join(page.text)
    for s in (ds, bb, weights, "RuntimeError: <script>alert(3)</script> boom"):
        assert s in text, s  # shown verbatim as text
    assert f"{ds} — auroc" in text  # the dataset's heading
    errors = [(a, c) for a, c in page.cells if "error" in (a.get("class") or "")]
    assert errors and errors[0][1].startswith("RuntimeError: <script>alert(3)</script> boom")  # last line first
    assert "line 1" in errors[0][1]  # the full traceback, folded under the cell


def test_html_undefined_metrics_render_as_na(tmp_path):
    """A metric undefined in every seed is n/a with its reason, in tables, few-shot and segmentation; no crash."""
    from medprobe.results.html import render_html
    why = "single-class test split: AUROC undefined"
    units = []
    for s in (0, 1):
        units.append({"dataset": "flat", "seed": s, "metrics": {"auroc": (None, why)}})
        units.append({"dataset": "flat", "backbone": "resnet_tiny", "seed": s, "metrics": {"auroc": (0.6, None)}})
        for shots in (1, 4, 16):
            units.append({"dataset": "flat", "protocol": "fewshot", "variant": f"fewshot logreg {shots}-shot",
                          "seed": s, "metrics": {"auroc": (None if shots == 1 else 0.5 + shots / 100, why)}})
        units.append({"dataset": "seg", "protocol": "segmentation", "variant": "linear decoder", "seed": s,
                      "metrics": {"dice_jaccard_mean": (None, "empty masks")}})
        units.append({"dataset": "seg", "backbone": "resnet_tiny", "protocol": "segmentation",
                      "variant": "linear decoder", "seed": s, "metrics": {"dice_jaccard_mean": (0.4, None)}})
    html = render_html(_unit_db(tmp_path / "run", units))
    page = _Page(html)
    na = [(a, c) for a, c in page.cells if c == "n/a"]
    assert "nan" not in [c.lower() for _, c in page.cells]
    reasons = [a.get("title") or "" for a, _ in na]
    assert sum(why in r for r in reasons) >= 2  # headline table + few-shot 1-shot cell (+ all metrics)
    assert any("empty masks" in r for r in reasons)  # segmentation decoder table
    assert all(a.get("data-sort") == "" for a, _ in na)  # undefined values sort last
    best = [c for a, c in page.cells if c == "0.600"]
    assert best  # the defined backbone is still shown (and is the best row of "flat")


def test_html_environment_and_failed_sections(tmp_path):
    """Distinct run environments with their run counts (missing ones counted), failed units with their error."""
    import torch
    from medprobe.results.html import render_html
    from medprobe.runtime import environment
    cpu = environment(torch.device("cpu"), "fp32")
    other = {**cpu, "precision": "bf16", "packages": {**cpu["packages"], "torch": "9.9.9"}}
    units = [{"dataset": "d", "seed": s, "env": env, "metrics": {"auroc": (0.7, None)}}
             for s, env in enumerate([cpu, cpu, cpu, other, None])]
    units.append({"dataset": "d", "seed": 9, "status": "failed", "error": "DataError: label column missing",
                  "env": cpu})
    html = render_html(_unit_db(tmp_path / "run", units))
    page = _Page(html)
    env_table = html[html.index('id="environment"'):html.index('id="all"')]
    cells = [c for _, c in _Page(env_table).cells]
    assert cells[:6] == ["", "environment 1", "environment 2", "finished runs", "3", "1"]  # most used first
    assert cpu["python"] in cells and cpu["packages"]["torch"] in cells and "9.9.9" in cells and "bf16" in cells
    text = "".join(_Page(env_table).text)
    assert "differ in torch, precision" in text
    assert "1 finished run(s) recorded no environment" in text
    failed = html[html.index('id="failed"'):html.index('id="environment"')]
    assert "DataError: label column missing" in failed and "1 unit(s) failed" in failed
    assert [t for t, a in page.tags if t == "a" and a.get("href") == "#failed"]


def test_html_templates_found_in_installed_package(tmp_path):
    """The templates and static files ship in the wheel and are found through importlib.resources there."""
    import sys
    import sysconfig
    import zipfile
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("medprobe-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    for name in ("templates/report.html.j2", "templates/macros.html.j2", "static/report.css", "static/report.js"):
        assert f"medprobe/results/{name}" in names, name
    code = ("import medprobe, medprobe.results.html as h; "
            "print(medprobe.__file__); "
            "print(h.render_page([h.Section('s', 'Title <x>', intro=['a & b'])], name='n', folder='f'))")
    # -S: without site-packages' .pth files, so the editable install of the working tree is not on the path
    env = {"PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]), "PATH": os.environ["PATH"]}
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    first, page = res.stdout.split("\n", 1)
    assert Path(first).resolve().is_relative_to(site.resolve()), first
    assert "Title &lt;x&gt;" in page and "a &amp; b" in page and "window.medprobeSort" in page and "--accent" in page
