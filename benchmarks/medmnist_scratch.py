"""Real-data acceptance for issue 4: ResNet-18 from scratch on PneumoniaMNIST at 28 px.

Runs the project's own ``scratch`` protocol through the experiment runner (a fresh output
folder each time: nothing is reused from an earlier run) for three seeds: ResNet-18 with the
CIFAR-style stem (3x3 stride-1 first convolution, no max-pool), Adam, lr 1e-3, cross-entropy,
no augmentation, model selected on validation AUROC, scored on the official test split.
The MedMNIST v2 paper reports AUC 0.944 / ACC 0.854 for this setting (100 epochs, batch 128).
To fit 20 minutes on 2 CPU cores (about 4 minutes of compute per epoch) this trains one
epoch per seed, with batch 32 (four times the updates of batch 128 for the same compute),
cosine decay to 0, validation twice per epoch and class-balanced cross-entropy
(``--no-class-weighting`` for the plain loss, ``--batch-size 128`` for the reference batch).

    python benchmarks/medmnist_scratch.py [--data ../shared/data/medmnist/pneumoniamnist.npz] [--epochs N]

The last two lines are ``test auroc: X`` and ``test accuracy: Y`` (means over the seeds).
"""
from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

PUBLISHED = {"auroc": 0.944, "accuracy": 0.854}


def experiment(data: str, out: Path, args: argparse.Namespace) -> dict:
    return {
        "name": "medmnist-scratch",
        "output_dir": str(out),
        "seeds": list(range(args.seeds)),
        "image_size": 28,
        "precision": "fp32",
        "batch_size": 256,  # evaluation batch; training batch below
        "bootstrap": 0,
        "datasets": {"pneumoniamnist": {"adapter": "medmnist", "root": data}},
        "backbones": {"resnet18": {"name": "resnet18", "weights": "random"}},
        "protocols": {"scratch": {
            "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "adam", "lr": 1e-3,
            "weight_decay": 0.0, "warmup_epochs": 0, "schedule": "cosine", "grad_clip": None,
            "augment": [], "patience": None, "select_metric": "auroc", "evals_per_epoch": args.evals_per_epoch,
            "small_input_stem": "on", "class_weighting": args.class_weighting}},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/medmnist/pneumoniamnist.npz")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--evals-per-epoch", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--class-weighting", action=argparse.BooleanOptionalAction, default=True,
                    help="class-balanced cross-entropy (default on; --no-class-weighting for plain CE)")
    args = ap.parse_args()
    if not Path(args.data).is_file():
        print(f"PneumoniaMNIST not found at {args.data}; pass --data PATH", file=sys.stderr)
        return 2
    import torch

    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import run_experiment

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="medmnist-scratch-") as tmp:
        out = Path(tmp) / "out"
        path = Path(tmp) / "experiment.yaml"
        path.write_text(yaml.safe_dump(experiment(str(Path(args.data).resolve()), out, args), sort_keys=False))
        summary = run_experiment(load_experiment(path), progress=False, log=print)
        if summary.failed:
            print(f"{len(summary.failed)} unit(s) failed: {summary.failed}", file=sys.stderr)
            return 1
        with sqlite3.connect(out / "results.db") as c:
            rows = c.execute("SELECT r.seed, m.metric, m.value FROM metrics m JOIN runs r ON r.key = m.run_key "
                             "WHERE m.class IS NULL AND r.protocol = 'scratch' ORDER BY r.seed").fetchall()
    by_seed: dict[int, dict[str, float]] = {}
    for seed, metric, value in rows:
        by_seed.setdefault(seed, {})[metric] = value
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"ResNet-18 from scratch, PneumoniaMNIST 28 px, {args.epochs} epoch(s), batch {args.batch_size}, "
          f"Adam lr 1e-3 cosine, {'class-balanced ' if args.class_weighting else ''}cross-entropy, selected on val AUROC "
          f"({args.evals_per_epoch} evaluations per epoch)")
    for seed, m in sorted(by_seed.items()):
        print(f"  seed {seed}: test auroc {m['auroc']:.4f}  accuracy {m['accuracy']:.4f}  "
              f"best at epoch {m['epochs_to_best']:.2f}  train {m['train_wall_s']:.0f} s  "
              f"inference {m['inference_ms_per_sample']:.2f} ms/image  peak {m['peak_memory_mb']:.0f} MB")
    auc = float(np.mean([m["auroc"] for m in by_seed.values()]))
    acc = float(np.mean([m["accuracy"] for m in by_seed.values()]))
    sd = lambda k: float(np.std([m[k] for m in by_seed.values()], ddof=1)) if len(by_seed) > 1 else 0.0  # noqa: E731
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"mean of {len(by_seed)} seeds: auroc {auc:.4f} ± {sd('auroc'):.4f}, accuracy {acc:.4f} ± {sd('accuracy'):.4f}")
    print(f"published (MedMNIST v2, ResNet-18 28): auroc {PUBLISHED['auroc']}, accuracy {PUBLISHED['accuracy']}; "
          f"within 0.01: auroc {auc >= PUBLISHED['auroc'] - 0.01}, accuracy {acc >= PUBLISHED['accuracy'] - 0.01}")
    print(f"wall time {wall:.0f} s, CPU time {cpu + children.ru_utime + children.ru_stime:.0f} s "
          f"({os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()})")
    print(f"test auroc: {auc:.4f}")
    print(f"test accuracy: {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
