"""Acceptance benchmark of issue 16: report generation from a frozen encoder on phantom chest X-rays.

Phantom radiographs with templated findings (devices, the opacity's side / zone / size,
heart size), a tiny frozen ViT encoder (random weights, tiny=True), a randomly initialised
tiny causal LM (GPT-2 configuration) whose word-level vocabulary is built from the training
reports and the prompt. The ``report_generation`` protocol runs through the experiment
runner (results.db, per-sample predictions) with ``controls: true`` and the script prints

    rouge-l: X                          the trained model on the test images
    most-frequent-report rouge-l: Y     always the most common training report
    shuffled-image rouge-l: Z           the same model given another patient's image

X must beat max(Y, Z) by at least 0.10: the image tokens carry the findings into the text.
Settings that differ from the paper's defaults (small random LM: lr 1e-3, 40 epochs, no
gradient accumulation (batch 16), at most 60 new tokens) are in EXPERIMENT below. ``--seed`` changes
the phantom data, the LM initialisation and the training seed together (a robustness check).

    python benchmarks/report_generation.py [--out runs/report-generation] [--n 1200]
"""
from __future__ import annotations

import argparse
import glob
import os
import sqlite3
import sys
import time
from pathlib import Path

import yaml

EXPERIMENT = {
    "name": "report-generation-phantom",
    "seeds": [0],
    "image_size": 112,
    "bootstrap": 500,
    "precision": "fp32",
    "batch_size": 64,
    "datasets": {"phantom": {"adapter": "phantom", "n": 1200, "size": 112, "seed": 0, "reports": True}},
    "backbones": {"vit-tiny": {"name": "dinov2_vits14", "weights": "random", "tiny": True}},
    "protocols": {"report_generation": {
        "lm_training": "full", "epochs": 40, "lr": 1e-3, "warmup": 0.03, "batch_size": 16, "grad_accum": 1,
        "max_target_tokens": 64, "max_new_tokens": 60, "decoding": "greedy", "eval_batch_size": 128,
        "controls": True}},
}
LM = {"arch": "gpt2", "layers": 3, "hidden": 128, "heads": 4, "max_positions": 256}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/report-generation")
    ap.add_argument("--n", type=int, default=EXPERIMENT["datasets"]["phantom"]["n"])
    ap.add_argument("--epochs", type=int, default=EXPERIMENT["protocols"]["report_generation"]["epochs"])
    ap.add_argument("--batch-size", type=int, default=EXPERIMENT["protocols"]["report_generation"]["batch_size"])
    ap.add_argument("--image-size", type=int, default=EXPERIMENT["image_size"])
    ap.add_argument("--seed", type=int, default=0, help="phantom data, LM initialisation and training seed")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: tiny matrices, and robust on a machine shared with other jobs)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    from medprobe.data.adapters import build_dataset
    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import run_experiment
    from medprobe.predictions import read_predictions
    from medprobe.protocols.report_generation.lm import write_scratch_lm
    from medprobe.protocols.report_generation.protocol import DEFAULT_PROMPT

    t0 = time.perf_counter()
    out = Path(args.out).resolve()
    raw = yaml.safe_load(yaml.safe_dump(EXPERIMENT))
    raw["datasets"]["phantom"]["n"] = args.n
    raw["image_size"] = args.image_size
    raw["datasets"]["phantom"]["seed"] = args.seed
    raw["seeds"] = [args.seed]
    rg = raw["protocols"]["report_generation"]
    rg["epochs"] = args.epochs
    rg["batch_size"] = args.batch_size
    data = raw["datasets"]["phantom"]
    ds = build_dataset("phantom", None, **{k: v for k, v in data.items() if k != "adapter"})
    train_reports = [r.report for r in ds.records if r.split == "train"]
    lm_dir = out / "scratch-lm"
    # rewritten every time (same bytes for the same reports and seed, so a finished run is still found)
    write_scratch_lm(train_reports + [DEFAULT_PROMPT], lm_dir, seed=args.seed, **LM)
    rg["lm"] = str(lm_dir)
    raw.update(output_dir=str(out / "run"), cache_dir=str(out / "cache"))
    path = out / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_experiment(path)
    summary = run_experiment(config, progress=False, log=print)
    if summary.failed:
        print(f"FAILED: {summary.failed}", file=sys.stderr)
        return 1
    with sqlite3.connect(config.output_path / "results.db") as c:
        key, = c.execute("SELECT key FROM runs WHERE protocol='report_generation' AND status='done'").fetchone()
        rows = c.execute("SELECT metric, value, ci_low, ci_high FROM metrics WHERE run_key=?", (key,)).fetchall()
    m = {r[0]: r[1:] for r in rows}
    x, y, z = m["rouge_l"][0], m["rouge_l_most_frequent"][0], m["rouge_l_shuffled_image"][0]
    n_test = sum(r.split == "test" for r in ds.records)
    print(f"train reports: {len(train_reports)} ({len(set(train_reports))} distinct), test images: {n_test}")
    print(f"rouge-l: {x:.4f}  (95% CI {m['rouge_l'][1]:.4f}-{m['rouge_l'][2]:.4f})")
    print(f"bleu-4: {m['bleu4'][0]:.4f}  (95% CI {m['bleu4'][1]:.4f}-{m['bleu4'][2]:.4f})")
    print(f"most-frequent-report rouge-l: {y:.4f}")
    print(f"shuffled-image rouge-l: {z:.4f}")
    margin = x - max(y, z)
    print(f"margin over max(most-frequent, shuffled): {margin:+.4f} (needs >= 0.10): {'PASS' if margin >= 0.10 else 'FAIL'}")
    pred = read_predictions(Path(glob.glob(str(config.output_path / "predictions" / f"{key}.npz"))[0]))
    sp = pred.splits["test"]
    for i in range(3):
        print(f"\nexample {i + 1} ({sp.keys[i]})\n  reference: {sp.columns['reference'][i]}\n"
              f"  generated: {sp.columns['generated'][i]}")
    print(f"\nwall time: {time.perf_counter() - t0:.0f} s")
    return 0 if margin >= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
