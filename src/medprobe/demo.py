"""``medprobe demo``: the whole frozen-feature benchmark, offline, in a few minutes.

Writes ``experiment.yaml`` into the output folder (the demo is an ordinary experiment you
can rerun or edit) and runs it on phantom chest radiographs with two backbones.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

DEMO_SIZE = 56


def demo_experiment(out: Path, weights_vit: str = "random", weights_cnn: str = "random", n: int = 400) -> dict:
    return {
        "name": "medprobe-demo",
        "output_dir": str(out),
        "seeds": [0, 1, 2],
        "image_size": DEMO_SIZE,
        "bootstrap": 200,
        "datasets": {"phantom-cxr": {"adapter": "phantom", "n": n, "size": 64, "seed": 0}},
        "backbones": {
            "vits14": {"name": "dinov2_vits14", "weights": weights_vit},
            "resnet18": {"name": "resnet18", "weights": weights_cnn},
        },
        "protocols": {
            "knn": {"k": [10, 20, 100]},
            "linear": {"inputs": ["cls", "cls+mean"], "blocks": [1, 4], "epochs": 10},
            "fewshot": {"shots": [1, 4, 16], "repeats": 3},
            "metadata": {"columns": ["sex"], "probes": ["linear"]},
        },
    }


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
    return run_and_report(load_experiment(cfg_path), args.quiet)
