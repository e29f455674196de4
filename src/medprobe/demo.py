"""``medprobe demo``: the whole frozen-feature benchmark, offline, in a minute or two.

Writes ``experiment.yaml`` into the output folder (the demo is an ordinary experiment you
can rerun or edit) and runs it on phantom chest radiographs with two randomly initialised
backbones. The phantom's finding is a large consolidation (``finding=consolidation``), which
even a frozen random network sees, so the probes land clearly above chance and the few-shot
curve rises with the number of labelled images; the demo ends by printing those numbers
against chance. (On the default phantom, a small nodule, random features stay at chance:
that task is for pretrained weights, ``--vit-weights`` / ``--cnn-weights``.)
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Any

import yaml

DEMO_SIZE = 56
DEMO_DATASET = "phantom-cxr"


def demo_experiment(out: Path, weights_vit: str = "random", weights_cnn: str = "random", n: int = 400) -> dict:
    """The demo's experiment (as written to ``experiment.yaml``)."""
    return {
        "name": "medprobe-demo",
        "output_dir": str(out),
        "seeds": [0, 1, 2],
        "image_size": DEMO_SIZE,
        "bootstrap": 200,
        "datasets": {DEMO_DATASET: {"adapter": "phantom", "n": n, "size": 64, "seed": 0,
                                    "finding": "consolidation"}},
        "backbones": {
            "vits14": {"name": "dinov2_vits14", "weights": weights_vit},
            "resnet18": {"name": "resnet18", "weights": weights_cnn},
        },
        "protocols": {
            "knn": {"k": [10, 20]},
            "linear": {"inputs": ["cls", "cls+mean"], "blocks": [1, 4], "epochs": 10},
            "fewshot": {"shots": [1, 4, 16, 64], "repeats": 3},
            "metadata": {"columns": ["sex"], "probes": ["linear"]},
        },
    }


def highlights(output_dir: Path) -> list[str]:
    """What a newcomer should read in the demo's results: each backbone's best probe against
    chance, and its few-shot curve (AUROC by number of labelled images per class)."""
    from medprobe.results.tables import load_results, summarize
    s = summarize(load_results(output_dir))
    s = s[(s["dataset"] == DEMO_DATASET) & (s["metric"] == "auroc")]
    if s.empty:
        return []
    lines = ["What the demo shows (test AUROC; chance = 0.50; mean over seeds [bootstrap 95% CI]):"]
    for backbone, g in s.groupby("backbone", sort=True):
        full = g[g["protocol"].isin(["knn", "linear"])].dropna(subset=["mean"])
        if not full.empty:
            best = full.loc[full["mean"].idxmax()]
            lines.append(f"  {backbone:<9} best full-data probe: {best['variant']}: {_fmt(best)}")
        shots = g[(g["protocol"] == "fewshot") & g["variant"].astype(str).str.contains("linear")]
        curve = sorted(((_shots(v), m) for v, m in zip(shots["variant"], shots["mean"]) if _shots(v)),
                       key=lambda t: t[0])
        if curve:
            lines.append(f"  {backbone:<9} few-shot linear: " + ", ".join(f"{k}-shot {m:.2f}" for k, m in curve))
    return lines


def _shots(variant: Any) -> int | None:
    """The number of shots in a variant label such as ``fewshot linear 16-shot``."""
    m = re.search(r"(\d+)-shot", str(variant))
    return int(m.group(1)) if m else None


def _fmt(row: Any) -> str:
    lo, hi = row.get("ci_low"), row.get("ci_high")
    known = lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi)
    ci = f" [{lo:.2f}, {hi:.2f}]" if known else ""
    return f"{row['mean']:.2f}{ci}"


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline frozen-feature benchmark on phantom chest radiographs")
    p.add_argument("--out", default="medprobe-demo", help="output folder (default: medprobe-demo)")
    p.add_argument("--vit-weights", default="random", help="weights for the ViT-S/14 (default: random)")
    p.add_argument("--cnn-weights", default="random", help="weights for the ResNet-18 (default: random)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from medprobe.experiment.cli import run_and_report
    from medprobe.experiment.config import load_experiment
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "experiment.yaml"
    cfg_path.write_text(yaml.safe_dump(demo_experiment(out, args.vit_weights, args.cnn_weights), sort_keys=False))
    print(f"demo experiment written to {cfg_path} (rerun it with `medprobe run {cfg_path}`)")
    rc = run_and_report(load_experiment(cfg_path), args.quiet)
    for line in highlights(out):
        print(line)
    return rc
