"""Initial DINO/iBOT head weights from a DINOv2 training checkpoint (``heads.weights``).

DINOv2 saves ``teacher_checkpoint.pth`` as ``{"teacher": {"backbone.*", "dino_head.*",
"ibot_head.*"}}`` and full checkpoints as ``{"model": {"student.*", "teacher.*"}, ...}``. Its
``DINOHead`` is ``mlp`` (Linear, GELU, ..., Linear) then a weight-normalised ``last_layer``
(``weight_g``, ``weight_v``; or ``parametrizations.weight.original0/1`` with torch's newer
``weight_norm``; a plain ``weight`` is split into g = row norms, v = the rows). Every head
tensor of the file must land in a head of this run and every head parameter must come from
the file; the backbone's tensors (``backbone.*``) are left to ``backbone.weights``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from medprobe.backbones.loading import check_accounted
from medprobe.errors import WeightsError
from medprobe.pretrain.heads import DINOHead

_HEADS = ("dino_head", "ibot_head")
_LAST = {"last_layer.weight_g": "gain", "last_layer.parametrizations.weight.original0": "gain",
         "last_layer.weight_v": "prototypes.weight", "last_layer.parametrizations.weight.original1": "prototypes.weight"}
HINT = ("Set loss.prototypes / loss.ibot_prototypes / loss.head_hidden / loss.bottleneck / loss.head_layers to "
        "the checkpoint's head shape, and loss.separate_ibot_head: false for a checkpoint without ibot_head "
        "(DINOv2's default).")


def _read(path: Path) -> object:
    from medprobe.backbones.weights import _read_raw
    if not path.is_file():
        raise WeightsError(f"heads.weights: {path} is not a file")
    return _read_raw(path)[0]


def head_state_dicts(path: str | Path, which: str = "teacher") -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """``{"dino_head": {...}, "ibot_head": {...}}`` of a checkpoint (DINOv2 key names) and notes on what was done."""
    path = Path(path).expanduser()
    raw = _read(path)
    notes: list[str] = []
    for _ in range(3):  # unwrap {"teacher": ...}, {"model": ...}, {"state_dict": ...}
        if not isinstance(raw, dict) or any(isinstance(v, torch.Tensor) for v in raw.values()):
            break
        key = next((k for k in (which, "model", "state_dict") if isinstance(raw.get(k), dict)), None)
        if key is None:
            raise WeightsError(f"heads.weights {path}: no state dict under {which!r}, 'model' or 'state_dict' "
                               f"(top-level keys: {', '.join(map(str, list(raw)[:10]))})")
        notes.append(f"took the state dict under {key!r}")
        raw = raw[key]
    if not isinstance(raw, dict):
        raise WeightsError(f"heads.weights {path}: holds a {type(raw).__name__}, expected a state dict")
    sd = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k.removeprefix("module.")
        if k.startswith(("teacher.", "student.")):  # a full training checkpoint's "model" dict
            if not k.startswith(which + "."):
                continue
            k = k[len(which) + 1:]
        sd[k] = v
    heads: dict[str, dict[str, torch.Tensor]] = {}
    unexpected, backbone = [], 0
    for k, v in sd.items():
        top, _, rest = k.partition(".")
        if top in _HEADS:
            heads.setdefault(top, {})[rest] = v
        elif top == "backbone":
            backbone += 1
        else:
            unexpected.append(k)
    if unexpected:
        check_accounted(str(path), "the DINO/iBOT heads", (), unexpected, (),
                        "heads.weights takes a DINOv2 checkpoint holding dino_head.* (and ibot_head.*) tensors.")
    if not heads:
        raise WeightsError(f"heads.weights {path}: no dino_head.* or ibot_head.* tensors in the file "
                           f"({len(sd)} tensors{', all of the backbone' if backbone == len(sd) and sd else ''})")
    if backbone:
        notes.append(f"left {backbone} backbone.* tensors to backbone.weights")
    return heads, notes


def convert_head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 ``DINOHead`` keys -> :class:`DINOHead` keys (``last_layer`` -> ``prototypes``, ``gain``)."""
    out = {}
    for k, v in sd.items():
        if k in _LAST:
            v = v.reshape(-1, 1) if _LAST[k] == "gain" else v
            out[_LAST[k]] = v
        elif k == "last_layer.weight":  # not weight-normalised: w = g * v / |v| with v = w, g = |w|
            out["prototypes.weight"] = v
            out["gain"] = v.norm(dim=1, keepdim=True)
        else:
            out[k] = v
    return out


def load_heads(path: str | Path, which: str, dino_head: DINOHead, ibot_head: DINOHead | None) -> list[str]:
    """Copy the checkpoint's heads into ``dino_head`` / ``ibot_head``; WeightsError naming keys that do not fit."""
    heads, notes = head_state_dicts(path, which)
    ours = {"dino_head": dino_head, "ibot_head": ibot_head}
    missing, unexpected, mismatched = [], [], []
    for name, module in ours.items():
        if module is None:
            unexpected += [f"{name}.{k}" for k in heads.get(name, {})]
            continue
        sd = convert_head(heads.get(name, {}))
        own = module.state_dict()
        missing += [f"{name}.{k}" for k in own if k not in sd]
        unexpected += [f"{name}.{k}" for k in sd if k not in own]
        mismatched += [f"{name}.{k} (file {tuple(v.shape)}, run {tuple(own[k].shape)})" for k, v in sd.items()
                       if k in own and tuple(v.shape) != tuple(own[k].shape)]
    check_accounted(str(path), f"the DINO/iBOT heads of this run ({which})", missing, unexpected, mismatched, HINT)
    for name, module in ours.items():
        if module is not None:
            module.load_state_dict(convert_head(heads[name]), strict=True)
    return notes + [f"loaded {', '.join(sorted(heads))} from {path}"]
