"""A few generated reports beside their references, for the HTML report (self-contained).

``text_examples(predictions, n)`` picks ``n`` test samples spread evenly over the split
(deterministic: the same file always shows the same samples) and returns plain rows, which the
HTML report renders through its templates (escaped there).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from medprobe.predictions import Predictions


def text_examples(predictions: Predictions, n: int = 3, split: str = "test") -> list[dict[str, Any]]:
    """Up to ``n`` rows ``{key, patient_id, reference, generated[, generated_shuffled_image]}`` of a text unit."""
    if predictions.kind != "text" or split not in predictions.splits:
        return []
    sp = predictions.splits[split]
    if not len(sp) or n < 1:
        return []
    rows = np.unique(np.linspace(0, len(sp) - 1, min(n, len(sp))).round().astype(int))
    out = []
    for i in rows:
        row: dict[str, Any] = {"key": sp.keys[i], "patient_id": sp.patient_ids[i]}
        for name, col in sp.columns.items():
            row[name] = str(col[i])
        out.append(row)
    return out
