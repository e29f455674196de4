"""The frozen-feature benchmark of issue 3 on real PneumoniaMNIST.

Writes the issue's experiment YAML (paths relative to the project root), runs it with
``medprobe run`` semantics (resumable; results in runs/pneumonia-frozen/results.db) and
prints the report table.

    python benchmarks/pneumoniamnist_frozen.py [--data ../shared/data/medmnist/pneumoniamnist.npz]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from medprobe.experiment.cli import run_and_report
from medprobe.experiment.config import load_experiment

EXPERIMENT = """\
name: pneumonia-frozen
output_dir: runs/pneumonia-frozen
seeds: [0, 1, 2]
image_size: 56
datasets:
  pneumonia: {adapter: medmnist, root: ../shared/data/medmnist/pneumoniamnist.npz}
backbones:
  vits14-random: {name: dinov2_vits14, weights: random}
protocols:
  knn: {k: [10, 20, 100, 200], temperature: 0.07}
  linear: {inputs: [cls, cls+mean], blocks: [1, 4], epochs: 10}
  fewshot: {shots: [1, 2, 4, 8, 16], repeats: 5}
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/medmnist/pneumoniamnist.npz")
    ap.add_argument("--out", default="runs/pneumonia-frozen.yaml")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        print(f"PneumoniaMNIST not found at {args.data}; pass --data PATH", file=sys.stderr)
        return 2
    raw = yaml.safe_load(EXPERIMENT)
    raw["datasets"]["pneumonia"]["root"] = args.data
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return run_and_report(load_experiment(path), quiet=True)


if __name__ == "__main__":
    sys.exit(main())
