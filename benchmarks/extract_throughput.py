"""Extraction throughput: the full path (read, preprocess, forward, store) vs forward only.

Same backbone (ViT-S/14 at 224 px, random weights), batch size and precision in one run.
The last line is ``extract/forward ratio: R`` (images/s of extraction over images/s of the
bare forward loop on pre-made tensors); the target is R >= 0.90 on a 2-core machine.

    python benchmarks/extract_throughput.py [--n 192] [--batch-size 32] [--precision auto]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from medprobe.backbones import create_backbone
from medprobe.data.adapters import build_dataset
from medprobe.data.preprocess import Preprocessor
from medprobe.features import extract_features
from medprobe.runtime import autocast, default_device, resolve_precision


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--backbone", default="dinov2_vits14")
    args = ap.parse_args()
    device = default_device()
    precision = resolve_precision(args.precision, device)
    dataset = build_dataset("phantom", None, n=args.n, size=args.image_size, seed=0)
    backbone = create_backbone(args.backbone, "random").to(device).eval()
    print(f"{args.backbone} at {args.image_size}px, {len(dataset)} phantom images, batch {args.batch_size}, "
          f"precision {precision}, device {device}, torch threads {torch.get_num_threads()}")

    # forward only, on tensors made before timing (same preprocessing, same batches)
    pre = Preprocessor(backbone.preprocess, args.image_size, getattr(dataset, "value_range", None))
    batches = [pre([dataset.load_image(j) for j in range(i, min(i + args.batch_size, len(dataset)))])
               for i in range(0, len(dataset), args.batch_size)]
    with torch.inference_mode(), autocast(precision, device):  # warm-up
        backbone.forward_tokens(batches[0][:4].to(device), blocks=[-4, -3, -2, -1])
    t = time.perf_counter()
    with torch.inference_mode(), autocast(precision, device):
        for b in batches:
            backbone.forward_tokens(b.to(device), blocks=[-4, -3, -2, -1])
    if device.type == "cuda":
        torch.cuda.synchronize()
    forward_s = time.perf_counter() - t
    del batches

    with tempfile.TemporaryDirectory() as cache:
        res = extract_features(backbone, dataset, cache, image_size=args.image_size, last_blocks=4,
                               precision=precision, batch_size=args.batch_size, progress=False, device=device)
        again = extract_features(backbone, dataset, cache, image_size=args.image_size, last_blocks=4,
                                 precision=precision, batch_size=args.batch_size, progress=False, device=device)
    fwd_rate = len(dataset) / forward_s
    ext_rate = res.items / res.seconds
    print(f"forward only : {forward_s:8.2f} s  {fwd_rate:7.2f} images/s")
    print(f"extraction   : {res.seconds:8.2f} s  {ext_rate:7.2f} images/s (read + preprocess + forward + store)")
    print(f"store reuse  : {again.seconds:8.3f} s  ({res.seconds / max(again.seconds, 1e-9):.0f}x faster, reused={again.reused})")
    print(f"extract/forward ratio: {ext_rate / fwd_rate:.3f}")


if __name__ == "__main__":
    main()
