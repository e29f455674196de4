"""Zero-shot protocol: text towers from the same checkpoint, checked against open_clip's and transformers'
own image-text models (tiny, perturbed random weights), and the protocol end to end on phantoms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from backbone_util import max_diff, perturb
from medprobe.backbones import create_backbone, get_spec
from medprobe.backbones.ref import BackboneRef
from medprobe.backbones.text_towers import TINY_OPENCLIP_TEXT, load_text_tower, text_backbones
from medprobe.data.adapters import build_dataset
from medprobe.errors import ConfigError, WeightsError
from medprobe.protocols.base import UnitContext, get_protocol

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["a chest X-ray showing nodule", "an X-ray with no nodule", "normal lungs"]


def openclip_reference(name: str):
    """A whole open_clip CLIP model (image + text towers) in the tiny configuration of ``name``."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    spec = get_spec(name)
    cfg = open_clip.get_model_config(spec.arch)
    torch.manual_seed(3)
    model = CLIP(cfg["embed_dim"], CLIPVisionCfg(**{**cfg["vision_cfg"], **spec.tiny}),
                 CLIPTextCfg(**{**cfg["text_cfg"], **TINY_OPENCLIP_TEXT}), quick_gelu=cfg.get("quick_gelu", False))
    perturb(model, seed=4)
    return model.eval(), open_clip.get_tokenizer(spec.arch)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    model, tokenizer = openclip_reference("openclip_vitb16")
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    return path, model, tokenizer


def test_openclip_towers_match_open_clip_model(clip_file):
    path, model, tokenizer = clip_file
    bb = create_backbone("openclip_vitb16", str(path), tiny=True)
    tower = load_text_tower("openclip_vitb16", str(path), tiny=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_diff(tower.encode_image(bb, images), model.encode_image(images)) < 1e-5
        assert max_diff(tower.encode_text(TEXTS), model.encode_text(tokenizer(TEXTS))) < 1e-5
    assert tower.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert "kept the text tower" in " ".join(tower.load_report.conversions)


def _siglip_folder(root: Path):
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    spec = get_spec("siglip_vitb16")
    words = sorted({w for t in TEXTS + ["a chest X-ray showing normal", "an X-ray with no normal"]
                    for w in t.lower().split()})
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(5)
    config = tf.SiglipConfig(text_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=96, vocab_size=64, max_position_embeddings=16),
                             vision_config=dict(spec.tiny))
    model = perturb(tf.SiglipModel(config), seed=6).eval()
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return model, tokenizer


