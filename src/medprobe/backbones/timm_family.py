"""Adapter for timm models: DINOv2, DeiT, MAE, supervised ViT, SAM's image encoder and CNNs.

All token extraction goes through timm's ``forward_intermediates``; ViTs are built with
``dynamic_img_size=True`` so position embeddings are interpolated for any input size. Entries
whose reference code interpolates differently (DINOv2 without registers: bicubic with
``scale_factor=(n + 0.1) / N`` and no antialias) get that formula instead of timm's.
"""
from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import timm
from timm.layers import resample_abs_pos_embed
import torch
import torch.nn.functional as F
from torch import nn

from medprobe.backbones.base import Backbone, BlockTokens, TokenOutput
from medprobe.backbones.loading import LoadReport, load_strict
from medprobe.backbones.registry import BackboneSpec
from medprobe.backbones.weights import Checkpoint, WeightsSource, hub_file, read_checkpoint
from medprobe.errors import ConfigError, WeightsError

KeyMap = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], list[str]]]


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    names = cls if isinstance(cls, (list, tuple)) else [cls]
    return tuple(f"{n}." for n in names)


def _check_registers(model: nn.Module, sd: dict[str, torch.Tensor], source: str, target: str) -> None:
    reg = getattr(model, "reg_token", None)
    want = 0 if reg is None else int(reg.shape[1])
    tokens = sd.get("register_tokens", sd.get("reg_token"))
    have = 0 if tokens is None else int(tokens.shape[1])
    if "pos_embed" in sd and ("cls_token" in sd) and want != have:
        if have == 0:
            raise WeightsError(f"weights {source} are a model without register tokens; {target} has {want}: use the "
                               f"entry without `_reg` (e.g. dinov2_vitb14 instead of dinov2_vitb14_reg)")
        raise WeightsError(f"weights {source} hold {have} register tokens; {target} has "
                           f"{want or 'none'}: use the `_reg` entry (e.g. dinov2_vitb14_reg)")


def _describe_filter(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], name: str) -> list[str]:
    notes = []
    dropped = [k for k in before if k not in after]
    added = [k for k in after if k not in before]
    resized = [f"{k} {tuple(before[k].shape)} -> {tuple(v.shape)}" for k, v in after.items()
               if k in before and tuple(before[k].shape) != tuple(v.shape)]
    if dropped or added:
        heads = sorted({k.split(".")[0] for k in dropped})
        notes.append(f"timm's {name} checkpoint filter: {len(dropped)} tensor(s) dropped or renamed "
                     f"(under {', '.join(heads[:6])}), {len(added)} added or renamed")
    if resized:
        notes.append(f"resized by timm's checkpoint filter: {', '.join(resized[:4])}")
    return notes


def load_timm_weights(model: nn.Module, ckpt: Checkpoint, source: str, target: str,
                      key_map: KeyMap | None = None) -> LoadReport:
    """Load a checkpoint into a timm model through the model module's own checkpoint filter.

    The filter converts foreign layouts (DINOv2 original checkpoints, SAM's full checkpoint,
    OpenAI CLIP). MAE decoders and classifier heads the model does not have are dropped (and
    reported); any other missing, unexpected or differently shaped tensor is a WeightsError.
    """
    report = LoadReport(source, ckpt.layout, list(ckpt.conversions))
    sd = dict(ckpt.state_dict)
    if key_map is not None:
        sd, notes = key_map(sd)
        report.conversions += notes
    decoder = [k for k in sd if k.startswith(("decoder_", "decoder."))]
    if decoder:  # MAE `_full`/visualize checkpoints: the pixel decoder is not part of the encoder
        sd = {k: v for k, v in sd.items() if k not in decoder}
        report.conversions.append(f"dropped the MAE decoder ({len(decoder)} tensors decoder_*)")
    _check_registers(model, sd, source, target)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        before = sd
        try:
            sd = filter_fn(dict(sd), model)
        except Exception as e:
            raise WeightsError(f"weights {source} do not fit {target}: {type(e).__name__}: {e}") from None
        report.conversions += _describe_filter(before, sd, type(model).__module__.rsplit(".", 1)[-1])
    own = model.state_dict()
    head = _classifier_prefixes(model)
    heads = [k for k in sd if k.startswith(head) and k not in own]
    if heads:
        sd = {k: v for k, v in sd.items() if k not in heads}
        report.conversions.append(f"dropped the classifier ({', '.join(sorted(heads)[:4])})")
    if "mask_token" in sd and "mask_token" not in own:
        sd.pop("mask_token")
        report.conversions.append("dropped mask_token (used only for masked pretraining)")
    load_strict(model, sd, source, target)
    report.tensors = len(own)
    return report


