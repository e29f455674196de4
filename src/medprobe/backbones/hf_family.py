"""Adapter for Hugging Face transformers vision models (RAD-DINO's Dinov2Model, ViT-MSN, SigLIP towers).

Weights always go through transformers' own ``from_pretrained`` (with ``output_loading_info``),
so the key conversions of the installed transformers version apply to released files (e.g.
``attention.attention.query`` -> ``attention.q_proj``); any tensor missing, unexpected or of
another shape after them is a :class:`WeightsError` naming the file and the keys.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from medprobe.backbones.base import Backbone, BlockTokens, TokenOutput
from medprobe.backbones.loading import LoadReport, check_accounted
from medprobe.backbones.registry import BackboneSpec
from medprobe.backbones.weights import WeightsSource, hub_file, read_checkpoint, strip_prefix
from medprobe.errors import WeightsError

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# Architecture-defining configuration fields: a folder must agree with the registry entry on these.
ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
               "num_register_tokens", "use_swiglu_ffn", "mlp_ratio")
# Tensors a feature extractor does not use and released files may lack.
OPTIONAL = ("pooler.", "embeddings.mask_token", "head.")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' own log lines and progress bars off: medprobe reports the loading info itself."""
    log = transformers.utils.logging
    level = log.get_verbosity()
    bars = log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def config_class(model_cls: type) -> type:
    return model_cls.config_class


