"""Helpers for the backbone parity and layout tests: perturbed random weights and layout converters.

The converters are written here, from the two libraries' module layouts, independently of
medprobe's own conversion code, so a parity test compares two implementations.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def perturb(module: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Add noise to every parameter (layer scales, biases and norms included), so that a swapped,
    transposed or dropped tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def images(size: int | tuple[int, int], n: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def _split_qkv(sd: dict, prefix: str, out: dict, names: tuple[str, str, str]) -> None:
    for kind in ("weight", "bias"):
        q, k, v = sd[f"{prefix}.{kind}"].chunk(3)
        for name, t in zip(names, (q, k, v)):
            out[f"{name}.{kind}"] = t


def timm_vit_to_hf_vit(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` -> transformers 5 ``ViTModel`` (in-memory names)."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(depth):
        b, h = f"blocks.{i}", f"layers.{i}"
        _split_qkv(sd, f"{b}.attn.qkv", out, tuple(f"{h}.attention.{n}_proj" for n in "qkv"))
        for src, dst in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"),
                         ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"{h}.{dst}.{kind}"] = sd[f"{b}.{src}.{kind}"]
    return out


def dinov2_original_to_hf(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2 layout -> transformers 5 ``Dinov2Model``/``Dinov2WithRegistersModel``."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"],
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(depth):
        b, h = f"blocks.{i}", f"encoder.layer.{i}"
        _split_qkv(sd, f"{b}.attn.qkv", out, tuple(f"{h}.attention.{n}_proj" for n in "qkv"))
        for src, dst in (("attn.proj", "attention.o_proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                out[f"{h}.{dst}.{kind}"] = sd[f"{b}.{src}.{kind}"]
        out[f"{h}.layer_scale1.lambda1"] = sd[f"{b}.ls1.gamma"]
        out[f"{h}.layer_scale2.lambda1"] = sd[f"{b}.ls2.gamma"]
    return out


def timm_sam_to_hf(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm ``samvit`` -> transformers ``SamVisionModel``."""
    out = {"vision_encoder.pos_embed": sd["pos_embed"],
           "vision_encoder.patch_embed.projection.weight": sd["patch_embed.proj.weight"],
           "vision_encoder.patch_embed.projection.bias": sd["patch_embed.proj.bias"]}
    for i in range(depth):
        b, h = f"blocks.{i}", f"vision_encoder.layers.{i}"
        for src, dst in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "attn.qkv"),
                         ("attn.proj", "attn.proj"), ("mlp.fc1", "mlp.lin1"), ("mlp.fc2", "mlp.lin2")):
            for kind in ("weight", "bias"):
                out[f"{h}.{dst}.{kind}"] = sd[f"{b}.{src}.{kind}"]
        out[f"{h}.attn.rel_pos_h"] = sd[f"{b}.attn.rel_pos_h"]
        out[f"{h}.attn.rel_pos_w"] = sd[f"{b}.attn.rel_pos_w"]
    for src, dst in (("neck.0.weight", "conv1.weight"), ("neck.1.weight", "layer_norm1.weight"),
                     ("neck.1.bias", "layer_norm1.bias"), ("neck.2.weight", "conv2.weight"),
                     ("neck.3.weight", "layer_norm2.weight"), ("neck.3.bias", "layer_norm2.bias")):
        out[f"vision_encoder.neck.{dst}"] = sd[src]
    return out