def dinov2_pos_embed(model: nn.Module, grid: tuple[int, int], offset: float) -> torch.Tensor:
    """The position embedding for a ``grid`` of patches as the original DINOv2 code computes it:
    bicubic, ``scale_factor = (n + offset) / N``, no antialias, in float32 (CLS position first)."""
    pos = model.pos_embed
    n = pos.shape[1] - 1
    if (grid[0] * grid[1] == n) and grid[0] == grid[1]:
        return pos
    side = int(math.sqrt(n))
    patch = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((grid[0] + offset) / side, (grid[1] + offset) / side),
                          mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != tuple(grid):
        raise ConfigError(f"position embedding resampled to {tuple(patch.shape[-2:])}, expected {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([pos[:, :1].float(), patch], dim=1).to(pos.dtype)


def _install_pos_embed(model: nn.Module, offset: float, antialias: bool) -> None:
    """Replace timm's position-embedding resampling (exact size, bicubic, antialias) by the one of
    the model's reference code: DINOv2's ``scale_factor=(n + offset)/N`` formula (``offset`` > 0,
    models whose pos_embed includes the CLS position) or exact-size bicubic without antialias
    (DeiT's and MAE's ``interpolate_pos_embed``)."""
    if offset and (getattr(model, "no_embed_class", False) or model.reg_token is not None):
        raise ConfigError("the original DINOv2 interpolation applies to models whose pos_embed includes the CLS "
                          "position")

    def _pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if offset:
            pos = dinov2_pos_embed(self, (h, w), offset)
        else:
            pos = resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=self.patch_embed.grid_size,
                                         num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
                                         antialias=antialias)
        x = x.view(b, -1, c)
        x = torch.cat(prefix + [x + pos], dim=1) if self.no_embed_class else torch.cat(prefix + [x], dim=1) + pos
        return self.pos_drop(x)

    model._pos_embed = types.MethodType(_pos_embed, model)