def hf_folder_weights(folder: Path) -> Path:
    """The weights file of a ``save_pretrained`` folder, else a WeightsError naming the folder."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"Hugging Face folder {folder} has config.json but no weights file; expected one of "
                       f"{', '.join(HF_WEIGHT_FILES)} (the download is incomplete?)")


def _check_config(folder: Path, config: Any, expected: Any, target: str) -> None:
    if config.model_type != expected.model_type:
        raise WeightsError(f"{folder}/config.json describes a {config.model_type!r} model; {target} is "
                           f"{expected.model_type!r}")
    diff = [f"{f}={getattr(config, f)!r} (expected {getattr(expected, f)!r})" for f in ARCH_FIELDS
            if hasattr(expected, f) and getattr(config, f, None) != getattr(expected, f)]
    if diff:
        raise WeightsError(f"{folder}/config.json does not describe {target}: {', '.join(diff)}; use the backbone "
                           f"entry of that size, or pass the shape with --arch KEY=VALUE (e.g. --arch "
                           f"{diff[0].split(' ')[0]})")


def load_hf_model(model_cls: type, expected: Any, weights: WeightsSource | Path, target: str,
                  optional: Sequence[str] = OPTIONAL) -> tuple[nn.Module, LoadReport]:
    """Build ``model_cls`` from a ``save_pretrained`` folder or a state-dict file, every tensor accounted for.

    ``expected`` is the configuration the registry entry (plus tiny/overrides) describes; a
    folder's config.json must agree with it on :data:`ARCH_FIELDS`.
    """
    path = Path(weights.path if isinstance(weights, WeightsSource) else weights)
    config = None
    if path.is_dir() and (path / "config.json").is_file():
        weights_path = hf_folder_weights(path)
        try:
            config = transformers.AutoConfig.from_pretrained(str(path))
        except Exception as e:
            raise WeightsError(f"cannot read {path / 'config.json'}: {e}") from None
        if getattr(config, "vision_config", None) is not None and not hasattr(expected, "vision_config"):
            config = None
    if path.is_dir() and (path / "config.json").is_file() and config is not None:
        _check_config(path, config, expected, target)
        report = LoadReport(str(weights_path), "Hugging Face save_pretrained folder",
                            ["key names converted by transformers' from_pretrained"])
        kwargs: dict[str, Any] = {"pretrained_model_name_or_path": str(path)}
    elif path.is_dir() and (path / "config.json").is_file():  # a whole image-text model: its vision tower
        report, kwargs, weights_path = _vision_tower_of(path, model_cls, expected, target)
    else:
        ckpt = read_checkpoint(path)
        sd = _tower_state_dict(ckpt.state_dict, model_cls)
        weights_path = path
        report = LoadReport(str(path), f"{ckpt.layout} ({model_cls.__name__} state dict)",
                            ckpt.conversions + ["key names converted by transformers' from_pretrained"])
        kwargs = {"pretrained_model_name_or_path": None, "config": expected, "state_dict": sd}
    try:
        with _quiet():
            model, info = model_cls.from_pretrained(**kwargs, output_loading_info=True)
    except WeightsError:
        raise
    except Exception as e:
        raise WeightsError(f"cannot load weights file {weights_path} into {target}: "
                           f"{type(e).__name__}: {str(e)[:400] or 'no reason given'} (truncated or damaged "
                           f"download? fetch it again)") from None
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(tuple(optional))]
    mismatched = [str(k) for k in info.get("mismatched_keys", ())]
    check_accounted(str(weights_path), target, missing, info.get("unexpected_keys", ()), mismatched)
    report.tensors = len(model.state_dict())
    return model, report


def _tower_state_dict(sd: dict[str, torch.Tensor], model_cls: type) -> dict[str, torch.Tensor]:
    """Drop the base-model prefix; of an image-text model keep the vision tower (``vision_model.*``)."""
    sd = strip_prefix(sd, model_cls.base_model_prefix + ".")
    return strip_prefix(sd, "vision_model.")


def _vision_tower_of(folder: Path, model_cls: type, expected: Any, target: str
                     ) -> tuple[LoadReport, dict[str, Any], Path]:
    import transformers as tf
    config = tf.AutoConfig.from_pretrained(str(folder)).vision_config
    weights_path = hf_folder_weights(folder)
    if weights_path.name.endswith(".index.json"):
        raise WeightsError(f"{weights_path}: sharded image-text checkpoints are not read; pass the single "
                           f"model.safetensors file holding the vision tower")
    _check_config(folder, config, expected, target)
    ckpt = read_checkpoint(weights_path)
    report = LoadReport(str(weights_path), "Hugging Face image-text model folder",
                        ckpt.conversions + ["kept the vision tower (vision_model.*)",
                                            "key names converted by transformers' from_pretrained"])
    kwargs = {"pretrained_model_name_or_path": None, "config": config,
              "state_dict": _tower_state_dict(ckpt.state_dict, model_cls)}
    return report, kwargs, weights_path


def _layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers: ``encoder.layer`` (Dinov2), ``layers`` (ViT/ViTMSN in transformers 5),
    ``encoder.layers`` (CLIP/SigLIP vision towers)."""
    for path in ("layers", "encoder.layer", "encoder.layers", "vision_model.encoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise WeightsError(f"cannot find the transformer layers of {type(model).__name__}")


def _set_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    for path in ("layers", "encoder.layer", "encoder.layers", "vision_model.encoder.layers"):
        *parents, last = path.split(".")
        obj: Any = model
        for part in parents:
            obj = getattr(obj, part, None)
        if obj is not None and isinstance(getattr(obj, last, None), nn.ModuleList):
            setattr(obj, last, layers)
            return
    raise WeightsError(f"cannot find the transformer layers of {type(model).__name__}")


class HFBackbone(Backbone):
    """A transformers ViT-style model; intermediate blocks come from ``hidden_states``."""

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        model_cls = getattr(transformers, spec.arch)
        expected = config_class(model_cls)(**{**spec.arch_kwargs, **(overrides or {})})
        target = f"{spec.name} ({spec.arch})"
        self.load_report: LoadReport | None = None
        if weights.kind == "hub":
            config_path = hub_file(spec.hub_id, "config.json", spec.name)
            hub_file(spec.hub_id, "model.safetensors", spec.name)
            self.model, self.load_report = load_hf_model(model_cls, expected, config_path.parent, target)
        elif weights.kind in ("file", "dir"):
            self.model, self.load_report = load_hf_model(model_cls, expected, weights, target)
        else:
            self.model = model_cls(expected)
        self.model.eval()
        cfg = self.model.config
        self.spec = spec
        self.name = spec.name
        self.is_vit = True
        self.lora_targets = spec.lora_targets or ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
        self.patch_size = int(cfg.patch_size)
        self.has_cls_token = spec.has_cls_token
        self.embed_dim = int(cfg.hidden_size)
        self.num_blocks = int(cfg.num_hidden_layers)
        self.num_prefix_tokens = (1 if spec.has_cls_token else 0) + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.default_image_size = spec.default_image_size
        self.preprocess = spec.preprocess
        self.weights_tag = weights.tag
        self._interpolate_kw = ({"interpolate_pos_encoding": True}
                                if "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters else {})

    def block_modules(self) -> list[nn.Module]:
        return list(_layers(self.model))

    def truncate(self, k: int) -> None:
        self.resolve_blocks([k - 1])
        _set_layers(self.model, _layers(self.model)[:k])
        self.model.config.num_hidden_layers = k
        self.num_blocks = k

    def _final_norm(self) -> nn.Module:
        for name in ("layernorm", "post_layernorm"):
            norm = getattr(self.model, name, None)
            if isinstance(norm, nn.Module):
                return norm
        raise WeightsError(f"cannot find the final norm of {type(self.model).__name__}")

    def forward_tokens(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> TokenOutput:
        idx = self.resolve_blocks(blocks)
        out = self.model(pixel_values=images, output_hidden_states=bool(idx), **self._interpolate_kw)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        p = self.num_prefix_tokens

        def split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            grid = tokens[:, p:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            return (tokens[:, 0] if self.has_cls_token else grid.mean(dim=(2, 3))), grid

        # last_hidden_state has the model's final norm applied (Dinov2, ViT, ViTMSN, SigLIP)
        cls, grid = split(out.last_hidden_state)
        norm = self._final_norm()
        layer_blocks = [BlockTokens(i, *split(out.last_hidden_state if i == self.num_blocks - 1
                                              else norm(out.hidden_states[i + 1]))) for i in idx]
        return TokenOutput(cls=cls, mean_patch=grid.mean(dim=(2, 3)), patch_grid=grid, blocks=layer_blocks)

    def attention(self, images: torch.Tensor) -> torch.Tensor:
        """Last-block softmax attention (B, heads, N, N), from one eager forward pass."""
        m = self.model
        before = m.config._attn_implementation
        m.set_attn_implementation("eager")
        try:
            out = m(pixel_values=images, output_attentions=True, **self._interpolate_kw)
        finally:
            m.set_attn_implementation(before)
        if not out.attentions:
            from medprobe.errors import ConfigError
            raise ConfigError(f"{self.name}: the model returned no attention weights")
        return out.attentions[-1]
