"""Input pipeline vs forward: can reading + preprocessing keep the model fed?

Pipeline alone (DataLoader workers, default: the CPUs available; read, decode, resize,
scale, normalise, batches in order) on
  * a real radiograph, ../shared/data/dicom/RG1_UNCR.dcm (1955x1841, 16-bit), repeated;
  * generated 1024x1024 8-bit PNGs (smooth anatomy-like gradients plus noise, 32 distinct files),
against the ViT-S/14 forward at 224 px (random weights, precision auto, batch 32) on the same
machine, measured in the same run. The last lines are ``dicom pipeline/forward ratio: X`` and
``png pipeline/forward ratio: Y``; the target is >= 2.0 for both on a 2-core machine.

    python benchmarks/pipeline_throughput.py [--dicom-n 384] [--png-n 512] [--workers N]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medprobe.backbones import create_backbone
from medprobe.backbones.registry import get_spec
from medprobe.data.base import ImageDataset, Record, TaskSpec
from medprobe.data.preprocess import Preprocessor
from medprobe.data.readers import read_image
from medprobe.features.extract import default_workers, input_batches
from medprobe.runtime import autocast, default_device, resolve_precision

DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "RG1_UNCR.dcm"


class Files(ImageDataset):
    """Records pointing at files (repeated), read with medprobe's readers."""

    def __init__(self, files: list[Path], n: int, value_range: tuple[float, float] | None) -> None:
        recs = [Record(f"img{i}", "train", f"p{i}", 0, image_path=str(files[i % len(files)])) for i in range(n)]
        super().__init__(recs, TaskSpec("binary", ("a", "b")), name="bench")
        self.value_range = value_range

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.records[index].image_path)


def make_pngs(folder: Path, count: int, size: int = 1024) -> list[Path]:
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    files = []
    for i in range(count):
        body = 120 + 80 * np.sin(3 * xx + i) * np.cos(2 * yy) - 60 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
        img = np.clip(body + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)
        files.append(folder / f"png{i}.png")
        Image.fromarray(img).save(files[-1])
    return files


def pipeline_rate(dataset: ImageDataset, pre: Preprocessor, batch_size: int, workers: int) -> float:
    """Images/s of the pipeline alone, worker start-up included."""
    idx = np.arange(len(dataset))
    t = time.perf_counter()
    n = 0
    for owners, batch in input_batches(dataset, idx, pre, batch_size, workers=workers):
        assert batch.shape[1:] == (3, pre.image_size, pre.image_size)
        n += len(owners)
    return n / (time.perf_counter() - t)


def forward_rate(batch_size: int, n_batches: int) -> tuple[float, str]:
    device = default_device()
    precision = resolve_precision("auto", device)
    backbone = create_backbone("dinov2_vits14", "random").to(device).eval()
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    with torch.inference_mode(), autocast(precision, device):
        backbone.forward_tokens(x[:4], blocks=[-1])  # warm-up
        t = time.perf_counter()
        for _ in range(n_batches):
            backbone.forward_tokens(x, blocks=[-4, -3, -2, -1])
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch_size * n_batches / (time.perf_counter() - t), f"{precision} on {device}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dicom-n", type=int, default=384)
    ap.add_argument("--png-n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--forward-batches", type=int, default=6)
    ap.add_argument("--workers", type=int, default=None, help="default: the CPUs available")
    args = ap.parse_args()
    workers = default_workers() if args.workers is None else args.workers
    spec = get_spec("dinov2_vits14").preprocess
    print(f"machine: {os.cpu_count()} CPUs, {default_workers()} available; pipeline workers {workers}; "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")

    dicom = Files([DICOM], args.dicom_n, None)
    d_rate = pipeline_rate(dicom, Preprocessor(spec, 224, None), args.batch_size, workers)
    print(f"dicom pipeline: {d_rate:.1f} images/s ({DICOM.name} 1955x1841 uint16, {args.dicom_n} reads)")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_pngs(Path(tmp), 32)
        png = Files(files, args.png_n, (0.0, 255.0))
        p_rate = pipeline_rate(png, Preprocessor(spec, 224, (0.0, 255.0)), args.batch_size, workers)
    print(f"png pipeline: {p_rate:.1f} images/s (1024x1024 8-bit, {args.png_n} reads)")
    f_rate, how = forward_rate(args.batch_size, args.forward_batches)
    print(f"forward: {f_rate:.1f} images/s (ViT-S/14 at 224 px, {how}, torch threads {torch.get_num_threads()})")
    print(f"load average after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"dicom pipeline/forward ratio: {d_rate / f_rate:.2f}")
    print(f"png pipeline/forward ratio: {p_rate / f_rate:.2f}")


if __name__ == "__main__":
    main()