class TimmBackbone(Backbone):
    """A timm ViT or CNN behind the medprobe token contract."""

    key_map: KeyMap | None = None
    lora_targets = ("qkv", "proj", "fc1", "fc2")

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, overrides: dict[str, Any] | None = None,
                 timm_name: str | None = None) -> None:
        super().__init__()
        kwargs: dict[str, Any] = {**spec.arch_kwargs, **(overrides or {})}
        arch = timm_name or spec.arch
        self.is_sam = "samvit" in arch
        if spec.is_vit and not self.is_sam and spec.dynamic_size:
            kwargs.setdefault("dynamic_img_size", True)
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        if spec.is_vit and not self.is_sam and (spec.interpolate_offset or not spec.interpolate_antialias):
            _install_pos_embed(self.model, spec.interpolate_offset, spec.interpolate_antialias)
        self.spec = spec
        self.name = spec.name
        self.load_report: LoadReport | None = None
        target = f"{spec.name} ({arch})"
        if weights.kind == "hub":
            repo = spec.hub_id.removeprefix("timm/") if spec.hub_id else arch
            path = hub_file(f"timm/{repo}", "model.safetensors", spec.name)
            self.load_report = load_timm_weights(self.model, read_checkpoint(path), str(path), target, self.key_map)
        elif weights.kind in ("file", "dir"):
            self.load_report = load_timm_weights(self.model, self._read(weights), str(weights.path), target,
                                                 self.key_map)
        self.is_vit = spec.is_vit
        self.lora_targets = spec.lora_targets or type(self).lora_targets
        self.patch_size = spec.patch_size
        self.has_cls_token = spec.has_cls_token
        self.embed_dim = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.num_blocks = len(self.model.blocks) if self.is_vit else len(self.model.feature_info)
        self.default_image_size = spec.default_image_size
        self.preprocess = spec.preprocess
        self.weights_tag = weights.tag

    def _read(self, weights: WeightsSource) -> Checkpoint:
        path = weights.path
        if weights.kind == "dir" and (path / "config.json").is_file():
            if "dinov2" not in self.spec.arch:
                raise WeightsError(f"{path} is a Hugging Face folder; {self.spec.name} reads timm or original-release "
                                   f"checkpoints (.safetensors/.pth), not transformers models")
            return _read_hf_dinov2(path, self.spec)
        return read_checkpoint(path)

    def block_modules(self) -> list[nn.Module]:
        if self.is_vit:
            return list(self.model.blocks)
        modules = dict(self.model.named_modules())
        return [modules[info["module"]] for info in self.model.feature_info]

    def truncate(self, k: int) -> None:
        self.resolve_blocks([k - 1])
        self.model.prune_intermediate_layers(indices=[k - 1], prune_norm=False, prune_head=True)
        self.num_blocks = k

    def forward_tokens(self, images: torch.Tensor, blocks: Sequence[int] = ()) -> TokenOutput:
        idx = self.resolve_blocks(blocks)
        take = sorted(set(idx) | {self.num_blocks - 1})
        m = self.model
        if self.is_vit and not self.is_sam:
            final, inter = m.forward_intermediates(images, indices=take, return_prefix_tokens=True, norm=True,
                                                   output_fmt="NCHW")
            by_index = {}
            for i, (grid, prefix) in zip(take, inter):
                cls = prefix[:, 0] if self.has_cls_token and prefix.shape[1] else grid.mean(dim=(2, 3))
                by_index[i] = BlockTokens(i, cls, grid)
            last = by_index[self.num_blocks - 1]
            cls = final[:, 0] if self.has_cls_token else last.mean_patch
            grid = last.patch_grid
        else:  # SAM (neck applied to every block) and CNN stages: no class token
            final, inter = m.forward_intermediates(images, indices=take, norm=self.is_sam, output_fmt="NCHW")
            by_index = {i: BlockTokens(i, g.mean(dim=(2, 3)), g) for i, g in zip(take, inter)}
            grid = final if self.is_sam else by_index[self.num_blocks - 1].patch_grid
            cls = grid.mean(dim=(2, 3))
        return TokenOutput(cls=cls, mean_patch=grid.mean(dim=(2, 3)), patch_grid=grid,
                           blocks=[by_index[i] for i in idx])

    def attention(self, images: torch.Tensor) -> torch.Tensor:
        """Last-block softmax attention (B, heads, N, N), recomputed from the input of the last
        attention module (timm's fused kernels never form the matrix) and its own q/k projections."""
        if not self.is_vit or self.is_sam or not self.has_cls_token:
            return super().attention(images)
        attn = self.model.blocks[-1].attn
        if not hasattr(attn, "qkv") or getattr(self.model, "rope", None) is not None:
            raise ConfigError(f"attention maps are not available for {self.name}: its attention "
                              f"({type(attn).__name__}{', rotary position embedding' if hasattr(self.model, 'rope') else ''}) "
                              f"cannot be recomputed from q/k projections alone")
        h = self.input_of(attn, images, "x")
        b, n, _ = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _read_hf_dinov2(folder: Any, spec: BackboneSpec) -> Checkpoint:
    """A Hugging Face ``facebook/dinov2-*`` folder, loaded by transformers (every tensor accounted
    for) and converted to the original DINOv2 layout."""
    import transformers

    from medprobe.backbones.convert import hf_dinov2_to_original
    from medprobe.backbones.hf_family import load_hf_model
    config = transformers.AutoConfig.from_pretrained(str(folder))
    cls = {"dinov2": transformers.Dinov2Model,
           "dinov2_with_registers": transformers.Dinov2WithRegistersModel}.get(config.model_type)
    if cls is None:
        raise WeightsError(f"{folder}/config.json describes a {config.model_type!r} model; {spec.name} reads "
                           f"DINOv2 folders (facebook/dinov2-*)")
    model, report = load_hf_model(cls, config, folder, spec.name)
    return Checkpoint(hf_dinov2_to_original(model.state_dict()), f"Hugging Face {cls.__name__} folder",
                      report.conversions + ["transformers Dinov2 layout converted to the original DINOv2 layout"])
