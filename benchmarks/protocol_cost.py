"""Cost of the default frozen-protocol grid on cached features vs recomputing features.

medprobe side: one extraction pass, then the default grid through the real runner on the
cached features (kNN with 4 k; linear sweep 13 lr x 2 inputs x 2 block settings x 10 epochs
for 3 seeds; few-shot 5 shots x 5 repeats with a linear probe and kNN per draw).

Anchor side (as the DINOv2 linear evaluation and the DINOv2-for-radiology code do it): the
same grid end to end, recomputing backbone features for every batch of every epoch of every
probe it trains, including each few-shot draw's probe and its per-epoch validation pass.

Last lines: ``grid/extraction ratio: R1`` (target <= 0.2) and
``recompute/cached speedup: S`` (target >= 10).

    python benchmarks/protocol_cost.py [--n 240] [--image-size 224] [--backbone dinov2_vits14]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from medprobe.backbones import create_backbone
from medprobe.data.adapters import build_dataset
from medprobe.data.preprocess import Preprocessor
from medprobe.experiment.config import load_experiment
from medprobe.experiment.runner import run_experiment
from medprobe.features import extract_features
from medprobe.protocols.fewshot import sample_fewshot
from medprobe.protocols.knn import knn_predict
from medprobe.protocols.linear import DEFAULT_LRS
from medprobe.runtime import autocast, resolve_precision

SEEDS = [0, 1, 2]
KS = [10, 20, 100, 200]
SHOTS = [1, 2, 4, 8, 16]
REPEATS = 5
EPOCHS = 10
BLOCKS = [1, 4]


def grid_yaml(out: Path, cache: Path, n: int, size: int, backbone: str, precision: str, batch: int) -> Path:
    cfg = {"name": "protocol-cost", "output_dir": str(out), "cache_dir": str(cache), "seeds": SEEDS,
           "image_size": size, "precision": precision, "batch_size": batch,
           "datasets": {"phantom": {"adapter": "phantom", "n": n, "size": size, "seed": 0}},
           "backbones": {"b": {"name": backbone, "weights": "random"}},
           "protocols": {"knn": {"k": KS, "temperature": 0.07},
                         "linear": {"inputs": ["cls", "cls+mean"], "blocks": BLOCKS, "epochs": EPOCHS},
                         "fewshot": {"shots": SHOTS, "repeats": REPEATS}}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


class Anchor:
    """Probes trained on features recomputed by the backbone for every batch."""

    def __init__(self, backbone, dataset, size: int, precision: str, batch: int) -> None:
        self.bb, self.ds, self.batch, self.precision = backbone, dataset, batch, precision
        self.pre = Preprocessor(backbone.preprocess, size, getattr(dataset, "value_range", None))
        self.forwards = 0

    def feats(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        x = self.pre([self.ds.load_image(int(i)) for i in idx])
        with torch.no_grad(), autocast(self.precision, torch.device("cpu")):  # as DINOv2 linear eval
            out = self.bb.forward_tokens(x, blocks=[-4, -3, -2, -1])
        self.forwards += len(idx)
        cls = [b.cls.float() for b in out.blocks]
        mean = out.mean_patch.float()
        return {"cls@1": cls[-1], "cls@4": torch.cat(cls, 1), "cls+mean@1": torch.cat([cls[-1], mean], 1),
                "cls+mean@4": torch.cat(cls + [mean], 1)}

    def batches(self, idx: np.ndarray, rng: np.random.Generator | None = None):
        idx = rng.permutation(idx) if rng is not None else idx
        for i in range(0, len(idx), self.batch):
            yield idx[i:i + self.batch]

    def linear(self, train: np.ndarray, val: np.ndarray, test: np.ndarray, y: np.ndarray, seed: int,
               variants=("cls@1", "cls@4", "cls+mean@1", "cls+mean@4")) -> None:
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        dims = {k: v.shape[1] for k, v in self.feats(train[:1]).items()}
        heads = {(v, lr): torch.nn.Linear(dims[v], 1) for v in variants for lr in DEFAULT_LRS}
        opts = {k: torch.optim.SGD(h.parameters(), lr=k[1], momentum=0.9) for k, h in heads.items()}
        for _ in range(EPOCHS):
            for b in self.batches(train, rng):
                f = self.feats(b)
                yb = torch.from_numpy(y[b]).float()
                for (v, lr), h in heads.items():
                    loss = F.binary_cross_entropy_with_logits(h(f[v]).squeeze(1), yb)
                    opts[(v, lr)].zero_grad()
                    loss.backward()
                    opts[(v, lr)].step()
            with torch.no_grad():  # per-epoch validation pass
                for b in self.batches(val):
                    f = self.feats(b)
                    for (v, lr), h in heads.items():
                        h(f[v])
        with torch.no_grad():
            for b in self.batches(test):
                f = self.feats(b)
                for (v, lr), h in heads.items():
                    h(f[v])

    def knn(self, train: np.ndarray, test: np.ndarray, y: np.ndarray) -> None:
        xtr = torch.cat([self.feats(b)["cls@1"] for b in self.batches(train)])
        xte = torch.cat([self.feats(b)["cls@1"] for b in self.batches(test)])
        knn_predict(xtr, y[train], xte, num_classes=2, ks=[min(k, len(train)) for k in KS] if len(train) < max(KS)
                    else KS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--skip-anchor", action="store_true")
    args = ap.parse_args()
    precision = resolve_precision(args.precision, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_experiment(grid_yaml(tmp / "run", tmp / "cache", args.n, args.image_size, args.backbone,
                                        precision, args.batch_size))
        dataset = build_dataset("phantom", None, n=args.n, size=args.image_size, seed=0)
        backbone = create_backbone(args.backbone, "random")
        t = time.perf_counter()
        extract_features(backbone, dataset, cfg.cache_path, image_size=args.image_size, last_blocks=max(BLOCKS),
                         precision=precision, batch_size=args.batch_size, progress=False)
        extraction_s = time.perf_counter() - t
        t = time.perf_counter()
        summary = run_experiment(cfg, progress=False, log=lambda s: None)  # reuses the store just written
        grid_s = time.perf_counter() - t
        assert not summary.failed, summary.failed
        units = summary.done
    medprobe_s = extraction_s + grid_s
    split = {s: dataset.indices(s) for s in ("train", "val", "test")}
    print(f"{args.backbone} (random weights) at {args.image_size}px, {args.n} phantom images "
          f"(train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])}), precision {precision}, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"grid: kNN k={KS}; linear 13 lr x 2 inputs x 2 block settings x {EPOCHS} epochs x {len(SEEDS)} seeds; "
          f"few-shot {SHOTS} x {REPEATS} repeats x (linear + kNN) = {units} units")
    print(f"extraction pass          : {extraction_s:9.2f} s")
    print(f"grid on cached features  : {grid_s:9.2f} s")
    print(f"medprobe end to end      : {medprobe_s:9.2f} s")
    if not args.skip_anchor:
        anchor = Anchor(backbone, dataset, args.image_size, precision, args.batch_size)
        y = dataset.labels()
        t = time.perf_counter()
        anchor.knn(split["train"], split["test"], y)
        for seed in SEEDS:
            anchor.linear(split["train"], split["val"], split["test"], y, seed)
        pids = [r.patient_id for r in dataset.records]
        for shots in SHOTS:
            for r in range(REPEATS):
                tr = split["train"]
                chosen = tr[sample_fewshot(y[tr], [pids[i] for i in tr], shots, r, "binary")]
                anchor.linear(chosen, split["val"], split["test"], y, r, variants=("cls@1",))
                anchor.knn(chosen, split["test"], y)
        anchor_s = time.perf_counter() - t
        print(f"anchor (recompute) e2e   : {anchor_s:9.2f} s  ({anchor.forwards} image forwards)")
    print(f"grid/extraction ratio: {grid_s / extraction_s:.3f}")
    if not args.skip_anchor:
        print(f"recompute/cached speedup: {anchor_s / medprobe_s:.1f}")


if __name__ == "__main__":
    main()
