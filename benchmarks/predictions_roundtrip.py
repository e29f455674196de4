"""Acceptance of issue 12 (items 4 and 5): stored predictions reproduce the database, and backbones compare.

On real PneumoniaMNIST at 28 px with two random-init backbones (a ViT and a ResNet), knn +
linear + fewshot are run with ``medprobe run`` (resumable; runs/predictions-roundtrip), the
predictions exported with ``medprobe export-predictions``, the test AUROC of every linear unit
recomputed from the CSV with scikit-learn and compared with ``results.db``, and the
``medprobe compare`` table printed.

    python benchmarks/predictions_roundtrip.py [--data ../shared/data/medmnist/pneumoniamnist.npz]
"""
from __future__ import annotations

import argparse
import csv
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

EXPERIMENT = """\
name: predictions-roundtrip
output_dir: runs/predictions-roundtrip
cache_dir: runs/predictions-roundtrip-cache
seeds: [0, 1, 2]
image_size: 28
datasets:
  pneumonia: {adapter: medmnist, root: ../shared/data/medmnist/pneumoniamnist.npz}
backbones:
  vits14-random: {name: dinov2_vits14, weights: random}
  resnet18-random: {name: resnet18, weights: random}
protocols:
  knn: {k: [10, 20, 100]}
  linear: {inputs: [cls, cls+mean], blocks: [1, 4], epochs: 10}
  fewshot: {shots: [1, 4, 16], repeats: 3}
"""


def medprobe(*args: str) -> str:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medprobe", *args], capture_output=True, text=True)
    print(f"$ medprobe {' '.join(args)}   ({time.perf_counter() - t:.1f} s, exit {proc.returncode})")
    if proc.returncode:
        print(proc.stdout + proc.stderr)
        raise SystemExit(proc.returncode)
    return proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/medmnist/pneumoniamnist.npz")
    ap.add_argument("--yaml", default="runs/predictions-roundtrip.yaml")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        print(f"PneumoniaMNIST not found at {args.data}; pass --data PATH", file=sys.stderr)
        return 2
    raw = yaml.safe_load(EXPERIMENT)
    raw["datasets"]["pneumonia"]["root"] = args.data
    path = Path(args.yaml)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = Path(raw["output_dir"])
    print(medprobe("run", str(path), "--quiet").strip().splitlines()[-1])

    csv_path = out / "predictions.csv"
    print(medprobe("export-predictions", str(out), "--out", str(csv_path)).strip())
    scores: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with open(csv_path, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["split"] == "test":
                d = scores[r["run_key"]]
                d["y"].append(int(r["target"]))
                d["s"].append(float(r["score"]))
    with sqlite3.connect(out / "results.db") as c:
        linear = c.execute("SELECT r.key, r.backbone, r.seed, m.value FROM runs r JOIN metrics m ON m.run_key = r.key "
                           "WHERE r.protocol = 'linear' AND r.status = 'done' AND m.split = 'test' "
                           "AND m.metric = 'auroc' AND m.class IS NULL ORDER BY r.backbone, r.seed").fetchall()
        n_units = c.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
    print(f"\ntest AUROC of every linear unit: results.db vs recomputed from {csv_path} with sklearn "
          f"({n_units} units in the folder)")
    print(f"{'backbone':<18} {'seed':>4} {'n':>5} {'results.db':>12} {'sklearn(csv)':>13} {'|diff|':>10}")
    worst = 0.0
    for key, backbone, seed, value in linear:
        y, s = np.array(scores[key]["y"]), np.array(scores[key]["s"])
        auc = roc_auc_score(y, s)
        worst = max(worst, abs(auc - value))
        print(f"{backbone:<18} {seed:>4} {len(y):>5} {value:>12.8f} {auc:>13.8f} {abs(auc - value):>10.2e}")
    ok = bool(linear) and worst <= 1e-6
    print(f"max |diff| = {worst:.2e} over {len(linear)} linear units: {'OK (<= 1e-6)' if ok else 'FAILED'}\n")
    print(medprobe("compare", str(out), "--metric", "auroc"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
