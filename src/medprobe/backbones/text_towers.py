"""Text towers of CLIP-family checkpoints (zero-shot classification).

:func:`load_text_tower` builds, for a registered image backbone, the text encoder and the
tokenizer that belong to the *same* checkpoint as its image tower, and knows how that family
projects an image into the joint embedding space:

* ``open_clip`` backbones (OpenAI CLIP, OpenCLIP, CheXzero): open_clip's own text transformer,
  loaded strictly from the checkpoint's top-level (non-``visual.*``) tensors; open_clip's
  byte-pair tokenizer, whose vocabulary ships inside the package (works offline). Images:
  the tower's final-normed CLS token times its projection ``visual.proj``.
* SigLIP-style ``hf`` backbones (SigLIP, MedSigLIP): transformers' ``SiglipTextModel`` from the
  ``text_model.*`` tensors of the model folder, its tokenizer from the same folder. Images: the
  vision tower's attention-pooling head (``pooler_output``).

With ``weights: random`` the towers are randomly initialised (seeded, as the image backbones)
and texts are tokenised by hashing words into the vocabulary (there is no vocabulary to
respect); this exists for tests and dry runs only.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from medprobe.backbones.base import Backbone
from medprobe.backbones.loading import LoadReport, check_accounted, load_strict
from medprobe.backbones.registry import BackboneSpec, get_spec, list_backbones
from medprobe.backbones.weights import WeightsSource, parse_weights, read_checkpoint
from medprobe.errors import ConfigError, WeightsError

Scoring = Literal["softmax", "sigmoid"]
# tiny text towers: small width/depth, the real vocabulary and context length (the tokenizer emits real ids)
TINY_OPENCLIP_TEXT = dict(width=32, heads=2, layers=2)
_OPENCLIP_EXTRA = ("input_resolution", "context_length", "vocab_size")  # OpenAI archives' metadata "tensors"


def has_text_tower(spec: BackboneSpec) -> bool:
    """Whether medprobe can build the text tower of ``spec``'s checkpoint."""
    return spec.family == "open_clip" or spec.arch == "SiglipVisionModel"


def text_backbones() -> list[str]:
    """The registered backbones with a text tower (zero-shot capable)."""
    return [s.name for s in list_backbones() if has_text_tower(s)]


class TextTower(nn.Module):
    """A text encoder + tokenizer of one CLIP-family checkpoint and its image projection.

    ``encode_text(texts)`` and ``encode_image(backbone, images)`` give (N, E) embeddings in the
    joint space (not normalised); ``logit_scale`` (already exponentiated) and ``logit_bias``
    are the checkpoint's; ``scoring`` is ``softmax`` (CLIP contrastive) or ``sigmoid`` (SigLIP).
    """

    scoring: Scoring
    logit_scale: float
    logit_bias: float
    load_report: LoadReport | None
    tokenizer_kind: str

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _hash_ids(text: str, vocab: int, reserved: int) -> list[int]:
    return [reserved + zlib.crc32(w.encode()) % (vocab - reserved) for w in text.lower().split()]


