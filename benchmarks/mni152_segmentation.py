"""Real-data check of the segmentation protocol on the MNI ICBM152 2009a template (a benchmark, not a test).

Builds a 2D slice dataset from ``../shared/data/mni152``: axial slices of the T1 template, the
target being grey matter (GM probability > 0.5). The split is by slice position: the slices
are cut into slabs of ``--slab`` neighbouring slices, slabs go to train/val/test in a fixed
cycle (train, train, val, train, test, ...) and the first and last slice of every slab are
dropped, so no two neighbouring slices ever sit in different splits. Each slab is one
"patient" (the runner's leakage guard checks it).

Then it runs the ``segmentation`` protocol through the experiment runner: linear and U-Net
decoders on a small random-initialised ViT (DINOv2 ViT-S/14 architecture, frozen) and the
scratch U-Net baseline, prints per-decoder Dice, Jaccard and their mean over test slices, and
writes the ground-truth/prediction overlays under ``<out>/plots/``.

    python benchmarks/mni152_segmentation.py --out /tmp/mni152-seg

Random-weight ViT features are weak; pass ``--weights`` (a DINOv2 ViT-S/14 checkpoint) to
measure pretrained features. Data folder absent: the script says so and exits with code 2.
"""
from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np

from medprobe.data.adapters import register_adapter
from medprobe.data.base import ArrayDataset, ImageDataset, Record, TaskSpec
from medprobe.errors import DataError
from medprobe.options import option

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mni152"
T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
CYCLE = ("train", "train", "val", "train", "test")


def mni152_slices(root: Path | None = None, step: int = 1, slab: int = 10, min_gm: int = 300) -> ImageDataset:
    """Axial T1 slices of MNI152 with grey-matter masks (probability > 0.5), split by slabs of slices.

    Only slices with at least ``min_gm`` grey-matter pixels are kept; ``step`` keeps every
    step-th slice (smaller datasets for quick checks). Images are (A-P, R-L) with anterior up.
    """
    import nibabel as nib

    root = Path(root) if root is not None else DEFAULT_DATA
    step, slab = option("step", step, int, minimum=1), option("slab", slab, int, minimum=3)
    paths = [root / T1, root / GM]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: MNI152 file not found (expected the folder ../shared/data/mni152)")
    t1 = np.asarray(nib.load(str(paths[0])).dataobj).astype(np.float32)
    gm = np.asarray(nib.load(str(paths[1])).get_fdata(dtype=np.float32))
    gm = gm / 255.0 if gm.max() > 1.0 else gm  # stored as 0..255 without scaling
    target = gm > 0.5
    counts = target.sum(axis=(0, 1))
    zs = np.flatnonzero(counts >= min_gm)
    z0 = int(zs.min())
    images, masks, records = [], [], []
    for z in zs[::step]:
        k = (int(z) - z0) // slab
        pos = (int(z) - z0) % slab
        if pos in (0, slab - 1):  # slab borders: keep neighbouring slices out of different splits
            continue
        split = CYCLE[k % len(CYCLE)]
        images.append(np.flipud(t1[:, :, z].T).copy())  # (A-P, R-L), anterior up
        masks.append(np.flipud(target[:, :, z].T).astype(np.int64))
        records.append(Record(f"z{int(z):03d}", split, f"slab{k:02d}", None, {"z": int(z), "slab": k}))
    ds = ArrayDataset(images, records, TaskSpec("segmentation", ("background", "grey_matter")), masks=masks,
                      name="mni152_gm", ndim=2, source=f"mni152 axial GM>0.5 (step={step}, slab={slab})")
    ds.value_range = (0.0, 255.0)  # type: ignore[attr-defined]
    return ds


register_adapter("mni152_slices", "MNI152 axial T1 slices, grey matter > 0.5 (benchmark)")(mni152_slices)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("/tmp/medprobe-mni152-segmentation"))
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--weights", default="random", help="random, hub or a checkpoint path for dinov2_vits14")
    ap.add_argument("--depth", type=int, default=12, help="ViT blocks (12 = ViT-S/14)")
    ap.add_argument("--unet-width", type=int, default=16, help="base width of the scratch U-Net (64 = original)")
    ap.add_argument("--decoders", default="linear,unet,unet_scratch")
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core box)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"MNI152 folder {args.data} not found; nothing to do", file=sys.stderr)
        return 2

    import torch
    import yaml

    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import run_experiment

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ds = mni152_slices(args.data, step=args.step)
    n = {s: len(ds.indices(s)) for s in ("train", "val", "test")}
    print(f"dataset: {len(ds)} axial slices {ds.load_image(0).shape}, GM > 0.5; split by slabs: {n}")
    args.out.mkdir(parents=True, exist_ok=True)
    overrides = {} if args.depth == 12 else {"depth": args.depth}
    cfg = {
        "name": "mni152_segmentation", "output_dir": str(args.out), "seeds": [0], "image_size": args.image_size,
        "precision": "fp32", "batch_size": 32, "bootstrap": 1000,
        "datasets": {"mni152": {"adapter": "mni152_slices", "root": str(args.data), "step": args.step}},
        "backbones": {"vits14": {"name": "dinov2_vits14", "weights": args.weights, "overrides": overrides}},
        "protocols": {"segmentation": {"decoders": args.decoders.split(","), "epochs": args.epochs, "lr": 1e-3,
                                       "batch_size": 8, "overlays": 3,
                                       "scratch": {"unet_width": args.unet_width}}},
    }
    path = args.out / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    summary = run_experiment(load_experiment(path), progress=False)
    with sqlite3.connect(args.out / "results.db") as db:
        rows = db.execute("SELECT r.variant, m.metric, m.value, m.ci_low, m.ci_high, r.wall_s FROM runs r "
                          "JOIN metrics m ON m.run_key = r.key WHERE m.class IS NULL AND r.status = 'done'").fetchall()
    table: dict[str, dict[str, tuple]] = {}
    for variant, name, value, lo, hi, wall in rows:
        table.setdefault(variant, {})[name] = (value, lo, hi)
        table[variant]["wall_s"] = (wall, None, None)
    print(f"\nMNI152 grey matter (GM > 0.5), {n['test']} test slices, image size {args.image_size}, "
          f"backbone dinov2_vits14 ({args.weights}, {args.depth} blocks), {args.epochs} epochs")
    print(f"{'decoder':<14}{'Dice':>20}{'Jaccard':>20}{'(D+J)/2':>20}{'trainable':>12}{'unit s':>9}")

    def cell(v: tuple) -> str:
        value, lo, hi = v
        return f"{value:.3f} [{lo:.2f},{hi:.2f}]" if lo is not None else f"{value:.3f}"

    for variant in args.decoders.split(","):
        if variant not in table:
            print(f"{variant:<14} (failed: {[f for f in summary.failed if variant in f[0]]})")
            continue
        t = table[variant]
        print(f"{variant:<14}{cell(t['dice']):>20}{cell(t['jaccard']):>20}{cell(t['dice_jaccard_mean']):>20}"
              f"{int(t['trainable_params'][0]):>12,}{t['wall_s'][0]:>9.0f}")
    pngs = sorted((args.out / "plots").glob("segmentation_*.png"))
    print("\noverlays:\n" + "\n".join(f"  {p}" for p in pngs))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; failed units: {len(summary.failed)}")
    return 0 if not summary.failed else 1


if __name__ == "__main__":
    sys.exit(main())
