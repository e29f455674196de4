"""A few generated reports beside their references, for the HTML report (self-contained).

``text_examples(predictions, n)`` picks ``n`` test samples spread evenly over the split
(deterministic: the same file always shows the same samples) and returns plain rows;
``text_examples_html`` renders them as an escaped HTML table fragment.
"""
from __future__ import annotations

import html
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


def text_examples_html(predictions: Predictions, n: int = 3, split: str = "test") -> str:
    """An HTML ``<table>`` of :func:`text_examples` (empty string when there is nothing to show)."""
    rows = text_examples(predictions, n, split)
    if not rows:
        return ""
    columns = ["reference", "generated"] + [c for c in rows[0] if c not in ("key", "patient_id", "reference",
                                                                            "generated")]
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in ["sample"] + columns)
    body = "".join("<tr>" + f"<td>{html.escape(r['key'])}</td>" +
                   "".join(f"<td>{html.escape(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<table class="text-examples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
