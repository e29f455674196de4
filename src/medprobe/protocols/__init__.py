"""Evaluation and adaptation protocols, registered by name for experiment files.

The built-in protocols are registered on first use (:func:`load_builtin`, called by
``get_protocol``/``list_protocols``), so importing this package (or its torch-free
:mod:`~medprobe.protocols.catalog`) stays cheap.
"""
from __future__ import annotations

import importlib

from medprobe.protocols.catalog import CATALOG


def load_builtin() -> None:
    """Import every module that registers a built-in protocol (once; later calls are free)."""
    for module in dict.fromkeys(CATALOG.values()):
        importlib.import_module(module)


def list_protocols() -> list[str]:
    from medprobe.protocols.base import all_protocols
    return sorted(all_protocols())
