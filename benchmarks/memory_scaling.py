"""Flat memory: extracting 10x more images must not need more memory.

Extracts 5,000 and then 50,000 generated images (each drawn from its index on read: the
dataset holds only light records) with a tiny ViT at 28 px, each in a fresh process with
the default DataLoader workers, and compares peak resident memory. Peak RSS of a run is the
extracting process's peak plus the largest worker's peak. The last line is
``peak RSS ratio 50k/5k: R``; the target is R <= 1.10.

    python benchmarks/memory_scaling.py [--small 5000] [--large 50000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from medprobe.backbones import create_backbone
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.features import extract_features

class Generated(ImageDataset):
    value_range = (0.0, 255.0)
    def load_image(self, index):
        rng = np.random.default_rng(index)
        return rng.integers(0, 256, (32, 32)).astype(np.float32)

n, cache = int(sys.argv[1]), sys.argv[2]
splits = ("train", "val", "test")
recs = [Record(f"g{i}", splits[i % 10 // 8 + (i % 10 == 9)], f"p{i}", i % 2) for i in range(n)]
ds = Generated(recs, TaskSpec("binary", ("a", "b")), name=f"generated{n}")
vit = create_backbone("dinov2_vits14", "random", tiny=True)
t = time.perf_counter()
r = extract_features(vit, ds, cache, image_size=28, last_blocks=4, patch_blocks=[-1], precision="fp32",
                     batch_size=256, progress=False)
secs = time.perf_counter() - t
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
size = r.store.size_bytes()
print(json.dumps({"n": n, "items": r.items, "seconds": secs, "self_kb": self_kb, "worker_kb": child_kb,
                  "store_bytes": size}))
"""


def run(n: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), cache], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"extraction of {n} images failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--large", type=int, default=50000)
    args = ap.parse_args()
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    peaks = {}
    for n in (args.small, args.large):
        t = time.perf_counter()
        r = run(n)
        peaks[n] = (r["self_kb"] + r["worker_kb"]) / 1024
        print(f"{n} images: peak RSS {peaks[n]:.1f} MiB (extracting process {r['self_kb'] / 1024:.1f} MiB, "
              f"largest worker {r['worker_kb'] / 1024:.1f} MiB), store {r['store_bytes'] / 2 ** 20:.1f} MiB, "
              f"{r['items'] / r['seconds']:.0f} images/s, {time.perf_counter() - t:.0f} s in all")
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"peak RSS ratio {args.large // 1000}k/{args.small // 1000}k: {peaks[args.large] / peaks[args.small]:.3f}")


if __name__ == "__main__":
    main()
