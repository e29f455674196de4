"""Where weights come from: ``random``, ``hub`` (a public id) or a local file/folder.

Local formats: ``.safetensors``, a ``.pth``/``.pt``/``.bin`` state dict (plain or wrapped in
``state_dict``/``model``/``teacher``/``student``), a DINOv2 original-format checkpoint, a
Hugging Face ``save_pretrained`` folder and medprobe's own fine-tuning ``best.pt``
(:mod:`medprobe.backbones.finetuned`). Offline, a hub request fails within seconds with a
message naming the file to download and how to pass it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch

from medprobe.errors import WeightsError
from medprobe.fsutil import atomic_write

STATE_DICT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                    "open_clip_pytorch_model.bin", "model.pth", "checkpoint.pth")
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student", "module")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.backbone.")


@dataclass(frozen=True)
class WeightsSource:
    kind: Literal["random", "hub", "file", "dir"]
    path: Path | None = None

    @property
    def tag(self) -> str:
        if self.kind in ("random", "hub"):
            return self.kind
        return f"{self.kind}:{path_digest(self.path)}"


def parse_weights(weights: str | os.PathLike | None) -> WeightsSource:
    """Interpret a ``weights`` value: ``random``, ``hub`` or an existing path."""
    if weights is None or str(weights) == "random":
        return WeightsSource("random")
    if str(weights) == "hub":
        return WeightsSource("hub")
    path = Path(weights).expanduser()
    if path.is_dir():
        return WeightsSource("dir", path)
    if path.is_file():
        return WeightsSource("file", path)
    raise WeightsError(f"weights {str(weights)!r} is neither 'random', 'hub' nor an existing file or folder")


def path_digest(path: Path | None) -> str:
    """SHA-256 prefix of a weights file (or of every weights file in a folder)."""
    assert path is not None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Checkpoint:
    """A state dict read from a file, the layout it was recognised as and the conversions applied."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    conversions: list[str] = field(default_factory=list)


# Classes that training scripts (MAE, DeiT, timm) pickle next to the weights; safe to rebuild.
SAFE_GLOBALS: tuple = (argparse.Namespace,)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a safetensors/torch file or a folder holding one, unwrapped."""
    return read_checkpoint(path).state_dict


def weights_file(folder: Path) -> Path:
    """The weights file of a folder (first of :data:`STATE_DICT_FILES`), else a WeightsError."""
    for name in STATE_DICT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"no weights file in folder {folder}; expected one of {', '.join(STATE_DICT_FILES)}")


def read_checkpoint(path: Path) -> Checkpoint:
    """Read ``path`` (a file or a folder holding one) with torch's safe loader and unwrap it."""
    path = Path(path)
    if path.is_dir():
        path = weights_file(path)
    raw, layout = _read_raw(path)
    from medprobe.backbones.finetuned import recognise
    finetuned = recognise(raw, path)  # medprobe's own best.pt: the backbone part, head dropped
    if finetuned is not None:
        return Checkpoint(*finetuned)
    sd, conversions = _unwrap(raw, path)
    return Checkpoint(sd, layout, conversions)


def _read_raw(path: Path) -> tuple[object, str]:
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes): the download or copy did not complete; "
                           "fetch it again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), "safetensors"
        except Exception as e:
            raise WeightsError(f"cannot read weights file {path}: not a complete safetensors file ({e}); "
                               f"it may be truncated ({size} bytes): fetch it again") from None
    if _is_torchscript(path):
        try:  # OpenAI's CLIP releases: a TorchScript archive; its tensors are read without running its code
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), "TorchScript archive"
        except Exception as e:
            raise WeightsError(f"cannot read TorchScript weights file {path}: {_reason(e)}") from None
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True), "PyTorch checkpoint"
    except Exception as e:  # corrupt or foreign file
        raise WeightsError(f"cannot read weights file {path}: {_reason(e)}") from None


