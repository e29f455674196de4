"""Cross-library parity of medprobe backbones: max |difference| of CLS and patch tokens (fp32)
against a second implementation of the same architecture, per family and image size.

Uses the parity cases of the test suite (tests/backbone_util.py): tiny width and depth, the
real native image size, random weights perturbed so a swapped tensor shows. Offline.

    python benchmarks/backbone_parity.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from backbone_util import PARITY_CASES  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    rows = []
    for case, fn in PARITY_CASES.items():
        for size, (cls, patch) in fn().items():
            rows.append((case, size, cls, patch))
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'size':>5}  {'max|dCLS|':>10}  {'max|dpatch|':>11}  <=1e-4")
    for case, size, cls, patch in rows:
        ok = "yes" if max(cls, patch) <= 1e-4 else "NO"
        print(f"{case:<{width}}  {size:>5}  {cls:>10.2e}  {patch:>11.2e}  {ok}")
    return 0 if all(max(r[2], r[3]) <= 1e-4 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
