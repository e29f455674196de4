"""HD95 speed on real anatomy: the bounding-box / k-d tree surface distances against the landed HD95.

On the MNI ICBM152 2009a grey-matter map (``../shared/data/mni152``, GM probability > 0.5, 1 mm,
197x233x189) and a perturbed copy (shifted 2 voxels along x, dilated once, with random voxels
flipped near the surface), both HD95 implementations run ``--repeats`` times on the same pair with
an anisotropic voxel spacing; the median wall times and both values are printed:

    hd95 old: V s   new: V s
    hd95 speedup: S          (target >= 5)
    hd95 values: old V  new V  |diff| D   (must agree to 1e-6)

``old_hd95`` is a verbatim copy of the implementation medprobe shipped before (two dense
Euclidean distance transforms over the whole volume, twice per class). Data folder absent:
the script says so and exits with code 2.

    python benchmarks/surface_metrics.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from medprobe.metrics import hd95_from, segmentation_metrics, surface_distances

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mni152"
GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"


def old_hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None) -> float:
    """The landed implementation (medprobe.metrics._hd95 before issue 17), kept for the comparison."""
    sa, sb = a & ~ndimage.binary_erosion(a), b & ~ndimage.binary_erosion(b)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def new_hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """The new HD95 (bounding box, local search, k-d tree for the rest), on the same two binary masks."""
    return hd95_from(*surface_distances(a, b, spacing))


def all_metrics(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Everything medprobe reports for the pair (Dice, Jaccard, HD95, ASSD, NSD at 1 mm), for the record."""
    rows = segmentation_metrics(b.astype(np.uint8), a.astype(np.uint8), 2, ["bg", "gm"],
                                surface=("hd95", "assd", "nsd"), spacing=spacing, tolerance_mm=1.0)
    return {r.metric: r.value for r in rows if r.cls == "gm"}


def perturbed(mask: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = ndimage.binary_dilation(np.roll(mask, 2, axis=0))
    shell = out & ~ndimage.binary_erosion(out)
    flip = shell & (rng.random(mask.shape) < 0.3)
    return out & ~flip


def timed(fn, repeats: int) -> tuple[float, float]:
    times, value = [], float("nan")
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.2, 0.9])
    args = ap.parse_args(argv)
    path = args.data / GM
    if not path.is_file():
        print(f"data not found: {path} (the MNI152 folder of ../shared/data); nothing measured", file=sys.stderr)
        return 2
    import nibabel as nib
    gm = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    a = gm > 0.5 * (255.0 if gm.max() > 1 else 1.0)
    b = perturbed(a, seed=0)
    print(f"grey matter: {int(a.sum())} voxels, perturbed copy: {int(b.sum())} voxels, volume {a.shape}, "
          f"spacing {args.spacing}")
    t_old, v_old = timed(lambda: old_hd95(a, b, args.spacing), args.repeats)
    t_new, v_new = timed(lambda: new_hd95(a, b, args.spacing), args.repeats)
    print(f"hd95 old: {t_old:.3f} s   new: {t_new:.3f} s   (median of {args.repeats})")
    print(f"hd95 speedup: {t_old / t_new:.2f}")
    t_all, values = timed(lambda: all_metrics(a, b, args.spacing), 1)
    print(f"all metrics of the pair in {t_all:.3f} s: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    diff = abs(v_old - v_new)
    print(f"hd95 values: old {v_old:.9f}  new {v_new:.9f}  |diff| {diff:.2e}  "
          f"({'agree' if diff <= 1e-6 else 'DISAGREE'} to 1e-6)")
    return 0 if diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
