"""medprobe's own fine-tuning checkpoints (``best.pt`` of the adaptation protocols) as backbone weights.

The adaptation loop writes ``{"format": FORMAT, "backbone": NAME, "protocol": ..., "state_dict": SD}``
where ``SD`` is the whole classifier's state: the backbone under ``encoder.backbone.model.*`` and
what the protocol added around it (the linear ``head.*``, attention ``pool.*``, an appended
DeiT's ``encoder.*``). :func:`recognise` keeps the backbone's tensors, in the layout the family
loaders read (the wrapped network's own names), and reports every dropped group as a conversion;
the family loaders then load them strictly, so a fine-tuned backbone is read back whole or not at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medprobe.errors import WeightsError

FORMAT = "medprobe.adapt.checkpoint/1"
BACKBONE_PREFIX = "encoder.backbone.model."


def checkpoint_payload(state_dict: dict[str, torch.Tensor], backbone: str | None, protocol: str | None
                       ) -> dict[str, Any]:
    """What the adaptation loop saves (see the module doc)."""
    return {"format": FORMAT, "backbone": backbone or "", "protocol": protocol or "", "state_dict": state_dict}


def recognise(raw: object, path: Path | str) -> tuple[dict[str, torch.Tensor], str, list[str]] | None:
    """``(backbone state dict, layout, conversions)`` of a medprobe fine-tuning checkpoint, else None."""
    if not (isinstance(raw, dict) and raw.get("format") == FORMAT):
        return None
    sd = raw.get("state_dict")
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{path}: a medprobe fine-tuning checkpoint without tensors (damaged file?)")
    name, protocol = raw.get("backbone") or "?", raw.get("protocol") or "?"
    lora = sorted(k for k in sd if ".lora_" in k)
    if lora:
        raise WeightsError(f"{path}: a LoRA checkpoint ({protocol}): its adapters ({lora[0]} ...) are not merged into "
                           f"the backbone's weights, so it cannot be read as {name} weights")
    kept = {k[len(BACKBONE_PREFIX):]: v for k, v in sd.items() if k.startswith(BACKBONE_PREFIX)}
    if not kept:
        raise WeightsError(f"{path}: a medprobe fine-tuning checkpoint holding no backbone tensors "
                           f"({BACKBONE_PREFIX}*)")
    dropped: dict[str, list[str]] = {}
    for k in sd:
        if not k.startswith(BACKBONE_PREFIX):
            group = ("classifier head" if k.startswith("head.") else "slice pooling" if k.startswith("pool.")
                     else "appended classifier" if k.startswith("encoder.") else "other")
            dropped.setdefault(group, []).append(k)
    notes = [f"kept the fine-tuned backbone ({BACKBONE_PREFIX}*, {len(kept)} tensors)"]
    notes += [f"dropped the {g} ({', '.join(sorted(ks)[:4])}{' ...' if len(ks) > 4 else ''})"
              for g, ks in dropped.items()]
    return kept, f"medprobe fine-tuning checkpoint of {name} ({protocol})", notes
