"""Findings text for the chest phantoms: what :func:`make_chest_phantoms` drew, written as a report.

With ``devices=True`` the phantom also draws support devices (a central venous catheter
entering from the patient's right or left, ECG leads: three bright rings). Every image's
findings are described from the very parameters it was rendered with: the opacity (side,
lung zone, size), the heart (cardiothoracic ratio), the devices. Sides follow the
radiological convention: the left of the image is the patient's right.

The templates are deliberately regular (a small vocabulary) but every sentence depends on
the image, so a model that reads the image writes a better report than one that does not.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: cardiothoracic ratio (heart width / thoracic width) from which the heart is "enlarged"
CTR_ENLARGED = 0.6
#: nodule sigma (fraction of the half-width) bounds of "small" and "moderate"
SIZE_BINS = (0.053, 0.072)
LINE_FRACTION, ECG_FRACTION = 0.35, 0.35


def device_parameters(n: int, seed: int, p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-image device parameters (own random stream: the rest of the phantom is unchanged)."""
    rng = np.random.default_rng([seed, 5])
    has_line = rng.random(n) < LINE_FRACTION
    line_side = np.where(rng.random(n) < 0.5, -1.0, 1.0)  # -1: patient's right (image left)
    has_ecg = rng.random(n) < ECG_FRACTION
    return {
        "line_c": np.where(has_line, rng.uniform(0.30, 0.40, n), 0.0),
        "line_side": line_side,
        "line_x0": line_side * rng.uniform(0.42, 0.55, n), "line_y0": np.full(n, -1.0),
        "line_x1": line_side * rng.uniform(0.03, 0.10, n),
        "line_y1": p["heart_cy"] - p["heart_ry"] + rng.uniform(-0.05, 0.08, n),
        "ecg_c": np.where(has_ecg, rng.uniform(0.35, 0.45, n), 0.0),
        "ecg_dx": rng.uniform(-0.05, 0.05, n), "ecg_dy": rng.uniform(-0.05, 0.05, n),
    }


def render_devices(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Intensity added by the devices of a chunk of images: ``(m, size, size)``."""
    col = lambda k: p[k].astype(np.float32)[:, None, None]  # noqa: E731
    px = 2.0 / size  # one pixel in normalised coordinates
    ax, ay, bx, by = col("line_x0"), col("line_y0"), col("line_x1"), col("line_y1")
    vx, vy = bx - ax, by - ay
    t = np.clip(((x - ax) * vx + (y - ay) * vy) / np.maximum(vx * vx + vy * vy, 1e-6), 0.0, 1.0)
    d2 = (x - ax - t * vx) ** 2 + (y - ay - t * vy) ** 2
    out = col("line_c") * np.exp(-d2 / (1.2 * px) ** 2)
    ring_r, ring_w = max(0.05, 2.5 * px), max(0.015, 0.8 * px)
    for cx, cy in ((-0.55, -0.7), (0.55, -0.7), (0.5, 0.55)):
        r = np.sqrt((x - cx - col("ecg_dx")) ** 2 + (y - cy - col("ecg_dy")) ** 2)
        out = out + col("ecg_c") * np.exp(-((r - ring_r) / ring_w) ** 2)
    return out.astype(np.float32)


def drawn_findings(p: dict[str, np.ndarray], labels: np.ndarray, size: int) -> list[dict[str, Any]]:
    """One dict per image: opacity (side, zone, size), heart (cardiothoracic ratio), devices."""
    out = []
    for i in range(len(labels)):
        f: dict[str, Any] = {"opacity": bool(labels[i])}
        if f["opacity"]:
            f["side"] = "right" if p["nod_x"][i] < 0 else "left"
            rel = (p["nod_y"][i] - p["lung_cy"][i]) / p["lung_ry"][i]  # -1 apex .. 1 base (rows grow downwards)
            f["zone"] = "upper" if rel < -1 / 3 else "lower" if rel > 1 / 3 else "middle"
            s = p["nod_s"][i]
            f["size"] = "small" if s < SIZE_BINS[0] else "moderate" if s < SIZE_BINS[1] else "large"
        f["ctr"] = float(p["heart_rx"][i] / (p["lung_dx"][i] + p["lung_rx"][i]))
        f["heart"] = "enlarged" if f["ctr"] >= CTR_ENLARGED else "normal"
        f["line"] = None
        if "line_c" in p and p["line_c"][i] > 0:
            f["line"] = "right" if p["line_side"][i] < 0 else "left"
        f["ecg"] = bool("ecg_c" in p and p["ecg_c"][i] > 0)
        out.append(f)
    return out


def findings_report(f: dict[str, Any]) -> str:
    """The findings section describing one image's drawn findings."""
    parts = []
    if f.get("line"):
        parts.append(f"A {f['line']}-sided central venous catheter terminates in the superior vena cava.")
    if f.get("ecg"):
        parts.append("ECG leads overlie the chest.")
    if not f.get("line") and not f.get("ecg"):
        parts.append("No lines or tubes.")
    if f["opacity"]:
        parts.append(f"There is a {f['size']} rounded opacity in the {f['side']} {f['zone']} zone.")
    else:
        parts.append("The lungs are clear without focal opacity.")
    parts.append("The heart is enlarged." if f["heart"] == "enlarged" else "Heart size is normal.")
    parts.append("No pleural effusion or pneumothorax.")
    return " ".join(parts)


def chest_phantoms_with_reports(n: int, size: int = 64, seed: int = 0, positive_fraction: float = 0.5, *,
                                repeat_fraction: float = 0.0
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]], list[str]]:
    """:func:`make_chest_phantoms` with devices drawn, plus each image's findings report."""
    from medprobe.data.phantom import make_chest_phantoms
    findings: list[dict[str, Any]] = []
    images, labels, masks, meta = make_chest_phantoms(n, size, seed, positive_fraction, repeat_fraction=repeat_fraction,
                                                      devices=True, findings=findings)
    return images, labels, masks, meta, [findings_report(f) for f in findings]