def open_clip_to_hf_clip(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` tower -> transformers ``CLIPVisionModel`` (no projection)."""
    out = {"embeddings.class_embedding": sd["class_embedding"],
           "embeddings.patch_embedding.weight": sd["conv1.weight"],
           "embeddings.position_embedding.weight": sd["positional_embedding"],
           "pre_layrnorm.weight": sd["ln_pre.weight"], "pre_layrnorm.bias": sd["ln_pre.bias"],
           "post_layernorm.weight": sd["ln_post.weight"], "post_layernorm.bias": sd["ln_post.bias"]}
    for i in range(depth):
        b, h = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{b}.attn.in_proj_{kind}"].chunk(3)
            out.update({f"{h}.self_attn.q_proj.{kind}": q, f"{h}.self_attn.k_proj.{kind}": k,
                        f"{h}.self_attn.v_proj.{kind}": v})
            for src, dst in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{h}.{dst}.{kind}"] = sd[f"{b}.{src}.{kind}"]
    return out


def original_dinov2_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The facebookresearch/dinov2 ``interpolate_pos_encoding`` (interpolate_offset=0.1, no antialias)."""
    n = pos.shape[1] - 1
    side = int(n ** 0.5)
    patch = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = torch.nn.functional.interpolate(
        patch, scale_factor=((grid[0] + 0.1) / side, (grid[1] + 0.1) / side), mode="bicubic", antialias=False)
    assert tuple(patch.shape[-2:]) == tuple(grid)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


# --------------------------------------------------------------------------- parity cases
# Each case builds a medprobe backbone (tiny width and depth, the real native image size) with
# perturbed random weights, the same network in a second library, and returns
# {size: (max |CLS diff|, max |patch-token diff|)}.
def _hf(model_cls, config, sd):
    model = model_cls(config).eval()
    model.load_state_dict(sd, strict=True)
    return model


@torch.no_grad()
def dinov2_vs_transformers(registers: bool, sizes=(518,)) -> dict[int, tuple[float, float]]:
    import transformers

    from medprobe.backbones import create_backbone
    from medprobe.backbones.weights import timm_vit_to_dinov2
    name = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    bb = create_backbone(name, "random", tiny=True, overrides=dict(img_size=518, depth=2))
    perturb(bb.model)
    original = timm_vit_to_dinov2(bb.model.state_dict(), 4 if registers else 0)
    kw = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=518,
              patch_size=14, layer_norm_eps=1e-6)
    if registers:
        ref = _hf(transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig(
            num_register_tokens=4, **kw), dinov2_original_to_hf(original, 2))
    else:
        ref = _hf(transformers.Dinov2Model, transformers.Dinov2Config(**kw), dinov2_original_to_hf(original, 2))
    out = {}
    for s in sizes:
        x = images(s)
        mine = bb.forward_tokens(x)
        tokens = ref(pixel_values=x).last_hidden_state
        grid = tokens[:, 1 + (4 if registers else 0):].transpose(1, 2).reshape(x.shape[0], -1, s // 14, s // 14)
        out[s] = (max_diff(mine.cls, tokens[:, 0]), max_diff(mine.patch_grid, grid))
    return out


@torch.no_grad()
def dinov2_vs_original_formula(sizes=(224, 448)) -> dict[int, tuple[float, float]]:
    """medprobe's dinov2_vits14 at other sizes vs timm at that fixed size with the position
    embedding resampled by the original DINOv2 formula (the reference for the released models)."""
    import timm

    from medprobe.backbones import create_backbone
    bb = create_backbone("dinov2_vits14", "random", tiny=True, overrides=dict(img_size=518, depth=2))
    perturb(bb.model)
    out = {}
    for s in sizes:
        ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, embed_dim=48, depth=2,
                                num_heads=2, img_size=s).eval()
        sd = dict(bb.model.state_dict())
        sd["pos_embed"] = original_dinov2_pos_embed(sd["pos_embed"], (s // 14, s // 14))
        ref.load_state_dict(sd, strict=True)
        x = images(s)
        mine = bb.forward_tokens(x)
        tokens = ref.forward_features(x)
        grid = tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, s // 14, s // 14)
        out[s] = (max_diff(mine.cls, tokens[:, 0]), max_diff(mine.patch_grid, grid))
    return out


@torch.no_grad()
def sam_vs_transformers(sizes=(1024,)) -> dict[int, tuple[float, float]]:
    import transformers

    from medprobe.backbones import create_backbone
    bb = create_backbone("sam_vitb16", "random", tiny=True,
                         overrides=dict(img_size=1024, depth=2, window_size=14, global_attn_indexes=(1,)))
    perturb(bb.model)
    config = transformers.SamVisionConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=1024,
                                          patch_size=16, output_channels=32, window_size=14, global_attn_indexes=[1],
                                          mlp_dim=192)
    ref = _hf(transformers.SamVisionModel, config, timm_sam_to_hf(bb.model.state_dict(), 2))
    out = {}
    for s in sizes:
        x = images(s, n=1)
        mine = bb.forward_tokens(x)
        grid = ref(pixel_values=x).last_hidden_state
        out[s] = (max_diff(mine.cls, grid.mean(dim=(2, 3))), max_diff(mine.patch_grid, grid))
    return out


@torch.no_grad()
def clip_vs_transformers(name: str, sizes=(224,)) -> dict[int, tuple[float, float]]:
    """At the native size (off it transformers resamples without antialias, open_clip with)."""
    import transformers

    from medprobe.backbones import create_backbone
    bb = create_backbone(name, "random", tiny=True, overrides=dict(image_size=224, layers=2))
    perturb(bb.model)
    quick = bb.model.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    p = bb.patch_size
    config = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=224, patch_size=p, layer_norm_eps=1e-5,
                                           hidden_act="quick_gelu" if quick else "gelu")
    ref = _hf(transformers.CLIPVisionModel, config, open_clip_to_hf_clip(bb.model.state_dict(), 2))
    out = {}
    for s in sizes:
        x = images(s)
        mine = bb.forward_tokens(x)
        o = ref(pixel_values=x, interpolate_pos_encoding=True)
        tokens = ref.post_layernorm(o.last_hidden_state)
        grid = tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, s // p, s // p)
        out[s] = (max_diff(mine.cls, o.pooler_output), max_diff(mine.patch_grid, grid))
    return out


@torch.no_grad()
def vit_vs_transformers(name: str, sizes=(224, 448)) -> dict[int, tuple[float, float]]:
    import transformers

    from medprobe.backbones import create_backbone
    bb = create_backbone(name, "random", tiny=True, overrides=dict(img_size=224, depth=2))
    perturb(bb.model)
    config = transformers.ViTConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=224, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    model.load_state_dict(timm_vit_to_hf_vit(bb.model.state_dict(), 2), strict=True)
    out = {}
    for s in sizes:
        x = images(s)
        mine = bb.forward_tokens(x)
        tokens = model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        grid = tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, s // 16, s // 16)
        out[s] = (max_diff(mine.cls, tokens[:, 0]), max_diff(mine.patch_grid, grid))
    return out


@torch.no_grad()
def clip_vs_open_clip_resize(name: str, sizes=(448,)) -> dict[int, tuple[float, float]]:
    """Off the native size the reference is open_clip's own ``resize_pos_embed`` (as open_clip
    loads a checkpoint into a tower built for another size)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower, resize_pos_embed

    from medprobe.backbones import create_backbone
    bb = create_backbone(name, "random", tiny=True, overrides=dict(image_size=224, layers=2))
    perturb(bb.model)
    cfg = open_clip.get_model_config(bb.spec.arch)
    out = {}
    for s in sizes:
        vision = CLIPVisionCfg(**{**cfg["vision_cfg"], **bb.spec.tiny, "image_size": s, "layers": 2})
        holder = nn.Module()
        holder.visual = _build_vision_tower(cfg["embed_dim"], vision, quick_gelu=cfg.get("quick_gelu", False)).eval()
        sd = {f"visual.{k}": v for k, v in bb.model.state_dict().items()}
        resize_pos_embed(sd, holder)
        holder.load_state_dict(sd, strict=True)
        x = images(s)
        mine = bb.forward_tokens(x)
        ref = holder.visual
        ref.output_tokens = True
        _, tokens = ref(x)  # ln_post applied to the patch tokens; pooled is projected: take CLS ourselves
        cls_ref = ref.ln_post(ref.transformer(ref.ln_pre(torch.cat(
            [ref.class_embedding.expand(x.shape[0], 1, -1), ref.conv1(x).flatten(2).transpose(1, 2)], 1)
            + ref.positional_embedding)))[:, 0]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, s // bb.patch_size, s // bb.patch_size)
        out[s] = (max_diff(mine.cls, cls_ref), max_diff(mine.patch_grid, grid))
    return out


PARITY_CASES = {
    "dinov2_vits14 vs transformers Dinov2Model": lambda: dinov2_vs_transformers(False),
    "dinov2_vits14 vs original DINOv2 interpolation": dinov2_vs_original_formula,
    "dinov2_vits14_reg vs transformers Dinov2WithRegistersModel": lambda: dinov2_vs_transformers(True, (518, 224, 448)),
    "sam_vitb16 vs transformers SamVisionModel": sam_vs_transformers,
    "clip_vitl14 vs transformers CLIPVisionModel": lambda: clip_vs_transformers("clip_vitl14"),
    "openclip_vith14 vs transformers CLIPVisionModel": lambda: clip_vs_transformers("openclip_vith14"),
    "clip_vitl14 vs open_clip resize_pos_embed": lambda: clip_vs_open_clip_resize("clip_vitl14"),
    "deit_b16 vs transformers ViTModel": lambda: vit_vs_transformers("deit_b16"),
    "mae_vitl16 vs transformers ViTModel": lambda: vit_vs_transformers("mae_vitl16"),
}
