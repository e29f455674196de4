"""The protocol names and the module that registers each, readable without importing torch.

``medprobe list protocols`` answers from this table; ``tests/test_cli_imports.py`` checks it
against the registry (every registered protocol listed, with the module that defines it).
"""
from __future__ import annotations

CATALOG: dict[str, str] = {
    "knn": "medprobe.protocols.frozen",
    "linear": "medprobe.protocols.frozen",
    "fewshot": "medprobe.protocols.frozen",
    "metadata": "medprobe.protocols.frozen",
    "volume_probe": "medprobe.protocols.volume",
    "zero_shot": "medprobe.protocols.zero_shot",
    "finetune": "medprobe.protocols.adapt.protocols",
    "lora": "medprobe.protocols.adapt.protocols",
    "bitfit": "medprobe.protocols.adapt.protocols",
    "deit_head": "medprobe.protocols.adapt.protocols",
    "freeze_blocks": "medprobe.protocols.adapt.protocols",
    "first_blocks": "medprobe.protocols.adapt.protocols",
    "scratch": "medprobe.protocols.adapt.protocols",
    "segmentation": "medprobe.protocols.segmentation.protocol",
    "report_generation": "medprobe.protocols.report_generation.protocol",
}


def protocol_names() -> list[str]:
    """Every protocol name, sorted (no protocol module is imported)."""
    return sorted(CATALOG)
