"""Issue 14 item 4: the PneumoniaMNIST grid run sequentially and with ``--workers N``; wall times and equality.

The same experiment (PneumoniaMNIST at 28 px, a random-init ViT and ResNet, knn + linear +
few-shot and one fine-tuning unit per seed) is run twice in fresh folders: once in one process,
once with ``--workers N`` (feature stores extracted once by the parent, units run in N worker
processes, each with cpu_count / N torch threads). Prints both wall times, their ratio, and the
largest difference of the non-timing metrics per protocol. Frozen protocols must be identical;
trained ones are reported: a worker's torch uses cpu_count / N threads, another float reduction
order, which training amplifies (run a unit with the same thread count and it is identical).

    python benchmarks/workers_grid.py [--workers 2] [--data ../shared/data/medmnist/pneumoniamnist.npz]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import yaml

EXPERIMENT = {
    "name": "workers-grid", "seeds": [0, 1], "image_size": 28, "precision": "fp32", "bootstrap": 200,
    "datasets": {"pneumonia": {"adapter": "medmnist", "root": None}},
    "backbones": {"vit": {"name": "dinov2_vits14", "weights": "random", "tiny": True},
                  "resnet": {"name": "resnet18", "weights": "random", "tiny": True}},
    "protocols": {"knn": {"k": [10, 20, 100]}, "linear": {"epochs": 10},
                  "fewshot": {"shots": [1, 4, 16], "repeats": 3},
                  "finetune": {"epochs": 1, "batch_size": 64, "augment": []}},
}
TIMING = re.compile(r"(_s$|_s_|ms|latency|memory|throughput|per_second)")


def metrics(out: Path) -> dict:
    with sqlite3.connect(out / "results.db") as c:
        rows = c.execute("SELECT m.run_key, m.split, m.metric, IFNULL(m.class, ''), m.value, r.protocol FROM metrics m "
                         "JOIN runs r ON r.key = m.run_key WHERE r.status = 'done'").fetchall()
    return {r[:4]: (r[4], r[5]) for r in rows if not TIMING.search(r[2])}


def compare(root: Path) -> bool:
    a, b = metrics(root / "seq" / "out"), metrics(root / "par" / "out")
    if a.keys() != b.keys():
        print(f"different units or metrics: {len(set(a) ^ set(b))} keys differ")
        return False
    worst: dict[str, float] = {}
    for k, (va, proto) in a.items():
        vb = b[k][0]
        d = 0.0 if (va == vb or (va != va and vb != vb)) else abs(va - vb)
        worst[proto] = max(worst.get(proto, 0.0), d)
    ok = True
    for proto, d in sorted(worst.items()):
        trained = proto in ("finetune", "lora", "bitfit", "deit_head", "freeze_blocks", "first_blocks", "scratch")
        good = trained or d == 0.0
        ok &= good
        print(f"  {proto:<10} max |diff| {d:.2e}  ({'trained: thread-count rounding, reported' if trained else 'frozen: must be 0'})"
              f"{'' if good else '  FAILED'}")
    print(f"{len(a)} metric values compared (timings excluded): {'frozen identical' if ok else 'DIFFERENT'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/medmnist/pneumoniamnist.npz")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--root", default="runs/workers-grid")
    ap.add_argument("--compare-only", action="store_true", help="compare the two finished runs under --root")
    args = ap.parse_args()
    if args.compare_only:
        return 0 if compare(Path(args.root)) else 1
    if not Path(args.data).is_file():
        print(f"PneumoniaMNIST not found at {args.data}; pass --data PATH", file=sys.stderr)
        return 2
    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import run_experiment
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    walls = {}
    for mode, workers in (("sequential", 1), (f"--workers {args.workers}", args.workers)):
        folder = root / ("seq" if workers == 1 else "par")
        raw = dict(EXPERIMENT, output_dir=str(folder / "out"), cache_dir=str(folder / "cache"))
        raw["datasets"] = {"pneumonia": {"adapter": "medmnist", "root": args.data}}
        folder.mkdir(parents=True)
        (folder / "exp.yaml").write_text(yaml.safe_dump(raw))
        t = time.perf_counter()
        summary = run_experiment(load_experiment(folder / "exp.yaml"), progress=False, log=lambda s: None,
                                 workers=workers)
        walls[mode] = time.perf_counter() - t
        print(f"{mode:>12}: {summary.done} units, {len(summary.failed)} failed, wall {walls[mode]:.1f} s")
    same = compare(root)
    print(f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(f"sequential/workers wall ratio: {walls['sequential'] / walls[f'--workers {args.workers}']:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
