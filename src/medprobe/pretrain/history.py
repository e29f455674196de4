"""Files of a pretraining run besides the weights: ``losses.csv``, ``losses.png``, the checkpoint list."""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from medprobe.fsutil import atomic_write

CSV_COLUMNS = ("step", "total", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp")


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    out = []
    for p in folder.glob("step_*.pt") if folder.is_dir() else []:
        m = re.fullmatch(r"step_(\d+)\.pt", p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def csv_text(rows: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([fmt(r[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def fmt(v: float) -> str:
    return str(int(v)) if isinstance(v, int) else repr(float(v))


def read_losses(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``losses.csv`` as dicts (``step`` int, the rest float)."""
    with open(path, newline="") as fh:
        return [{k: int(v) if k == "step" else float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def plot_losses(rows: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Loss curves (and the learning rate) as a PNG, written atomically."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in rows]
    for key in ("total", "dino", "ibot", "koleo"):
        ax.plot(steps, [r[key] for r in rows], label=key, lw=1.2 if key == "total" else 0.9)
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or "self-supervised pretraining")
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:gray")
    ax2.set_ylabel("lr")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
