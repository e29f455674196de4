"""Text towers of CLIP-family checkpoints (zero-shot classification).

:func:`load_text_tower` builds, for a registered image backbone, the text encoder and the
tokenizer that belong to the *same* checkpoint as its image tower, and knows how that family
projects an image into the joint embedding space:

* ``open_clip`` backbones (OpenAI CLIP, OpenCLIP, CheXzero): open_clip's own text transformer,
  loaded strictly from the checkpoint's top-level (non-``visual.*``) tensors; open_clip's
  byte-pair tokenizer, whose vocabulary ships inside the package (works offline). Images:
  the tower's final-normed CLS token times its projection ``visual.proj``.
* BiomedCLIP (``open_clip_timm``): open_clip's ``HFTextEncoder`` (PubMedBERT + pooler + projection) built
  offline from the release folder (``open_clip_config.json``, the ``text.*`` tensors, BERT's tokenizer from
  ``vocab.txt``). Images: the timm trunk's CLS token times the linear head ``visual.head.proj``.
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
    return spec.family in ("open_clip", "open_clip_timm") or spec.arch == "SiglipVisionModel"


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


# --------------------------------------------------------------------------- BiomedCLIP (open_clip + HF BERT)
# random weights: open_clip's BiomedCLIP text head (MLP projection of the CLS hidden state) on a BERT encoder;
# full size = PubMedBERT-base's shape (BertConfig's defaults), tiny = a small BERT and joint space
_BIOMEDCLIP_RANDOM = dict(embed_dim=512, context_length=256, pooler="cls_last_hidden_state_pooler", proj="mlp")
TINY_BERT_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=1024, max_position_embeddings=64)
_TINY_BIOMEDCLIP = dict(embed_dim=32, context_length=64)
_HF_POOLERS = ("cls_last_hidden_state_pooler", "cls_pooler", "mean_pooler")  # open_clip's, max_pooler excepted
_BERT_HEAD_DIM = 64  # BERT's convention (hidden = 64 x heads): the only shape the weights cannot tell
# tensors that transformers now keeps as non-persistent buffers (older checkpoints saved them)
_BERT_BUFFERS = ("transformer.embeddings.position_ids", "transformer.embeddings.token_type_ids")


class BertHashTokenizer:
    """Random weights only: ``[CLS]`` + words hashed into the vocabulary + ``[SEP]``, padded with ``[PAD]``."""

    pad_id, cls_id, sep_id, reserved = 0, 2, 3, 4

    def __init__(self, vocab: int, length: int) -> None:
        self.vocab, self.length = vocab, length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = [[self.cls_id] + _hash_ids(t, self.vocab, self.reserved)[: self.length - 2] + [self.sep_id]
                for t in texts]
        return torch.tensor([r + [self.pad_id] * (self.length - len(r)) for r in rows], dtype=torch.long)


def _biomedclip_folder(spec: BackboneSpec, weights: WeightsSource) -> Path:
    from medprobe.backbones.weights import hub_file
    if weights.kind == "hub":
        repo = (spec.hub_id or "").removeprefix("hf-hub:")
        folder = hub_file(repo, "open_clip_config.json", spec.name).parent
        hub_file(repo, "vocab.txt", spec.name)
        hub_file(repo, "tokenizer_config.json", spec.name)
        return folder
    path = Path(weights.path)
    folder = path if path.is_dir() else path.parent
    if not (folder / "open_clip_config.json").is_file():
        raise WeightsError(f"weights {path}: zero-shot with {spec.name} needs the released model folder "
                           f"(open_clip_config.json, open_clip_pytorch_model.bin and the tokenizer files vocab.txt, "
                           f"tokenizer_config.json), not a lone weights file")
    return folder


def _bert_config_from_tensors(sd: dict[str, torch.Tensor], source: str) -> tuple[Any, list[str]]:
    """A BertConfig whose shapes are read off the text tower's tensors (``transformer.*``)."""
    import transformers as tf
    try:
        vocab, hidden = sd["transformer.embeddings.word_embeddings.weight"].shape
        positions = sd["transformer.embeddings.position_embeddings.weight"].shape[0]
        types = sd["transformer.embeddings.token_type_embeddings.weight"].shape[0]
        inter = sd["transformer.encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"weights {source}: the text tower has no text.{e.args[0]}; expected a BERT text "
                           f"encoder (open_clip HFTextEncoder)") from None
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("transformer.encoder.layer."))
    if hidden % _BERT_HEAD_DIM:
        raise WeightsError(f"weights {source}: BERT width {hidden} is not a multiple of {_BERT_HEAD_DIM}, so the "
                           f"number of attention heads is unknown; put the BERT config.json (hf_model_name's) in the "
                           f"folder")
    config = tf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=hidden // _BERT_HEAD_DIM, intermediate_size=inter,
                           max_position_embeddings=positions, type_vocab_size=types)
    return config, [f"BERT shape read off the tensors (width {hidden}, {layers} layers, {inter} MLP, {vocab} tokens, "
                    f"{positions} positions), {hidden // _BERT_HEAD_DIM} heads of {_BERT_HEAD_DIM}; other settings "
                    f"BERT's defaults"]


