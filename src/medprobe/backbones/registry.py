"""One registry of backbones: a :class:`BackboneSpec` per name, built by a family adapter.

Names say what a model is (``dinov2_vitl14``, ``sam_vitb16``, ``resnet152``). Each spec
carries the token contract of :class:`~medprobe.backbones.base.Backbone` (width, patch
size, blocks, default size) and the model's own preprocessing, copied from its model card
or processor configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from medprobe.errors import ConfigError, suggest

ResizePolicy = Literal["square", "shortest_edge+center_crop", "resize256_crop224"]


@dataclass(frozen=True)
class PreprocessSpec:
    """How images must be prepared for one backbone, taken from its model card/processor.

    ``mean``/``std`` apply to RGB images scaled to ``input_range`` (``(0, 1)`` for almost
    every model). ``resize`` is ``"square"`` (resize the whole image to ``size`` x ``size``),
    ``"shortest_edge+center_crop"`` or ``"resize256_crop224"`` (shortest edge to size * 256/224,
    centre crop; see :func:`medprobe.data.preprocess.crop_box`).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_range: tuple[float, float] = (0.0, 1.0)
    resize: ResizePolicy = "square"
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    channels: int = 3


Family = Literal["timm", "hf", "open_clip", "open_clip_timm"]

IMAGENET = PreprocessSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
IMAGENET_BILINEAR = PreprocessSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear")
INCEPTION = PreprocessSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
OPENAI_CLIP = PreprocessSpec(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                             resize="shortest_edge+center_crop")
RAD_DINO = PreprocessSpec(mean=(0.5307, 0.5307, 0.5307), std=(0.2583, 0.2583, 0.2583),
                          resize="shortest_edge+center_crop")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything medprobe knows about a backbone before building it.

    ``arch`` is the timm model name, the transformers model class name or the open_clip
    architecture; ``hub_id`` the public weights id (timm/Hugging Face repo or open_clip tag);
    ``tiny`` are constructor overrides giving a small model of the same class (tests, demo).
    """

    name: str
    family: Family
    arch: str
    hub_id: str | None
    embed_dim: int
    patch_size: int | None
    num_blocks: int
    default_image_size: int
    preprocess: PreprocessSpec
    description: str
    has_cls_token: bool = True
    num_register_tokens: int = 0
    tiny: dict[str, Any] = field(default_factory=dict)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # full-size constructor arguments
    # > 0: position embeddings resampled as the original DINOv2 code does (bicubic,
    # scale_factor=(n + offset)/N, no antialias) instead of timm's exact-size antialiased resampling
    interpolate_offset: float = 0.0
    interpolate_antialias: bool = True  # False: exact-size bicubic without antialias (DeiT, MAE code)
    dynamic_size: bool = True  # timm ViTs: resample position embeddings for any input size
    lora_targets: tuple[str, ...] = ()  # LoRA default targets when they differ from the family's
    weights_file: str = ""  # the released file a user needs ...
    published_at: str = ""  # ... and where it is published

    @property
    def is_vit(self) -> bool:
        return self.patch_size is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = asdict(self.preprocess)
        return d


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(suggest(name, _REGISTRY, "backbone") + " Run `medprobe list backbones`.") from None


def list_backbones() -> list[BackboneSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


# --------------------------------------------------------------------------- entries
_TINY_VIT14 = dict(embed_dim=48, depth=4, num_heads=2, img_size=56)
_TINY_VIT16 = dict(embed_dim=48, depth=4, num_heads=2, img_size=64)

for _size, (_dim, _depth) in {"s": (384, 12), "b": (768, 12), "l": (1024, 24), "g": (1536, 40)}.items():
    _timm_size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[_size]
    for _reg in (False, True):
        _arch = f"vit_{_timm_size}_patch14_{'reg4_' if _reg else ''}dinov2"
        register_backbone(BackboneSpec(
            name=f"dinov2_vit{_size}14{'_reg' if _reg else ''}", family="timm", arch=_arch,
            hub_id=f"timm/{_arch}.lvd142m", embed_dim=_dim, patch_size=14, num_blocks=_depth,
            default_image_size=224, preprocess=IMAGENET,
            description=f"DINOv2 ViT-{_size.upper()}/14{' with 4 registers' if _reg else ''}, self-supervised on LVD-142M "
                        "(Oquab et al. 2023)",
            num_register_tokens=4 if _reg else 0, tiny=dict(_TINY_VIT14),
            # the released models without registers interpolate with the 0.1 offset, those with registers
            # with antialias and an exact size (timm's default)
            interpolate_offset=0.0 if _reg else 0.1))

register_backbone(BackboneSpec(
    name="rad_dino", family="hf", arch="Dinov2Model", hub_id="microsoft/rad-dino", embed_dim=768, patch_size=14,
    num_blocks=12, default_image_size=518, preprocess=RAD_DINO,
    description="RAD-DINO ViT-B/14: DINOv2 continually pretrained on chest radiographs (Perez-Garcia et al. 2025)",
    arch_kwargs=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     image_size=518, patch_size=14, layerscale_value=1.0),
    tiny=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96, image_size=56,
              patch_size=14)))
register_backbone(BackboneSpec(
    name="msn_vitl16", family="hf", arch="ViTMSNModel", hub_id="facebook/vit-msn-large", embed_dim=1024,
    patch_size=16, num_blocks=24, default_image_size=224, preprocess=IMAGENET_BILINEAR,
    description="MSN ViT-L/16, masked siamese networks on ImageNet-1k (Assran et al. 2022)",
    arch_kwargs=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     image_size=224, patch_size=16),
    tiny=dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96, image_size=64,
              patch_size=16)))
register_backbone(BackboneSpec(
    name="clip_vitl14", family="open_clip", arch="ViT-L-14-quickgelu", hub_id="openai", embed_dim=1024, patch_size=14,
    num_blocks=24, default_image_size=224, preprocess=OPENAI_CLIP,
    description="CLIP ViT-L/14 image tower, OpenAI weights (Radford et al. 2021)",
    tiny=dict(width=48, layers=4, head_width=24, patch_size=14, image_size=56)))
register_backbone(BackboneSpec(
    name="openclip_vith14", family="open_clip", arch="ViT-H-14", hub_id="laion2b_s32b_b79k", embed_dim=1280,
    patch_size=14, num_blocks=32, default_image_size=224, preprocess=OPENAI_CLIP,
    description="OpenCLIP ViT-H/14 image tower trained on LAION-2B (Cherti et al. 2023)",
    tiny=dict(width=48, layers=4, head_width=24, patch_size=14, image_size=56)))
register_backbone(BackboneSpec(
    name="biomedclip", family="open_clip_timm", arch="timm:vit_base_patch16_224",
    hub_id="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", embed_dim=768, patch_size=16,
    num_blocks=12, default_image_size=224, preprocess=OPENAI_CLIP,
    description="BiomedCLIP ViT-B/16 image tower, contrastive on PMC-15M figure-caption pairs (Zhang et al. 2023)",
    tiny=dict(_TINY_VIT16)))
for _size, (_dim, _depth, _arch) in {"b": (768, 12, "samvit_base_patch16"), "l": (1024, 24, "samvit_large_patch16")}.items():
    register_backbone(BackboneSpec(
        name=f"sam_vit{_size}16", family="timm", arch=_arch, hub_id=f"timm/{_arch}.sa1b", embed_dim=256,
        patch_size=16, num_blocks=_depth, default_image_size=1024, preprocess=IMAGENET, has_cls_token=False,
        description=f"Segment Anything ViT-{_size.upper()}/16 image encoder (Kirillov et al. 2023); pooled token = mean "
                    "of the neck's patch tokens",
        tiny=dict(embed_dim=48, depth=4, num_heads=2, img_size=64, window_size=2, global_attn_indexes=(1, 3),
                  neck_chans=32)))
register_backbone(BackboneSpec(
    name="mae_vitl16", family="timm", arch="vit_large_patch16_224", hub_id="timm/vit_large_patch16_224.mae",
    embed_dim=1024, patch_size=16, num_blocks=24, default_image_size=224, preprocess=IMAGENET,
    description="MAE ViT-L/16, masked autoencoder on ImageNet-1k (He et al. 2022)", tiny=dict(_TINY_VIT16),
    interpolate_antialias=False))
register_backbone(BackboneSpec(
    name="vit_l16_in21k", family="timm", arch="vit_large_patch16_224",
    hub_id="timm/vit_large_patch16_224.augreg_in21k", embed_dim=1024, patch_size=16, num_blocks=24,
    default_image_size=224, preprocess=INCEPTION,
    description="ViT-L/16 supervised on ImageNet-21k, AugReg (Steiner et al. 2022)", tiny=dict(_TINY_VIT16)))
register_backbone(BackboneSpec(
    name="deit_b16", family="timm", arch="deit_base_patch16_224", hub_id="timm/deit_base_patch16_224.fb_in1k",
    embed_dim=768, patch_size=16, num_blocks=12, default_image_size=224, preprocess=IMAGENET,
    description="DeiT-B/16 supervised on ImageNet-1k (Touvron et al. 2021)", tiny=dict(_TINY_VIT16),
    interpolate_antialias=False))
register_backbone(BackboneSpec(
    name="deit_s16", family="timm", arch="deit_small_patch16_224", hub_id="timm/deit_small_patch16_224.fb_in1k",
    embed_dim=384, patch_size=16, num_blocks=12, default_image_size=224, preprocess=IMAGENET,
    description="DeiT-S/16 supervised on ImageNet-1k (Touvron et al. 2021)", tiny=dict(_TINY_VIT16),
    interpolate_antialias=False))

_CNNS = {
    "resnet18": ("resnet18.tv_in1k", 512, dict(layers=(1, 1, 1, 1))),
    "resnet50": ("resnet50.tv_in1k", 2048, dict(layers=(1, 1, 1, 1))),
    "resnet152": ("resnet152.tv_in1k", 2048, dict(layers=(1, 1, 1, 1))),
    "densenet121": ("densenet121.tv_in1k", 1024, dict(block_config=(1, 1, 1, 1), growth_rate=8)),
    "densenet201": ("densenet201.tv_in1k", 1920, dict(block_config=(1, 1, 1, 1), growth_rate=8)),
    "vgg19": ("vgg19.tv_in1k", 512, {}),
}
for _name, (_tag, _dim, _tiny) in _CNNS.items():
    register_backbone(BackboneSpec(
        name=_name, family="timm", arch=_tag.split(".")[0], hub_id=f"timm/{_tag}", embed_dim=_dim, patch_size=None,
        num_blocks=6 if _name == "vgg19" else 5, default_image_size=224, preprocess=IMAGENET_BILINEAR,
        has_cls_token=False,
        description=f"{_name} supervised on ImageNet-1k (torchvision weights); pooled token = global average of the "
                    "last stage; blocks are timm feature levels (stem + stages)", tiny=_tiny))

# --------------------------------------------------------------------------- baselines of the seed studies
SIGLIP = PreprocessSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
# CheXzero normalises 0-255 grey values with mean 101.48761 and std 83.43944 (its zero-shot code)
CHEXZERO = PreprocessSpec(mean=(101.48761 / 255,) * 3, std=(83.43944 / 255,) * 3)
_TINY_HF16 = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, intermediate_size=96, image_size=64,
                  patch_size=16)

register_backbone(BackboneSpec(
    name="dino_vitb16", family="timm", arch="vit_base_patch16_224", hub_id="timm/vit_base_patch16_224.dino",
    embed_dim=768, patch_size=16, num_blocks=12, default_image_size=224, preprocess=IMAGENET,
    description="DINO (v1) ViT-B/16, self-distillation on ImageNet-1k (Caron et al. 2021)", tiny=dict(_TINY_VIT16),
    interpolate_offset=0.1,  # the DINO code interpolates with the same 0.1 offset as DINOv2
    weights_file="dino_vitbase16_pretrain.pth",
    published_at="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth "
                 "(github.com/facebookresearch/dino)"))
register_backbone(BackboneSpec(
    name="openclip_vitb16", family="open_clip", arch="ViT-B-16", hub_id="laion2b_s34b_b88k", embed_dim=768,
    patch_size=16, num_blocks=12, default_image_size=224, preprocess=OPENAI_CLIP,
    description="OpenCLIP ViT-B/16 image tower trained on LAION-2B (Cherti et al. 2023)",
    tiny=dict(width=48, layers=4, head_width=24, patch_size=16, image_size=64),
    weights_file="open_clip_pytorch_model.bin (or open_clip_model.safetensors)",
    published_at="https://huggingface.co/laion/CLIP-ViT-B-16-laion2B-s34B-b88K"))
register_backbone(BackboneSpec(
    name="clip_vitl14_336", family="open_clip", arch="ViT-L-14-336-quickgelu", hub_id="openai", embed_dim=1024,
    patch_size=14, num_blocks=24, default_image_size=336, preprocess=OPENAI_CLIP,
    description="CLIP ViT-L/14 at 336 px image tower, OpenAI weights (Radford et al. 2021)",
    tiny=dict(width=48, layers=4, head_width=24, patch_size=14, image_size=56),
    weights_file="ViT-L-14-336px.pt (OpenAI TorchScript archive)",
    published_at="the `ViT-L/14@336px` entry of clip.available_models() (github.com/openai/CLIP, clip/clip.py)"))
register_backbone(BackboneSpec(
    name="chexzero", family="open_clip", arch="ViT-B-32-quickgelu", hub_id=None, embed_dim=768, patch_size=32,
    num_blocks=12, default_image_size=224, preprocess=CHEXZERO,
    description="CheXzero: OpenAI CLIP ViT-B/32 fine-tuned on MIMIC-CXR reports (Tiu et al. 2022); OpenAI-CLIP "
                "layout (visual.* keys)",
    tiny=dict(width=48, layers=4, head_width=24, patch_size=32, image_size=64),
    weights_file="best_64_5e-05_original_22000_0.864.pt (a state dict of the whole CLIP model)",
    published_at="the Google Drive folder linked from github.com/rajpurkarlab/CheXzero (README, 'Zero-shot "
                 "inference'); no hub copy"))
register_backbone(BackboneSpec(
    name="siglip_vitb16", family="hf", arch="SiglipVisionModel", hub_id="google/siglip-base-patch16-224",
    embed_dim=768, patch_size=16, num_blocks=12, default_image_size=224, preprocess=SIGLIP, has_cls_token=False,
    description="SigLIP ViT-B/16 image tower, sigmoid-loss contrastive on WebLI (Zhai et al. 2023); pooled token "
                "= mean patch token",
    arch_kwargs=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     image_size=224, patch_size=16),
    tiny=dict(_TINY_HF16), lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    weights_file="model.safetensors holding the vision tower (vision_model.*) with config.json, or the repo folder",
    published_at="https://huggingface.co/google/siglip-base-patch16-224"))
register_backbone(BackboneSpec(
    name="medsiglip_448", family="hf", arch="SiglipVisionModel", hub_id="google/medsiglip-448",
    embed_dim=1152, patch_size=14, num_blocks=27, default_image_size=448, preprocess=SIGLIP, has_cls_token=False,
    description="MedSigLIP-448 image tower: SigLIP So400m/14 tuned on medical image-text pairs (Sellergren et al. "
                "2025); pooled token = mean patch token",
    arch_kwargs=dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                     image_size=448, patch_size=14),
    tiny=dict(_TINY_HF16, patch_size=14, image_size=56),
    lora_targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    weights_file="model.safetensors (vision_model.* tensors are taken)",
    published_at="https://huggingface.co/google/medsiglip-448 (gated: accept the Health AI Developer Foundations "
                 "terms)"))
register_backbone(BackboneSpec(
    name="blip_vitb16", family="hf", arch="BlipVisionModel", hub_id="Salesforce/blip-image-captioning-base",
    embed_dim=768, patch_size=16, num_blocks=12, default_image_size=384, preprocess=OPENAI_CLIP,
    description="BLIP ViT-B/16 image encoder (Li et al. 2022)",
    arch_kwargs=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     image_size=384, patch_size=16),
    tiny=dict(_TINY_HF16), lora_targets=("qkv", "projection", "fc1", "fc2"),
    weights_file="model.safetensors of a BLIP model (vision_model.* tensors are taken)",
    published_at="https://huggingface.co/Salesforce/blip-image-captioning-base"))
register_backbone(BackboneSpec(
    name="dinov3_vitb16", family="timm", arch="vit_base_patch16_dinov3", hub_id="timm/vit_base_patch16_dinov3.lvd1689m",
    embed_dim=768, patch_size=16, num_blocks=12, default_image_size=224, preprocess=IMAGENET,
    description="DINOv3 ViT-B/16 with 4 registers and RoPE, distilled on LVD-1689M (Simeoni et al. 2025)",
    tiny=dict(embed_dim=48, depth=4, num_heads=2, img_size=64),
    weights_file="model.safetensors (timm layout)",
    published_at="https://huggingface.co/timm/vit_base_patch16_dinov3.lvd1689m (gated: accept the DINOv3 license)"))
register_backbone(BackboneSpec(
    name="transunet_r50_vitb16", family="timm", arch="vit_base_r50_s16_224",
    hub_id="timm/vit_base_r50_s16_224.orig_in21k", embed_dim=768, patch_size=16, num_blocks=12,
    default_image_size=224, preprocess=INCEPTION,
    description="R50+ViT-B/16 hybrid, the TransUNet encoder (Chen et al. 2021), ImageNet-21k weights",
    tiny=dict(embed_dim=48, depth=4, num_heads=2, img_size=64),
    weights_file="model.safetensors (timm layout; the JAX R50+ViT-B_16.npz is not read)",
    published_at="https://huggingface.co/timm/vit_base_r50_s16_224.orig_in21k"))


def weights_help(spec: BackboneSpec) -> dict[str, str]:
    """Which weights file a user needs for ``spec`` and where it is published."""
    if spec.weights_file:
        return {"file": spec.weights_file, "published_at": spec.published_at}
    hub = spec.hub_id or ""
    if spec.name.startswith("dinov2_"):
        size = spec.name.split("_")[1]
        stem = f"dinov2_{size}{'_reg4' if spec.num_register_tokens else ''}_pretrain.pth"
        return {"file": f"{stem} (original release; also read: the facebook/dinov2-* Hugging Face folder, or "
                        f"model.safetensors from https://huggingface.co/{hub})",
                "published_at": f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{size}/{stem} "
                                "(github.com/facebookresearch/dinov2)"}
    if spec.name.startswith("sam_"):
        stem = {"sam_vitb16": "sam_vit_b_01ec64.pth", "sam_vitl16": "sam_vit_l_0b3195.pth"}[spec.name]
        return {"file": f"{stem} (the full SAM checkpoint; its image encoder is taken)",
                "published_at": f"https://dl.fbaipublicfiles.com/segment_anything/{stem} "
                                "(github.com/facebookresearch/segment-anything)"}
    if spec.name == "mae_vitl16":
        return {"file": "mae_pretrain_vit_large.pth (encoder; mae_visualize_vit_large.pth / _full files with the "
                        "decoder are read too)",
                "published_at": "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth "
                                "(github.com/facebookresearch/mae)"}
    if spec.family == "hf":
        return {"file": "the repository folder (config.json + model.safetensors) or its model.safetensors",
                "published_at": f"https://huggingface.co/{hub}"}
    if spec.family in ("open_clip", "open_clip_timm"):
        if hub == "openai":
            return {"file": f"the OpenAI TorchScript .pt for {spec.arch} or open_clip_pytorch_model.bin",
                    "published_at": "clip.available_models() in github.com/openai/CLIP (clip/clip.py)"}
        repo = hub.removeprefix("hf-hub:")
        if not hub.startswith("hf-hub:"):
            try:
                import open_clip
                repo = (open_clip.get_pretrained_cfg(spec.arch, hub) or {}).get("hf_hub", "").strip("/") or repo
            except Exception:
                pass
        return {"file": "open_clip_pytorch_model.bin (or open_clip_model.safetensors)",
                "published_at": f"https://huggingface.co/{repo}"}
    return {"file": "model.safetensors (timm layout; a .pth state dict of the same model is read too)",
            "published_at": f"https://huggingface.co/{hub}"}


def describe(spec: BackboneSpec) -> dict[str, Any]:
    """Everything ``medprobe list backbones --details NAME`` shows."""
    from dataclasses import asdict as _asdict
    return {"name": spec.name, "description": spec.description, "family": spec.family, "architecture": spec.arch,
            "embed_dim": spec.embed_dim, "patch_size": spec.patch_size, "blocks": spec.num_blocks,
            "default_image_size": spec.default_image_size, "preprocess": _asdict(spec.preprocess),
            "weights_file": weights_help(spec)["file"], "published_at": weights_help(spec)["published_at"],
            "hub_id": spec.hub_id, "tiny": dict(spec.tiny),
            "check": f"medprobe check-weights {spec.name} /path/to/weights"}
