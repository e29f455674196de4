"""Identities: one canonical form and one digest for everything that decides a result.

``canonical`` turns options (dataclasses, nested), paths and numpy scalars into plain JSON
values; ``digest`` hashes that form. Cache keys and run keys are built from these two
functions only, so what enters an identity is decided in one place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any


def canonical(value: Any) -> Any:
    """``value`` as plain JSON data: dataclasses become mappings of *all* their fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [canonical(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return canonical(value.item())  # numpy / torch scalars
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == int(value) and abs(value) < 2 ** 53:
            return float(value)
        return value
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)


def dumps(value: Any) -> str:
    """Compact, key-sorted JSON of ``canonical(value)``."""
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))


def digest(value: Any, length: int = 20) -> str:
    """SHA-256 prefix of ``dumps(value)``."""
    return hashlib.sha256(dumps(value).encode()).hexdigest()[:length]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf paths of canonical data: ``{"linear.blocks": [1, 4], "k": 10}`` (lists are leaves)."""
    value = canonical(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not value and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: value}