def test_siglip_towers_match_transformers_model(tmp_path):
    model, tokenizer = _siglip_folder(tmp_path)
    bb = create_backbone("siglip_vitb16", str(tmp_path), tiny=True)
    tower = load_text_tower("siglip_vitb16", str(tmp_path), tiny=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = tokenizer(TEXTS, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=images).logits_per_image
        img = torch.nn.functional.normalize(tower.encode_image(bb, images), dim=-1)
        txt = torch.nn.functional.normalize(tower.encode_text(TEXTS), dim=-1)
    assert max_diff(tower.logit_scale * img @ txt.T + tower.logit_bias, ref) < 1e-4


def test_siglip_lone_file_and_image_tower_only_are_refused(tmp_path, clip_file):
    _siglip_folder(tmp_path / "folder")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((tmp_path / "folder" / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match="model folder"):
        load_text_tower("siglip_vitb16", str(lone / "model.safetensors"), tiny=True)
    path, model, _ = clip_file
    visual = tmp_path / "visual.pth"
    torch.save(model.visual.state_dict(), visual)  # the image tower alone
    with pytest.raises(WeightsError, match="text tower"):
        load_text_tower("openclip_vitb16", str(visual), tiny=True)


def test_non_clip_backbone_is_a_config_error_naming_the_clip_family():
    with pytest.raises(ConfigError) as e:
        load_text_tower("dinov2_vits14", "random", tiny=True)
    for name in ("clip_vitl14", "openclip_vitb16", "chexzero", "siglip_vitb16"):
        assert name in str(e.value) and name in text_backbones()


# --------------------------------------------------------------------------- the protocol
def _ctx(dataset, name: str, weights: str, tmp_path: Path, image_size: int = 64) -> UnitContext:
    ref = BackboneRef(name=name, weights=weights, tiny=True)
    return UnitContext(dataset_name="d", dataset=dataset, backbone_name=name, backbone_config=ref,
                       image_size=image_size, precision="fp32", batch_size=8, bootstrap=0,
                       device=torch.device("cpu"), work_dir=tmp_path / "unit", features_fn=None,
                       backbone_fn=ref.build, memo={})


def _run(raw: dict, ctx: UnitContext):
    proto = get_protocol("zero_shot")
    options = proto.parse_options(raw, "protocols.zero_shot")
    (unit,) = proto.units(options, [0, 1], ctx.dataset)
    return proto.run(unit, options, ctx)


def test_binary_scores_are_positive_vs_negative_prompts(clip_file, tmp_path):
    """The stored scores equal a computation with open_clip's own model on the same prepared images."""
    from medprobe.features.extract import preprocessor_for
    path, model, tokenizer = clip_file
    ds = build_dataset("phantom", None, n=24, size=32, seed=0)
    raw = {"templates": ["a chest X-ray showing {}"], "negative_templates": ["an X-ray with no {}"],
           "class_prompts": {"nodule": "a lung nodule"}}
    res = _run(raw, _ctx(ds, "openclip_vitb16", str(path), tmp_path))
    test = res.predictions.splits["test"]
    idx = ds.indices("test")
    assert test.keys == [ds.records[i].key for i in idx]
    pre = preprocessor_for(create_backbone("openclip_vitb16", str(path), tiny=True), ds, 64)
    images = torch.stack([pre.prepare(ds.load_image(i)) for i in idx])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(
            tokenizer(["a chest X-ray showing a lung nodule", "an X-ray with no a lung nodule"])), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        expected = torch.softmax(logits, dim=1)[:, 0].numpy()
    np.testing.assert_allclose(test.columns["score"], expected, rtol=1e-4, atol=1e-6)
    auroc = {m.metric: m.value for m in res.metrics if m.cls is None}["auroc"]
    assert auroc == pytest.approx(roc_auc_score(test.columns["target"], test.columns["score"]))
    assert res.info["prompts"] == {"nodule": ["a chest X-ray showing a lung nodule"]}


@pytest.mark.parametrize("task,name", [("multiclass", "clip_vitl14"), ("multilabel", "siglip_vitb16"),
                                       ("multilabel", "biomedclip")])
def test_multiclass_and_multilabel_on_random_tiny_towers(task, name, tmp_path):
    ds = build_dataset("phantom", None, n=24, size=32, seed=0, task=task)
    size = 56 if get_spec(name).patch_size == 14 else 64
    res = _run({}, _ctx(ds, name, "random", tmp_path, size))
    scores = res.predictions.splits["test"].columns["score"]
    assert scores.shape == (len(ds.indices("test")), 3)
    if task == "multiclass":
        np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)
    assert np.all((scores > 0) & (scores < 1))
    assert {m.metric for m in res.metrics} >= {"auroc"}
    again = _run({}, _ctx(ds, name, "random", tmp_path, size))
    np.testing.assert_array_equal(again.predictions.splits["test"].columns["score"], scores)


def test_bad_options_and_backbones(tmp_path):
    proto = get_protocol("zero_shot")
    with pytest.raises(ConfigError, match="templates"):
        proto.parse_options({"templates": ["no placeholder"]}, "protocols.zero_shot")
    ds = build_dataset("phantom", None, n=24, size=32, seed=0)
    with pytest.raises(ConfigError, match="not a class"):
        _run({"class_prompts": {"pneumonia": "x"}}, _ctx(ds, "openclip_vitb16", "random", tmp_path))
    with pytest.raises(ConfigError, match="clip_vitl14"):
        _run({}, _ctx(ds, "dinov2_vits14", "random", tmp_path, 56))
    seg = build_dataset("phantom", None, n=12, size=32, seed=0, task="segmentation")
    assert "classification" in proto.supports(seg)


def test_zero_shot_unit_through_the_runner(tmp_path):
    import yaml
    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import run_experiment
    cfg = {"name": "zs", "output_dir": str(tmp_path / "out"), "image_size": 64, "precision": "fp32", "bootstrap": 0,
           "datasets": {"chest": {"adapter": "phantom", "n": 24, "size": 32}},
           "backbones": {"clip": {"name": "openclip_vitb16", "weights": "random", "tiny": True}},
           "protocols": {"zero_shot": {}}}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = run_experiment(load_experiment(path), progress=False, log=lambda s: None)
    assert summary.failed == [] and summary.done == 1


# --------------------------------------------------------------------------- BiomedCLIP (open_clip + HF BERT)
BIOMED_WORDS = "a an chest x - ray showing with no nodule normal lungs lung of".split()
BIOMED_CFG = {"model_cfg": {"embed_dim": 24,
                            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                           "timm_pool": "", "timm_proj": "linear", "image_size": 64},
                            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                         "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                                         "context_length": 16}},
              "preprocess_cfg": {"mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}}


class BiomedReference(torch.nn.Module):
    """BiomedCLIP's two towers written directly with timm and transformers: the trunk's pooled output times
    the linear head; BERT's CLS hidden state through open_clip's MLP projection (Linear, GELU, Linear)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        import timm
        import transformers as tf
        torch.manual_seed(7)
        self.trunk = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                       **get_spec("biomedclip").tiny)
        self.head = torch.nn.Linear(48, 24, bias=False)
        self.bert = tf.BertModel(tf.BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=256,
                                               max_position_embeddings=32), add_pooling_layer=False)
        self.proj = torch.nn.Sequential(torch.nn.Linear(128, 76, bias=False), torch.nn.GELU(),
                                        torch.nn.Linear(76, 24, bias=False))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))
        perturb(self, seed=8)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0])

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"visual.trunk.{k}": v for k, v in self.trunk.state_dict().items()}
        sd["visual.head.proj.weight"] = self.head.weight
        sd.update({f"text.transformer.{k}": v for k, v in self.bert.state_dict().items()})
        sd["text.transformer.embeddings.position_ids"] = torch.arange(32)[None]  # as older releases saved it
        sd.update({f"text.proj.{k}": v for k, v in self.proj.state_dict().items()})
        sd["logit_scale"] = self.logit_scale
        return {k: v.detach().clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def biomed_folder(tmp_path_factory):
    """A tiny BiomedCLIP release folder: open_clip_config.json, open_clip_pytorch_model.bin, vocab.txt,
    tokenizer_config.json (no BERT config.json, as released)."""
    import json
    from tokenizers import BertWordPieceTokenizer
    root = tmp_path_factory.mktemp("biomedclip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BIOMED_WORDS
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (root / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True,
                                                            "tokenizer_class": "BertTokenizer"}))
    (root / "open_clip_config.json").write_text(json.dumps(BIOMED_CFG))
    model = BiomedReference(len(vocab)).eval()
    torch.save(model.open_clip_state_dict(), root / "open_clip_pytorch_model.bin")
    # the reference tokenizer: the tokenizers library's WordPiece on vocab.txt (transformers 5's
    # BertTokenizerFast ignores a vocab_file argument: an empty vocabulary, every word [UNK])
    tokenizer = BertWordPieceTokenizer(str(root / "vocab.txt"), lowercase=True)
    tokenizer.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    return root, model, lambda texts: torch.tensor([e.ids for e in tokenizer.encode_batch(texts)])


def test_biomedclip_towers_match_transformers_and_timm(biomed_folder):
    root, model, tokenize = biomed_folder
    bb = create_backbone("biomedclip", str(root), tiny=True)
    tower = load_text_tower("biomedclip", str(root), tiny=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    texts = TEXTS + ["  Normal   LUNGS  "]  # open_clip's whitespace cleaning; the vocabulary is uncased
    with torch.no_grad():
        ref_txt = model.encode_text(tokenize(TEXTS + ["normal lungs"]))
        assert max_diff(tower.encode_text(texts), ref_txt) < 1e-5
        assert max_diff(tower.encode_image(bb, images), model.encode_image(images)) < 1e-5
        assert max_diff(ref_txt[0], ref_txt[1]) > 1e-3  # not degenerate
    assert int((tower.tokenize(TEXTS) == 1).sum()) == 0  # every word in the vocabulary: no [UNK]
    assert tower.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    notes = " ".join(tower.load_report.conversions)
    assert "2 heads" in notes and "position_ids" in notes and "BertTokenizer" in tower.tokenizer_kind


def test_biomedclip_folder_with_a_bert_config_uses_it(biomed_folder, tmp_path):
    import shutil
    root, model, tokenize = biomed_folder
    folder = tmp_path / "with_config"
    shutil.copytree(root, folder)
    model.bert.config.to_json_file(str(folder / "config.json"))
    tower = load_text_tower("biomedclip", str(folder), tiny=True)
    with torch.no_grad():
        assert max_diff(tower.encode_text(TEXTS), model.encode_text(tokenize(TEXTS))) < 1e-5
    assert any("BERT configuration from" in c for c in tower.load_report.conversions)


def test_biomedclip_incomplete_or_foreign_folders_are_refused(biomed_folder, tmp_path):
    import shutil
    root, model, _ = biomed_folder
    sd = model.open_clip_state_dict()
    for name, change, match in [("missing", lambda d: d.pop("text.proj.2.weight"), "text.proj.2.weight|proj.2.weight"),
                                ("stray", lambda d: d.update({"text_projection": torch.zeros(2)}), "text_projection"),
                                ("headless", lambda d: d.pop("visual.head.proj.weight"), "visual.head.proj")]:
        folder = tmp_path / name
        shutil.copytree(root, folder)
        bad = dict(sd)
        change(bad)
        torch.save(bad, folder / "open_clip_pytorch_model.bin")
        with pytest.raises(WeightsError, match=match):
            load_text_tower("biomedclip", str(folder), tiny=True)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(root / "open_clip_pytorch_model.bin", lone)
    with pytest.raises(WeightsError, match="open_clip_config.json"):
        load_text_tower("biomedclip", str(lone / "open_clip_pytorch_model.bin"), tiny=True)
    tower = load_text_tower("biomedclip", str(root), tiny=True)
    with pytest.raises(ConfigError, match="context"):
        tower.encode_text(["chest " * 20])


def test_biomedclip_zero_shot_unit_matches_reference(biomed_folder, tmp_path):
    from medprobe.features.extract import preprocessor_for
    root, model, tokenize = biomed_folder
    ds = build_dataset("phantom", None, n=24, size=32, seed=0)
    raw = {"templates": ["a chest X-ray showing {}"], "negative_templates": ["an X-ray with no {}"],
           "class_prompts": {"nodule": "a lung nodule"}}
    res = _run(raw, _ctx(ds, "biomedclip", str(root), tmp_path))
    test = res.predictions.splits["test"]
    idx = ds.indices("test")
    pre = preprocessor_for(create_backbone("biomedclip", str(root), tiny=True), ds, 64)
    images = torch.stack([pre.prepare(ds.load_image(i)) for i in idx])
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(
            tokenize(["a chest x-ray showing a lung nodule", "an x-ray with no a lung nodule"])), dim=-1)
        expected = torch.softmax(model.logit_scale.exp() * img @ txt.T, dim=1)[:, 0].numpy()
    np.testing.assert_allclose(test.columns["score"], expected, rtol=1e-4, atol=1e-6)
    assert res.info["tokenizer"].startswith("BertTokenizer")
