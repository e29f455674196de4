"""Run one preset per seed study to completion on phantom stand-ins with tiny backbones.

Usage: python benchmarks/preset_standins.py [OUT_DIR]

Prints each `medprobe run --preset ... --stand-in phantom --tiny` output, which ends with the
published numbers beside ours (not comparable: phantoms and tiny random models), and the wall time.
The WACV preset is shortened (one seed, 2 epochs) to fit a 2-core machine; the others run as shipped.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = [
    ("dinov2_radiology/table3_linear", []),
    ("rad_dino/table1b_candid_rsna", []),
    ("wacv_natural_fm/table1_frozen", ["seeds=[0]", "protocols.freeze_blocks.epochs=2", "protocols.deit_head.epochs=2"]),
]


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="medprobe-presets-"))
    rc = 0
    for name, sets in RUNS:
        cmd = [sys.executable, "-m", "medprobe.cli", "run", "--preset", name, "--stand-in", "phantom", "--tiny",
               "--quiet", "--set", f"output_dir={out / name.replace('/', '-')}"]
        for s in sets:
            cmd += ["--set", s]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        print(f"$ medprobe run --preset {name} --stand-in phantom --tiny {' '.join('--set ' + s for s in sets)}")
        lines = p.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("finished ")), 0)
        print("\n".join(lines[start:]))
        if p.returncode:
            print(p.stderr[-3000:])
        print(f"-> exit {p.returncode}, {time.perf_counter() - t:.0f} s\n")
        rc = rc or p.returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