def _is_torchscript(path: Path) -> bool:
    import zipfile
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _reason(e: Exception) -> str:
    """What went wrong, in words for a user (never torch's advice to load with ``weights_only=False``)."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it stores a Python object of type {found.group(1)} besides the tensors, which medprobe does not "
                f"unpickle (that could run code); re-save only the weights, e.g. "
                f"torch.save(checkpoint['model'], 'weights.pth'), or convert them to .safetensors")
    if "TorchScript" in text:
        return "it is a TorchScript archive medprobe could not read"
    if isinstance(e, EOFError) or "EOF" in text:
        return "the file ends early (truncated download or copy?): fetch it again"
    if isinstance(e, (KeyError, pickle_error())) or "invalid load key" in text:
        return ("it is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); expected "
                ".safetensors, a .pth/.pt/.bin state dict or a Hugging Face folder")
    if "zip archive" in text or "central directory" in text:
        return "the zip archive is damaged (truncated download?): fetch it again"
    text = text.split("Re-running `torch.load`")[0].strip() or type(e).__name__
    return text[:400]


def pickle_error() -> type:
    import pickle
    return pickle.UnpicklingError


_HEADS = ("dino_head.", "ibot_head.", "head.mlp.", "head.last_layer.")


def unwrap_state_dict(sd: object, path: Path | str = "<memory>") -> dict[str, torch.Tensor]:
    """Strip training wrappers: nested ``teacher``/``model`` dicts, ``module.``/``backbone.`` prefixes."""
    return _unwrap(sd, path)[0]


def _unwrap(sd: object, path: Path | str) -> tuple[dict[str, torch.Tensor], list[str]]:
    notes: list[str] = []
    while isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        key = next((k for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], dict)), None)
        if key is None:
            keys = ", ".join(map(str, list(sd)[:10])) or "none"
            raise WeightsError(f"{path} holds no state dict (top-level keys: {keys}); expected tensors, or one of "
                               f"{', '.join(_WRAPPER_KEYS)} holding them")
        notes.append(f"took the state dict under {key!r}")
        sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} holds a {type(sd).__name__}, expected a state dict")
    out = {}
    stripped: set[str] = set()
    heads: set[str] = set()
    chunked = False
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        if k.startswith(_HEADS):
            heads.add(k.split(".")[0] + ".")
            continue  # self-supervised projection heads are not part of the backbone
        for p in _PREFIXES:
            if k.startswith(p):
                stripped.add(p)
                k = k[len(p):]
        # DINOv2 FSDP block chunks: blocks.<chunk>.<index>.x -> blocks.<index>.x
        k2 = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        chunked |= k2 != k
        out[k2] = v
    if stripped:
        notes.append(f"removed key prefixes {', '.join(sorted(stripped))}")
    if heads:
        notes.append(f"dropped training heads {', '.join(sorted(heads))}")
    if chunked:
        notes.append("merged DINOv2 block chunks (blocks.<chunk>.<i> -> blocks.<i>)")
    if not out:
        raise WeightsError(f"{path} holds no tensors")
    return out, notes


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep keys under ``prefix`` (without it) when any key has it, else return ``sd``."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


# --------------------------------------------------------------------------- hub
def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection to the hub; never retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(_hub_endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_file(repo_id: str, filename: str, backbone: str) -> Path:
    """Path of ``filename`` from a Hugging Face repo: the local cache, else a download.

    Fails within seconds when the file is not cached and the hub cannot be reached.
    """
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:
        pass
    url = f"{_hub_endpoint()}/{repo_id}/blob/main/{filename}"
    if not hub_reachable():
        raise WeightsError(
            f"weights for backbone {backbone!r} are not available offline: download {filename} from {url} "
            f"and pass its path as weights (e.g. --weights /path/to/{filename}, or `weights: /path/to/{filename}` "
            f"in the experiment file), or put it in the Hugging Face cache (HF_HOME) on a machine with network.")
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:
        raise WeightsError(f"could not download {filename} for backbone {backbone!r} from {url}: {e}") from None


# --------------------------------------------------------------------------- DINOv2 original format
def timm_vit_to_dinov2(state_dict: dict[str, torch.Tensor], num_register_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Convert a timm DINOv2 ViT state dict to the layout of facebookresearch/dinov2 checkpoints.

    The inverse of timm's ``checkpoint_filter_fn`` for DINOv2: adds ``mask_token``, renames the
    SwiGLU ``fc1/fc2`` back to ``w12/w3`` and, with registers, restores ``register_tokens`` and
    the CLS position embedding folded into ``cls_token`` by timm.
    """
    sd = {k: v.detach().clone() for k, v in state_dict.items() if not k.startswith(("head.", "fc_norm."))}
    out: dict[str, torch.Tensor] = {}
    swiglu = _is_swiglu(sd)
    for k, v in sd.items():
        if swiglu:
            k = re.sub(r"(blocks\.\d+\.mlp)\.fc1\.", r"\1.w12.", k)
            k = re.sub(r"(blocks\.\d+\.mlp)\.fc2\.", r"\1.w3.", k)
        out[k] = v
    dim = out["cls_token"].shape[-1]
    if "reg_token" in out:
        reg = out.pop("reg_token")
        pos = out["pos_embed"]
        cls_pos = torch.zeros(1, 1, dim, dtype=pos.dtype)
        out["pos_embed"] = torch.cat([cls_pos, pos], dim=1)
        out["register_tokens"] = reg
    out.setdefault("mask_token", torch.zeros(1, dim))
    return out


def _is_swiglu(sd: dict[str, torch.Tensor]) -> bool:
    w1 = sd.get("blocks.0.mlp.fc1.weight")
    w2 = sd.get("blocks.0.mlp.fc2.weight")
    return w1 is not None and w2 is not None and w1.shape[0] == 2 * w2.shape[1]


def save_dinov2_checkpoint(vit: torch.nn.Module, path: str | os.PathLike, num_register_tokens: int = 0) -> Path:
    """Write a timm ViT as a DINOv2 original-format ``.pth`` (atomic: temp file then rename)."""
    state = timm_vit_to_dinov2(vit.state_dict(), num_register_tokens)
    return atomic_write(path, lambda fh: torch.save(state, fh))
