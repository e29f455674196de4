"""Evaluation and adaptation protocols, registered by name for experiment files.

Importing this package registers the built-in protocols; ``list_protocols()`` names them.
"""
from __future__ import annotations

import importlib

_MODULES = ("medprobe.protocols.frozen", "medprobe.protocols.adapt", "medprobe.protocols.volume",
            "medprobe.protocols.segmentation", "medprobe.protocols.zero_shot",
            "medprobe.protocols.report_generation")

for _module in _MODULES:
    importlib.import_module(_module)


def list_protocols() -> list[str]:
    from medprobe.protocols.base import all_protocols
    return sorted(all_protocols())
