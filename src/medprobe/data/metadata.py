"""Patient and acquisition metadata shared by the dataset adapters: sex, age, age bin, view, site.

Adapters expose these under the same keys wherever their source has them, so the frozen
``metadata`` probes (RAD-DINO style) can target them on any dataset:

``sex``      "M" or "F" (anything else, e.g. "O"/"Unknown", is None)
``age``      age in years at acquisition (float; None when missing or implausible)
``age_bin``  "<20", "20-40", "40-60", "60-80", ">80" (see :func:`age_bin`)
``view``     view position as an upper-case code: "PA", "AP", "LATERAL", "LL", "RL", "CC", "MLO", ...
``site``     acquisition site or hospital, where the source names one
"""
from __future__ import annotations

import math
import re
from typing import Any

#: The age bins of the RAD-DINO study's demographic table, youngest first.
AGE_BINS: tuple[str, ...] = ("<20", "20-40", "40-60", "60-80", ">80")
#: Lower edges of the bins after the first; a bin holds ages >= its lower edge and < the next one.
AGE_EDGES: tuple[float, ...] = (20.0, 40.0, 60.0, 80.0)
#: Ages above this are treated as data-entry errors (e.g. NIH ChestX-ray14's 148 or 414 years).
MAX_PLAUSIBLE_AGE = 120.0

_AGE_UNITS = {"y": 1.0, "m": 1 / 12, "w": 7 / 365.25, "d": 1 / 365.25}


def age_bin(age: Any) -> str | None:
    """The bin of an age in years: lower edge inclusive, upper edge exclusive.

    So 19.9 -> "<20", 20 -> "20-40", 39.5 -> "20-40", 40 -> "40-60", 79 -> "60-80" and
    80 or more -> ">80" (read ">80" as "80 and over"). Missing, negative, non-numeric or
    implausible (> 120) ages give None.
    """
    years = _as_years(age)
    if years is None:
        return None
    for label, edge in zip(AGE_BINS, AGE_EDGES):
        if years < edge:
            return label
    return AGE_BINS[-1]


def _as_years(age: Any) -> float | None:
    if age is None or isinstance(age, bool):
        return None
    if isinstance(age, str):
        return parse_age(age)
    try:
        years = float(age)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(years) or years < 0 or years > MAX_PLAUSIBLE_AGE:
        return None
    return years


def parse_age(text: Any) -> float | None:
    """Age in years from "58", "58.0", DICOM age strings ("058Y", "016M", "003W", "012D"),
    or free text such as "45yrs", "16month", "64days". None when absent or unparseable."""
    if text is None:
        return None
    if not isinstance(text, str):
        return _as_years(text)
    s = text.strip().lower()
    if not s or s in ("nan", "none", "unknown", "?"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)\.?", s)
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    if unit == "" or unit.startswith("y"):
        factor = 1.0
    elif unit.startswith("mo") or unit == "m":
        factor = _AGE_UNITS["m"]
    elif unit.startswith("w"):
        factor = _AGE_UNITS["w"]
    elif unit.startswith("d"):
        factor = _AGE_UNITS["d"]
    else:
        return None
    return _as_years(value * factor)


def normalise_sex(value: Any) -> str | None:
    """"M" or "F" from M/F, Male/Female (any case, also the Shenzhen typo "femal"); else None."""
    if not isinstance(value, str):
        return None
    s = value.strip().lower()
    if s in ("m", "male", "man"):
        return "M"
    if s in ("f", "female", "femal", "woman"):
        return "F"
    return None


def normalise_view(value: Any) -> str | None:
    """An upper-case view code ("PA", "AP", "LATERAL", ...); None when empty."""
    if not isinstance(value, str):
        return None
    s = value.strip().upper()
    if not s or s in ("NAN", "NONE", "UNKNOWN", "UNK"):
        return None
    return {"L": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL"}.get(s, s)


_UNSET: Any = object()


def demographics(*, sex: Any = _UNSET, age: Any = _UNSET, view: Any = _UNSET, site: Any = _UNSET) -> dict[str, Any]:
    """The shared metadata keys from raw source values.

    Only the keys whose argument is given appear (a given None or unparseable value gives
    the key with None, so every record of a source has the same keys); ``age`` brings
    ``age_bin`` with it.
    """
    out: dict[str, Any] = {}
    if sex is not _UNSET:
        out["sex"] = normalise_sex(sex)
    if age is not _UNSET:
        years = _as_years(age)
        out["age"] = None if years is None else (int(years) if float(years).is_integer() else round(years, 2))
        out["age_bin"] = age_bin(years)
    if view is not _UNSET:
        out["view"] = normalise_view(view)
    if site is not _UNSET:
        out["site"] = (str(site).strip() or None) if site is not None else None
    return out