class BiomedCLIPText(TextTower):
    """BiomedCLIP: open_clip's ``HFTextEncoder`` (a BERT + pooler + projection) built from the folder's
    ``open_clip_config.json`` and tensors, without the hub; BERT's WordPiece tokenizer from ``vocab.txt``.
    Images: the timm trunk's final-normed CLS token times the linear head ``visual.head.proj``."""

    scoring = "softmax"

    def __init__(self, spec: BackboneSpec, weights: WeightsSource, tiny: bool) -> None:
        super().__init__()
        import transformers as tf
        self.spec = spec
        self.load_report = None
        self.logit_scale, self.logit_bias = 1 / 0.07, 0.0
        if weights.kind == "random":
            shape = {**_BIOMEDCLIP_RANDOM, **(_TINY_BIOMEDCLIP if tiny else {})}
            config = tf.BertConfig(**(TINY_BERT_TEXT if tiny else {}))
            self.text = self._encoder(config, shape["embed_dim"], shape["pooler"], shape["proj"], "random")
            width = int((spec.tiny if tiny else {}).get("embed_dim", spec.embed_dim))
            self.image_proj = nn.Parameter(torch.randn(shape["embed_dim"], width) * width ** -0.5,
                                           requires_grad=False)
            self.context_length = int(shape["context_length"])
            self.tokenizer: Any = BertHashTokenizer(config.vocab_size, self.context_length)
            self.tokenizer_kind = "word hashing (random weights: there is no vocabulary)"
        else:
            self._load_folder(spec, weights)

    @staticmethod
    def _encoder(config: Any, embed_dim: int, pooler: str, proj: str | None, source: str) -> nn.Module:
        from open_clip.hf_model import HFTextEncoder
        from transformers import BertModel
        if pooler not in _HF_POOLERS:
            raise WeightsError(f"{source}: text pooler {pooler!r} is not supported "
                               f"(supported: {', '.join(_HF_POOLERS)})")
        if proj not in ("mlp", "linear", None):
            raise WeightsError(f"{source}: text projection {proj!r} is not supported (mlp, linear or none)")
        enc = HFTextEncoder("bert", embed_dim, config=config, pooler_type=pooler, proj_type=proj)
        # open_clip builds the BERT with its pooling layer only when the CLS pooler uses it (as its own loading does)
        enc.transformer = BertModel(config, add_pooling_layer=pooler == "cls_pooler")
        return enc

    def _load_folder(self, spec: BackboneSpec, weights: WeightsSource) -> None:
        import json
        import transformers as tf
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg
        folder = _biomedclip_folder(spec, weights)
        cfg_path = folder / "open_clip_config.json"
        try:
            raw = json.loads(cfg_path.read_text())
            model_cfg = raw.get("model_cfg", raw)
            text_cfg = CLIPTextCfg(**model_cfg["text_cfg"])
            vision_cfg = CLIPVisionCfg(**model_cfg["vision_cfg"])
            embed_dim = int(model_cfg["embed_dim"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{cfg_path}: not an open_clip model configuration ({type(e).__name__}: {e}); expected "
                               f"model_cfg with embed_dim, vision_cfg and text_cfg") from None
        if not text_cfg.hf_model_name:
            raise WeightsError(f"{cfg_path}: text_cfg has no hf_model_name: not a Hugging Face text tower "
                               f"(BiomedCLIP's is a PubMedBERT)")
        if vision_cfg.timm_proj != "linear" or vision_cfg.timm_pool not in ("", "token") or vision_cfg.timm_proj_bias:
            raise WeightsError(f"{cfg_path}: vision_cfg pools with {vision_cfg.timm_pool!r} into a "
                               f"{vision_cfg.timm_proj!r} projection (bias {vision_cfg.timm_proj_bias}); zero-shot "
                               f"supports the class token into a linear projection without bias (BiomedCLIP's)")
        if weights.kind == "hub":
            from medprobe.backbones.openclip_family import _hub_checkpoint
            ckpt, source = _hub_checkpoint(spec)
        else:
            source = str(weights.path)
            ckpt = read_checkpoint(weights.path)
        full = ckpt.state_dict
        conversions = list(ckpt.conversions)
        text_sd = {k.removeprefix("text."): v for k, v in full.items() if k.startswith("text.")}
        if not text_sd:
            raise WeightsError(f"weights {source} hold no text tower (no text.* tensors); zero-shot needs the whole "
                               f"BiomedCLIP checkpoint (image and text towers)")
        proj = full.get("visual.head.proj.weight")
        if proj is None:
            raise WeightsError(f"weights {source} have no visual.head.proj.weight: no image projection into the "
                               f"joint space")
        known = {"visual.head.proj.weight", "logit_scale", "logit_bias"}
        stray = sorted(k for k in full if not (k.startswith(("text.", "visual.trunk.")) or k in known))
        if stray:
            raise WeightsError(f"weights {source}: {len(stray)} tensor(s) have no place in BiomedCLIP "
                               f"(text.*, visual.trunk.*, visual.head.proj.weight, logit_scale): "
                               f"{', '.join(stray[:8])}")
        for name in _BERT_BUFFERS:
            buf = text_sd.pop(name, None)
            if buf is not None:
                expected = (torch.arange(buf.shape[-1]).expand_as(buf) if name.endswith("position_ids")
                            else torch.zeros_like(buf))
                if not torch.equal(buf.long(), expected):
                    raise WeightsError(f"weights {source}: text.{name} is not the constant buffer transformers "
                                       f"builds")
                conversions.append(f"dropped text.{name} (a constant buffer, no longer saved by transformers)")
        try:
            self.tokenizer = tf.BertTokenizerFast.from_pretrained(str(folder))
        except Exception as e:
            raise WeightsError(f"cannot read the tokenizer of {folder}: {type(e).__name__}: {str(e)[:300]}; the folder "
                               f"needs the release's vocab.txt and tokenizer_config.json") from None
        self.tokenizer_kind = f"{type(self.tokenizer).__name__} from {folder}"
        if (folder / "config.json").is_file():
            config = tf.BertConfig.from_json_file(str(folder / "config.json"))
            conversions.append(f"BERT configuration from {folder / 'config.json'}")
        else:
            config, notes = _bert_config_from_tensors(text_sd, source)
            config.pad_token_id = self.tokenizer.pad_token_id
            conversions += notes
        if config.pad_token_id != self.tokenizer.pad_token_id:
            raise WeightsError(f"{folder}: BERT pad_token_id {config.pad_token_id} differs from the tokenizer's "
                               f"[PAD] id {self.tokenizer.pad_token_id}")
        target = f"{spec.name} (open_clip HFTextEncoder, {text_cfg.hf_model_name} built from {folder})"
        self.text = self._encoder(config, embed_dim, text_cfg.hf_pooler_type, text_cfg.hf_proj_type, str(cfg_path))
        load_strict(self.text, text_sd, source, target)
        self.image_proj = nn.Parameter(proj.float().clone(), requires_grad=False)
        self.context_length = int(text_cfg.context_length)
        if self.context_length > config.max_position_embeddings:
            raise WeightsError(f"{cfg_path}: context_length {self.context_length} exceeds the BERT's "
                               f"{config.max_position_embeddings} positions")
        if "logit_scale" not in full:
            raise WeightsError(f"weights {source} have no logit_scale: not a CLIP image-text checkpoint")
        self.logit_scale = float(full["logit_scale"].float().exp().reshape(-1)[0])
        if "logit_bias" in full:
            self.logit_bias = float(full["logit_bias"].float().reshape(-1)[0])
        conversions.append("kept the text tower (text.*), the image projection (visual.head.proj) and logit_scale; "
                           "image trunk (visual.trunk.*) read by the backbone")
        self.load_report = LoadReport(source, ckpt.layout, conversions, tensors=len(text_sd) + 1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (N, context_length) as open_clip's ``HFTokenizer`` makes them; a prompt longer than the
        context is a ConfigError (never cut)."""
        if isinstance(self.tokenizer, BertHashTokenizer):
            return self.tokenizer(texts)
        from open_clip.tokenizer import get_clean_fn
        clean = [get_clean_fn("whitespace")(t) for t in texts]
        for text, ids in zip(texts, self.tokenizer(clean)["input_ids"]):
            if len(ids) > self.context_length:
                raise ConfigError(f"prompt {text!r} is {len(ids)} tokens, over {self.spec.name}'s context of "
                                  f"{self.context_length}")
        return self.tokenizer(clean, return_tensors="pt", max_length=self.context_length, padding="max_length",
                              truncation=True)["input_ids"]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text(self.tokenize(texts).to(self.image_proj.device))

    def encode_image(self, backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
        cls = backbone.forward_tokens(images).cls
        if cls.shape[-1] != self.image_proj.shape[1]:
            raise ConfigError(f"{backbone.name}: image tower width {cls.shape[-1]} does not match the text tower's "
                              f"image projection ({self.image_proj.shape[1]}); build both from the same weights")
        return cls @ self.image_proj.T


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
    cls = {"open_clip": OpenCLIPText, "open_clip_timm": BiomedCLIPText}.get(spec.family, SiglipText)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        tower = cls(spec, source, tiny)
    if not math.isfinite(tower.logit_scale):
        raise WeightsError(f"weights {weights}: logit_scale is not finite")
    return tower.eval()
