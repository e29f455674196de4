"""One registry of backbones: a :class:`BackboneSpec` per name, built by a family adapter.

Names say what a model is (``dinov2_vitl14``, ``sam_vitb16``, ``resnet152``). Each spec
carries the contract of DESIGN.md (width, patch size, blocks, default size) and the model's
own preprocessing, copied from its model card or processor configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from medprobe.backbones.base import PreprocessSpec
from medprobe.errors import ConfigError, suggest

Family = Literal["timm", "hf", "open_clip"]

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
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # full-size constructor arguments (hf/open_clip)

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
            num_register_tokens=4 if _reg else 0, tiny=dict(_TINY_VIT14)))

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
    name="biomedclip", family="open_clip", arch="timm:vit_base_patch16_224",
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
    description="MAE ViT-L/16, masked autoencoder on ImageNet-1k (He et al. 2022)", tiny=dict(_TINY_VIT16)))
register_backbone(BackboneSpec(
    name="vit_l16_in21k", family="timm", arch="vit_large_patch16_224",
    hub_id="timm/vit_large_patch16_224.augreg_in21k", embed_dim=1024, patch_size=16, num_blocks=24,
    default_image_size=224, preprocess=INCEPTION,
    description="ViT-L/16 supervised on ImageNet-21k, AugReg (Steiner et al. 2022)", tiny=dict(_TINY_VIT16)))
register_backbone(BackboneSpec(
    name="deit_b16", family="timm", arch="deit_base_patch16_224", hub_id="timm/deit_base_patch16_224.fb_in1k",
    embed_dim=768, patch_size=16, num_blocks=12, default_image_size=224, preprocess=IMAGENET,
    description="DeiT-B/16 supervised on ImageNet-1k (Touvron et al. 2021)", tiny=dict(_TINY_VIT16)))
register_backbone(BackboneSpec(
    name="deit_s16", family="timm", arch="deit_small_patch16_224", hub_id="timm/deit_small_patch16_224.fb_in1k",
    embed_dim=384, patch_size=16, num_blocks=12, default_image_size=224, preprocess=IMAGENET,
    description="DeiT-S/16 supervised on ImageNet-1k (Touvron et al. 2021)", tiny=dict(_TINY_VIT16)))

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
