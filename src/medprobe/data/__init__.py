"""Datasets: the record/dataset contract, file readers, synthetic phantoms, splits and adapters.

Names load on first use (``medprobe --help`` imports no numpy and no adapter).
"""
from __future__ import annotations

from typing import Any

_MODULES = {
    "medprobe.data.base": ("SPLITS", "ArrayDataset", "ImageDataset", "Record", "SubsetDataset", "TaskSpec"),
    "medprobe.data.readers": ("nifti_affine", "read_dicom", "read_dicom_series", "read_image", "read_mask",
                              "read_nifti"),
    "medprobe.data.splits": ("check_no_leakage", "patient_split", "resplit"),
    "medprobe.data.phantom": ("make_chest_phantoms", "make_volume_phantoms", "volume_metadata", "write_dicom",
                              "write_phantom_files"),
    "medprobe.data.adapters": ("AdapterInfo", "build_dataset", "get_adapter", "list_adapters", "register_adapter"),
}
_LAZY = {name: module for module, names in _MODULES.items() for name in names}
__all__ = [name for names in _MODULES.values() for name in names]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
