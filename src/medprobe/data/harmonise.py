"""One vocabulary for chest X-ray findings, so that datasets labelled differently can be compared.

The vocabulary is the 18 pathology names of torchxrayvision (``xrv.datasets.default_pathologies``,
in its order). A chest X-ray adapter built with ``labels: harmonised`` gives a multi-label task
over these 18 names: each finding the dataset labels is mapped from one or more of its own
labels (positive when any of them is positive, negative when all are negative), and every
finding it does not label is *missing*, ``-1`` in the label vector -- never negative. Missing
targets are masked out of every loss (linear probe, adaptation) and metric (each class is
scored on the samples labelled for it), and ML-kNN estimates a class only from the samples
labelled for it.

Each adapter's mapping is a dict ``HARMONISED: finding -> native label names`` in its module,
described in ``medprobe list datasets --details NAME`` and recorded in ``dataset.source`` (so
it enters the fingerprint); a finding is mapped only when every native label it needs is
present in the data (else it stays missing). Adapters with ``labels: harmonised``: NIH
ChestX-ray14, CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA Pneumonia, CANDID-PTX, SIIM-ACR;
Montgomery and Shenzhen refuse it (tuberculosis only). ``test_on`` (medprobe.experiment.cross)
uses the shared vocabulary to score a probe trained on one dataset on another.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from medprobe.data.base import Record, TaskSpec
from medprobe.errors import ConfigError

#: torchxrayvision's ``default_pathologies``, in its order
CHEST_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
    "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
    "Lung Opacity", "Enlarged Cardiomediastinum")
MISSING = -1
LABEL_CHOICES = ("native", "harmonised")

FindingMap = Mapping[str, Sequence[str]]


def harmonised_task() -> TaskSpec:
    """The multi-label task over :data:`CHEST_FINDINGS`."""
    return TaskSpec("multilabel", CHEST_FINDINGS)


def any_of(values: Iterable[int]) -> int:
    """1 when any value is 1, 0 when all are 0, else missing (-1)."""
    vals = list(values)
    if any(v == 1 for v in vals):
        return 1
    return 0 if vals and all(v == 0 for v in vals) else MISSING


def resolve(mapping: FindingMap, available: Iterable[str], *, case_insensitive: bool = False
            ) -> dict[str, tuple[str, ...]]:
    """``mapping`` narrowed to the findings whose native labels are all in ``available`` (spelled as there)."""
    unknown = sorted(set(mapping) - set(CHEST_FINDINGS))
    if unknown:
        raise ValueError(f"harmonised mapping names {unknown}, not in the chest finding vocabulary")
    avail = list(available)
    lookup = {(a.lower() if case_insensitive else a): a for a in avail}
    out = {}
    for finding, names in mapping.items():
        found = [lookup.get(n.lower() if case_insensitive else n) for n in names]
        if names and all(f is not None for f in found):
            out[finding] = tuple(f for f in found if f is not None)
    return out


def harmonise(native: Mapping[str, int], mapping: FindingMap) -> tuple[int, ...]:
    """The 18-vector for one image from its native labels ``{name: 0/1/-1}``; unmapped findings are missing."""
    return tuple(any_of(native[n] for n in mapping[f]) if f in mapping else MISSING for f in CHEST_FINDINGS)


def harmonise_records(records: Sequence[Record], native_names: Sequence[str], mapping: FindingMap) -> list[Record]:
    """``records`` with their native labels (a 0/1/-1 vector over ``native_names``, or a binary 0/1 int whose
    positive class is ``native_names[0]``) replaced by the harmonised vector."""
    out = []
    for r in records:
        values = (r.label,) if isinstance(r.label, int) else tuple(r.label)
        if len(values) != len(native_names):
            raise ValueError(f"record {r.key}: {len(values)} labels for {len(native_names)} names")
        out.append(replace(r, label=harmonise(dict(zip(native_names, values)), mapping)))
    return out


def labels_option(value: object, adapter: str) -> str:
    """The ``labels`` option of an adapter whose only choices are native and harmonised."""
    if value not in LABEL_CHOICES:
        raise ConfigError(f"option labels: {value!r} is not one of {', '.join(LABEL_CHOICES)} "
                          f"(dataset adapter {adapter!r})")
    return str(value)


def note(mapping: FindingMap) -> str:
    """``labels=harmonised(...)``: the mapped findings (for ``dataset.source``, so it enters the fingerprint)."""
    parts = [f"{f}<-{'|'.join(mapping[f])}" if list(mapping[f]) != [f] else f for f in CHEST_FINDINGS if f in mapping]
    return f"labels=harmonised({'; '.join(parts)})"


def refuse_tuberculosis(value: object, adapter: str) -> None:
    """``labels`` of the tuberculosis sets (Montgomery, Shenzhen): only ``native``; ``harmonised`` is refused
    with the reason (tuberculosis is not one of the 18 findings, so no finding would have a positive)."""
    if labels_option(value, adapter) == "harmonised":
        raise ConfigError(f"option labels=harmonised: dataset adapter {adapter!r} labels tuberculosis only, which is "
                          "not one of the 18 harmonised chest findings (torchxrayvision's vocabulary); its normal "
                          "images would be negative for every finding and its tuberculosis images missing for all, "
                          "so no finding has a positive to train on or score; use labels=native")
