"""``medprobe data check``: validate a local copy of a dataset and list every problem.

:func:`check_dataset` builds the dataset with any adapter while collecting problems
(the public-benchmark adapters then record each bad row and go on instead of stopping
at the first), and then checks what was built:

* counts per split (images, patients) and per class (images with the label; for
  segmentation, cases whose mask contains the class, known after reading the masks);
* listed files that are missing;
* files that cannot be read (every image, and every mask for segmentation), each named;
* label values out of range for the task (and mask values outside the classes);
* patients in more than one split (the leakage guard's message).

The report's ``ok`` is True only when no problem was found.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.data.adapters import build_dataset
from medprobe.data.adapters._common import collect_problems
from medprobe.data.base import SPLITS, ImageDataset, Record
from medprobe.data.splits import check_no_leakage
from medprobe.errors import DataError, MedprobeError


@dataclass
class CheckReport:
    """What ``data check`` found; ``ok`` when there is no problem."""

    adapter: str
    root: str | None
    options: dict[str, Any]
    task: str | None = None
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    split_policy: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> images, patients, classes
    patients: int = 0  # distinct patients over all splits
    files_read: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # degenerate splits (see split_warnings)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "root": self.root, "options": self.options, "ok": self.ok,
                "task": self.task, "class_names": self.class_names, "source": self.source,
                "split_policy": self.split_policy, "splits": self.splits, "patients": self.patients,
                "files_read": self.files_read, "problems": self.problems, "warnings": self.warnings}

    def format(self) -> str:
        """The human-readable report printed by the command line."""
        lines = [f"dataset {self.adapter} at {self.root}"]
        if self.task is not None:
            lines.append(f"task: {self.task}, {len(self.class_names)} classes: {', '.join(self.class_names)}")
            policy = ", ".join(f"{k}={v}" for k, v in self.split_policy.items()) or "(set by the adapter)"
            lines.append(f"split policy: {policy}")
            splits = list(self.splits)
            width = max([len(c) + 2 for c in self.class_names] + [12])
            lines.append(f"{'':<{width}}  " + "  ".join(f"{s:>8}" for s in splits + ["total"]))
            for label, key in (("images", "images"), ("patients", "patients")):
                vals = [self.splits[s][key] for s in splits]
                total = sum(vals) if key == "images" else self.patients
                lines.append(f"{label:<{width}}  " + "  ".join(f"{v:>8}" for v in vals + [total]))
            if any(self.splits[s]["classes"] for s in splits):
                lines.append("per class" + (" (cases containing it)" if self.task == "segmentation" else
                                           " (images)") + ":")
                for c in self.class_names:
                    vals = [self.splits[s]["classes"].get(c, 0) for s in splits]
                    lines.append(f"  {c:<{width - 2}}  " + "  ".join(f"{v:>8}" for v in vals + [sum(vals)]))
            lines.append(f"files read: {self.files_read}")
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            lines += [f"  - {w}" for w in self.warnings]
        if self.problems:
            lines.append(f"problems ({len(self.problems)}):")
            lines += [f"  {i}. {p}" for i, p in enumerate(self.problems, start=1)]
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
        else:
            lines.append("OK: no problems found" + (f" ({len(self.warnings)} warning(s) above)" if self.warnings
                                                    else ""))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)


def _label_problem(rec: Record, kind: str, n: int) -> str | None:
    v = rec.label
    if kind == "multilabel":
        ok = isinstance(v, (tuple, list)) and len(v) == n and all(x in (0, 1, -1) for x in v)
        want = f"a vector of {n} values 0/1 (-1 = missing)"
    elif kind in ("binary", "multiclass"):
        ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= int(v) < n
        want = f"an integer class 0..{n - 1}"
    else:
        ok, want = True, ""
    return None if ok else f"label {v!r} of {rec.image_path or rec.key} is out of range; expected {want}"


def _where(ds: ImageDataset, i: int) -> str:
    """`` [listed in <file> row N]`` for datasets that record where each record is listed."""
    where = getattr(ds, "where", None)
    return f" [listed in {where[i]}]" if isinstance(where, (list, tuple)) and i < len(where) else ""


def _with_where(message: str, ds: ImageDataset, i: int) -> str:
    return message if "[listed in " in message else message + _where(ds, i)


def degenerate_splits(kind: str, class_names: Sequence[str], counts: Mapping[str, Mapping[str, int]],
                      sizes: Mapping[str, int], unlabelled: Sequence[str] = ()) -> list[str]:
    """Warnings about class coverage, from per-split class counts (``{split: {class: n}}``).

    A class with no image in any split (nothing can be learnt or measured for it: a wrong class
    list, or a rare finding absent from a subset); a split with no image of a class (a probe
    trained on it never sees the class, metrics on it cannot measure it: an AUROC of
    1.000 [1.000, 1.000] is then no result); for multi-label, a class positive in every image
    of a split. Segmentation counts cases containing the class; background is not checked.
    ``unlabelled`` classes (missing for every image: findings of a harmonised vocabulary the dataset
    does not label) are not checked; they are masked out of every loss and metric.
    """
    warnings: list[str] = []
    if kind not in ("binary", "multiclass", "multilabel", "segmentation") or not sizes:
        return warnings
    named = [c for c in class_names if not (kind == "segmentation" and c == class_names[0])  # not background
             and c not in set(unlabelled)]
    for c in named:
        if not any(counts.get(s, {}).get(c, 0) for s in sizes):
            warnings.append(f"class {c!r} has no {'case' if kind == 'segmentation' else 'image'} in any split "
                            f"({', '.join(f'{s}: {n}' for s, n in sizes.items())} images)")
    for split, n in sizes.items():
        if n == 0:
            continue
        absent = [c for c in named if not counts.get(split, {}).get(c, 0)
                  and any(counts.get(s, {}).get(c, 0) for s in sizes)]
        if absent:
            use = ("a probe trained on it never sees " + ("it" if len(absent) == 1 else "them")) if split == "train" \
                else "metrics on it cannot measure " + ("it" if len(absent) == 1 else "them")
            what = "positive image for" if kind == "multilabel" else "case containing" if kind == "segmentation" \
                else "image of"
            label = "class" if len(absent) == 1 else "classes"
            warnings.append(f"split {split!r} ({n} images) has no {what} {label} "
                            f"{', '.join(repr(c) for c in absent)}: {use}")
        if kind == "multilabel":
            full = [c for c in named if counts.get(split, {}).get(c, 0) == n]
            if full:
                use = "a probe cannot learn" if split == "train" else "metrics cannot measure"
                warnings.append(f"split {split!r} ({n} images): every image is positive for "
                                f"{', '.join(repr(c) for c in full)}: {use} {'it' if len(full) == 1 else 'them'}")
    return warnings


def _label_counts(ds: ImageDataset) -> dict[str, Counter]:
    counts: dict[str, Counter] = defaultdict(Counter)
    n = ds.task.num_classes
    for rec in ds.records:
        if _label_problem(rec, ds.task.kind, n) is not None:
            continue
        if ds.task.kind == "multilabel":
            counts[rec.split].update(c for c, v in zip(ds.task.class_names, rec.label) if v == 1)
        elif ds.task.kind in ("binary", "multiclass"):
            counts[rec.split][ds.task.class_names[int(rec.label)]] += 1
    return counts


def split_warnings(dataset: ImageDataset) -> list[str]:
    """Degenerate splits of a labelled dataset, as messages (empty when all is well).

    From the labels only (no pixels are read, so segmentation datasets give none): a class
    with no image in any split, a split with no image of a class, and (multi-label) a class
    positive in every image of a split. ``medprobe data check`` shows the same findings.
    """
    sizes = {s: int(len(dataset.indices(s))) for s in dataset.splits()}
    return degenerate_splits(dataset.task.kind, dataset.task.class_names, _label_counts(dataset), sizes,
                             unlabelled=unlabelled_classes(dataset))


def unlabelled_classes(dataset: ImageDataset) -> list[str]:
    """Multi-label classes missing (``-1``) for every record: a harmonised finding the dataset does not label."""
    if dataset.task.kind != "multilabel":
        return []
    n = dataset.task.num_classes
    known = np.zeros(n, dtype=bool)
    for rec in dataset.records:
        if _label_problem(rec, "multilabel", n) is None:
            known |= np.asarray(rec.label) >= 0
    return [c for c, k in zip(dataset.task.class_names, known) if not k]


def check_dataset(adapter: str, root: str | Path | None, options: dict[str, Any] | None = None, *,
                  read_files: bool = True, progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Build ``adapter`` on ``root`` and check it; every problem found is in the report.

    Option errors (:class:`~medprobe.errors.ConfigError`) are raised, not reported: they
    are mistakes in the command, not in the data.
    """
    options = dict(options or {})
    report = CheckReport(adapter, str(root) if root is not None else None, options)
    with collect_problems() as found:
        try:
            ds = build_dataset(adapter, root, **options)
        except DataError as e:
            found.append(str(e))
            ds = None
    report.problems.extend(found)
    if ds is None:
        return report
    report.task, report.class_names = ds.task.kind, list(ds.task.class_names)
    report.source = ds.source
    report.split_policy = dict(getattr(ds, "split_policy", {}) or {})
    seg = ds.task.kind == "segmentation"
    n_classes = ds.task.num_classes

    # labels, missing files, counts
    present: dict[str, Counter] = defaultdict(Counter)
    for i, rec in enumerate(ds.records):
        bad = _label_problem(rec, ds.task.kind, n_classes)
        if bad:
            report.problems.append(bad + _where(ds, i))
        elif ds.task.kind == "multilabel":
            present[rec.split].update(c for c, v in zip(ds.task.class_names, rec.label) if v == 1)
        elif ds.task.kind in ("binary", "multiclass"):
            present[rec.split][ds.task.class_names[int(rec.label)]] += 1
        for what, p in (("image", rec.image_path), ("mask", rec.mask_path)):
            if p is not None and not Path(p).exists():
                report.problems.append(f"{p}: {what} file not found{_where(ds, i)}")
    try:
        check_no_leakage(ds)
    except DataError as e:
        report.problems.append(str(e))

    # read every file
    if read_files:
        total = len(ds)
        for i, rec in enumerate(ds.records):
            if progress is not None:
                progress(i, total)
            try:
                image = ds.load_image(i)
                report.files_read += 1
                if seg:
                    mask = np.asarray(ds.load_mask(i))
                    report.files_read += 1
                    shape = image.shape[:2] if ds.ndim == 2 and image.ndim == 3 else image.shape
                    if tuple(mask.shape) != tuple(shape):
                        report.problems.append(f"{rec.mask_path or rec.key}: mask shape {mask.shape} differs from "
                                               f"image shape {tuple(shape)} of {rec.image_path}{_where(ds, i)}")
                    elif mask.size and (mask.min() < 0 or mask.max() >= n_classes):
                        report.problems.append(f"{rec.mask_path or rec.key}: mask values outside 0..{n_classes - 1}"
                                               f"{_where(ds, i)}")
                    else:
                        present[rec.split].update(ds.task.class_names[int(v)] for v in np.unique(mask))
            except MedprobeError as e:
                report.problems.append(_with_where(str(e), ds, i))
            except Exception as e:  # a reader bug or an exotic file: still name it and go on
                report.problems.append(f"{rec.image_path or rec.key}: unexpected {type(e).__name__}: {e}"
                                       f"{_where(ds, i)}")
        if progress is not None:
            progress(total, total)

    for split in ds.splits():
        idx = ds.indices(split)
        report.splits[split] = {"images": int(len(idx)),
                                "patients": len({ds.records[i].patient_id for i in idx}),
                                "classes": dict(sorted(present[split].items(),
                                                       key=lambda kv: ds.task.class_names.index(kv[0])))}
    report.patients = len({r.patient_id for r in ds.records})
    if ds.task.kind != "segmentation" or read_files:  # segmentation presence is known only after reading masks
        report.warnings = degenerate_splits(ds.task.kind, ds.task.class_names, present,
                                            {s: v["images"] for s, v in report.splits.items()},
                                            unlabelled=unlabelled_classes(ds))
    ordered = [s for s in SPLITS if s in report.splits] + [s for s in report.splits if s not in SPLITS]
    report.splits = {s: report.splits[s] for s in ordered}
    return report
