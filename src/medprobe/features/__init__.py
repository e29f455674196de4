"""Feature extraction and the on-disk feature store (names load on first use: no torch for the CLI's help)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medprobe.features.extract import ExtractResult, extract_features, preprocessor_for
    from medprobe.features.store import FeatureStore, open_store

_LAZY = {"ExtractResult": "medprobe.features.extract", "extract_features": "medprobe.features.extract",
         "preprocessor_for": "medprobe.features.extract", "FeatureStore": "medprobe.features.store",
         "open_store": "medprobe.features.store"}

__all__ = ["ExtractResult", "FeatureStore", "extract_features", "open_store", "preprocessor_for"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