# --------------------------------------------------------------------------- open_clip
class OpenCLIPText(TextTower):
    scoring = "softmax"

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, tiny: bool) -> None:
        super().__init__()
        import open_clip
        from open_clip.model import CLIPTextCfg, _build_text_tower
        cfg = open_clip.get_model_config(spec.arch)
        if cfg is None or "text_cfg" not in cfg:
            raise WeightsError(f"open_clip has no text configuration for {spec.arch!r}")
        text_cfg = CLIPTextCfg(**{**cfg["text_cfg"], **(TINY_OPENCLIP_TEXT if tiny else {})})
        self.tower = _build_text_tower(cfg["embed_dim"], text_cfg, quick_gelu=cfg.get("quick_gelu", False))
        self.tokenizer = open_clip.get_tokenizer(spec.arch)
        self.tokenizer_kind = f"open_clip {type(self.tokenizer).__name__} (vocabulary bundled with open_clip)"
        self.logit_scale = 1 / 0.07  # open_clip's initial value (random weights)
        self.logit_bias = 0.0
        self.load_report = None
        self.spec = spec
        if weights.kind == "hub":
            from medprobe.backbones.openclip_family import _hub_checkpoint
            self.load_report = self._load(*_hub_checkpoint(spec))
        elif weights.kind in ("file", "dir"):
            self.load_report = self._load(read_checkpoint(weights.path), str(weights.path))

    def _load(self, ckpt: Any, source: str) -> LoadReport:
        report = LoadReport(source, ckpt.layout, list(ckpt.conversions))
        sd = {k: v for k, v in ckpt.state_dict.items() if not k.startswith("visual.")}
        if len(sd) == len(ckpt.state_dict):
            raise WeightsError(f"weights {source}: no image tower (visual.*) beside a text tower; zero-shot needs the "
                               f"whole CLIP checkpoint of {self.spec.name} (image and text towers)")
        report.conversions.append("kept the text tower (top-level keys); image tower (visual.*) read by the backbone")
        extra = [k for k in _OPENCLIP_EXTRA if k in sd]
        for k in extra:
            sd.pop(k)
        if extra:
            report.conversions.append(f"dropped the archive's metadata entries {', '.join(extra)}")
        scale = sd.pop("logit_scale", None)
        bias = sd.pop("logit_bias", None)
        if not any(k.startswith("token_embedding.") for k in sd):
            raise WeightsError(f"weights {source} hold no text tower (no token_embedding.*); zero-shot needs the whole "
                               f"CLIP checkpoint of {self.spec.name}, not the image tower alone")
        load_strict(self.tower, sd, source, f"{self.spec.name} (open_clip {self.spec.arch} text tower)")
        if scale is not None:
            self.logit_scale = float(scale.float().exp())
        if bias is not None:
            self.logit_bias = float(bias.float())
        report.tensors = len(sd)
        return report

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.tower.parameters()).device
        return self.tower(self.tokenizer(texts).to(device))

    def encode_image(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        vit = backbone.model
        if getattr(vit, "attn_pool", None) is not None or getattr(vit, "pool_type", "tok") != "tok" \
                or getattr(vit, "final_ln_after_pool", False) or getattr(vit, "proj", None) is None:
            raise ConfigError(f"{backbone.name}: zero-shot supports open_clip towers pooling the CLS token into a "
                              f"projection; this tower pools otherwise")
        return backbone.forward_tokens(images).cls @ vit.proj


# --------------------------------------------------------------------------- SigLIP (transformers)
class HashTokenizer:
    """Random weights only: words hashed into the vocabulary, padded to ``length`` with ``pad_id``."""

    def __init__(self, vocab: int, length: int, pad_id: int) -> None:
        self.vocab, self.length, self.pad_id = vocab, length, pad_id

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = [_hash_ids(t, self.vocab, 2)[: self.length] for t in texts]
        return torch.tensor([r + [self.pad_id] * (self.length - len(r)) for r in rows], dtype=torch.long)


def _siglip_folder(spec: BackboneSpec, weights: WeightsSource) -> Path:
    from medprobe.backbones.weights import hub_file
    if weights.kind == "hub":
        folder = hub_file(spec.hub_id, "config.json", spec.name).parent
        hub_file(spec.hub_id, "model.safetensors", spec.name)
        return folder
    path = Path(weights.path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise WeightsError(f"weights {path}: zero-shot with {spec.name} needs the model folder (config.json, "
                           f"model.safetensors and the tokenizer files), not a lone weights file")
    return folder


class SiglipText(TextTower):
    scoring = "sigmoid"

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, tiny: bool) -> None:
        super().__init__()
        import transformers as tf
        from medprobe.backbones.hf_family import _quiet, hf_folder_weights
        self.spec = spec
        self.load_report = None
        self.logit_scale, self.logit_bias = 1 / 0.07, 0.0
        if weights.kind == "random":
            shape = spec.tiny if tiny else spec.arch_kwargs
            config = tf.SiglipTextConfig(**{k: shape[k] for k in ("hidden_size", "num_hidden_layers",
                                                                   "num_attention_heads", "intermediate_size")})
            self.model = tf.SiglipTextModel(config)
            self.tokenizer: Any = HashTokenizer(config.vocab_size, config.max_position_embeddings,
                                                int(config.pad_token_id or 0))
            self.tokenizer_kind = "word hashing (random weights: there is no vocabulary)"
        else:
            folder = _siglip_folder(spec, weights)
            full = tf.AutoConfig.from_pretrained(str(folder))
            config = getattr(full, "text_config", None)
            if config is None:
                raise WeightsError(f"{folder}/config.json describes a {full.model_type!r} model without a text "
                                   f"tower; zero-shot with {spec.name} needs the image-text model folder")
            path = hf_folder_weights(folder)
            if path.name.endswith(".index.json"):
                raise WeightsError(f"{path}: sharded checkpoints are not read; pass a folder with one "
                                   f"model.safetensors")
            ckpt = read_checkpoint(path)
            sd = {k: v for k, v in ckpt.state_dict.items() if k.startswith("text_model.")}
            if not sd:
                raise WeightsError(f"weights {path} hold no text tower (no text_model.* tensors)")
            target = f"{spec.name} (SiglipTextModel)"
            try:
                with _quiet():
                    self.model, info = tf.SiglipTextModel.from_pretrained(
                        None, config=config, state_dict=sd, output_loading_info=True)
            except Exception as e:
                raise WeightsError(f"cannot load the text tower of {path} into {target}: {type(e).__name__}: "
                                   f"{str(e)[:300]}") from None
            check_accounted(str(path), target, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                            [str(k) for k in info.get("mismatched_keys", ())])
            for name in ("logit_scale", "logit_bias"):
                if name not in ckpt.state_dict:
                    raise WeightsError(f"weights {path} have no {name}: not a SigLIP image-text checkpoint")
            self.logit_scale = float(ckpt.state_dict["logit_scale"].float().exp().reshape(-1)[0])
            self.logit_bias = float(ckpt.state_dict["logit_bias"].float().reshape(-1)[0])
            self.load_report = LoadReport(str(path), "Hugging Face image-text model folder",
                                          ckpt.conversions + ["kept the text tower (text_model.*), logit_scale "
                                                              "and logit_bias"], tensors=len(sd))
            try:
                self.tokenizer = tf.AutoTokenizer.from_pretrained(str(folder))
            except Exception as e:
                raise WeightsError(f"cannot read the tokenizer of {folder}: {type(e).__name__}: {str(e)[:300]}; "
                                   f"the folder needs the tokenizer files of the release (tokenizer.json or "
                                   f"spiece.model with sentencepiece installed)") from None
            self.tokenizer_kind = f"{type(self.tokenizer).__name__} from {folder}"
        self.max_length = int(config.max_position_embeddings)
        self.model.eval()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if isinstance(self.tokenizer, HashTokenizer):
            ids = self.tokenizer(texts)
        else:  # SigLIP was trained on max-length padded text, and pools the last position
            ids = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")["input_ids"]
        return self.model(input_ids=ids.to(device)).pooler_output

    def encode_image(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        out = backbone.model(pixel_values=images, **getattr(backbone, "_interpolate_kw", {}))
        if out.pooler_output is None:
            raise ConfigError(f"{backbone.name}: the vision tower has no pooling head (vision_use_head is off)")
        return out.pooler_output


# --------------------------------------------------------------------------- entry point
def load_text_tower(name: str, weights: str | None = "random", *, tiny: bool = False) -> TextTower:
    """The text tower + tokenizer of backbone ``name``'s checkpoint ``weights`` (eval mode).

    A backbone without a text tower is a ConfigError naming those that have one.
    """
    from medprobe.backbones import RANDOM_INIT_SEED
    spec = get_spec(name)
    if not has_text_tower(spec):
        raise ConfigError(f"backbone {name!r} has no text tower: zero-shot needs a CLIP-family backbone "
                          f"({', '.join(text_backbones())})")
    source = parse_weights(weights)
    cls = OpenCLIPText if spec.family == "open_clip" else SiglipText
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        tower = cls(spec, source, tiny)
    if not math.isfinite(tower.logit_scale):
        raise WeightsError(f"weights {weights}: logit_scale is not finite")
    return tower.eval()
