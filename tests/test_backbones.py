import json
import time

import pytest
import torch

from medprobe.backbones import create_backbone, get_spec, list_backbones, save_dinov2_checkpoint
from medprobe.errors import ConfigError, WeightsError

REQUIRED = ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14", "dinov2_vits14_reg",
            "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg", "rad_dino", "clip_vitl14",
            "openclip_vith14", "biomedclip", "sam_vitb16", "sam_vitl16", "mae_vitl16", "msn_vitl16", "vit_l16_in21k",
            "deit_b16", "resnet152", "densenet201", "vgg19"]
TESTED = [s.name for s in list_backbones() if "vitg14" not in s.name]


def _size(bb, scale=4):
    return bb.patch_size * scale if bb.patch_size else 64


def test_registry_lists_required_backbones_with_contract():
    names = {s.name for s in list_backbones()}
    assert set(REQUIRED) <= names
    for s in list_backbones():
        assert s.embed_dim > 0 and s.num_blocks > 0 and s.default_image_size >= 224
        assert len(s.preprocess.mean) == 3 and all(v > 0 for v in s.preprocess.std)
    assert get_spec("rad_dino").preprocess.mean[0] == pytest.approx(0.5307)
    assert get_spec("clip_vitl14").preprocess.mean[0] == pytest.approx(0.48145466)
    assert get_spec("dinov2_vitg14").embed_dim == 1536 and get_spec("dinov2_vitg14").num_blocks == 40


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError, match="dinov2_vits14"):
        get_spec("dinov2_vits41")


@pytest.mark.parametrize("name", TESTED)
def test_every_family_gives_token_contract(name):
    bb = create_backbone(name, "random", tiny=True)
    s = _size(bb)
    x = torch.randn(2, 3, s, s)
    with torch.inference_mode():
        out = bb.forward_tokens(x, blocks=[0, -2, -1])
    d = bb.embed_dim
    assert out.cls.shape == (2, d) and out.mean_patch.shape == (2, d)
    assert out.patch_grid.shape[:2] == (2, d)
    if bb.patch_size:
        assert out.patch_grid.shape[2:] == (s // bb.patch_size, s // bb.patch_size)
        assert [b.index for b in out.blocks] == [0, bb.num_blocks - 2, bb.num_blocks - 1]
        torch.testing.assert_close(out.blocks[-1].patch_grid, out.patch_grid)
    torch.testing.assert_close(out.mean_patch, out.patch_grid.mean(dim=(2, 3)))
    if not bb.has_cls_token:
        torch.testing.assert_close(out.cls, out.mean_patch)
    assert bb.weights_tag == "random"


@pytest.mark.parametrize("name", ["dinov2_vits14", "rad_dino", "clip_vitl14", "sam_vitb16", "biomedclip", "msn_vitl16"])
def test_position_embeddings_interpolate_to_other_sizes(name):
    bb = create_backbone(name, "random", tiny=True)
    p = bb.patch_size
    for cells in (3, 6):
        with torch.inference_mode():
            out = bb.forward_tokens(torch.randn(1, 3, p * cells, p * (cells + 1)))
        assert out.patch_grid.shape[2:] == (cells, cells + 1)
        assert torch.isfinite(out.cls).all()


def test_intermediate_block_index_out_of_range_is_clear():
    bb = create_backbone("dinov2_vits14", "random", tiny=True)
    with pytest.raises(ConfigError, match="out of range"):
        bb.forward_tokens(torch.randn(1, 3, 28, 28), blocks=[10])


def _same_outputs(a, b, size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        oa, ob = a.forward_tokens(x, blocks=[0]), b.forward_tokens(x, blocks=[0])
    torch.testing.assert_close(oa.cls, ob.cls)
    torch.testing.assert_close(oa.patch_grid, ob.patch_grid)
    torch.testing.assert_close(oa.blocks[0].cls, ob.blocks[0].cls)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "deit_b16", "resnet50", "sam_vitb16",
                                  "clip_vitl14", "rad_dino", "biomedclip"])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_state_dict_round_trip(tmp_path, name, fmt):
    from safetensors.torch import save_file
    a = create_backbone(name, "random", tiny=True)
    sd = {k: v.contiguous() for k, v in a.model.state_dict().items()}
    if name == "biomedclip":  # open_clip layout: the timm trunk lives under visual.trunk.
        sd = {f"visual.trunk.{k}": v for k, v in sd.items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"model": sd, "epoch": 3}, path)  # wrapped, as training scripts save
    b = create_backbone(name, str(path), tiny=True)
    assert b.weights_tag.startswith("file:")
    _same_outputs(a, b, _size(a))


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_dinov2_original_format_round_trip(tmp_path, name):
    a = create_backbone(name, "random", tiny=True)
    path = save_dinov2_checkpoint(a.model, tmp_path / "dinov2.pth", a.spec.num_register_tokens)
    raw = torch.load(path, weights_only=True)
    assert "mask_token" in raw and "blocks.0.ls1.gamma" in raw
    assert ("register_tokens" in raw) == name.endswith("_reg")
    # a training checkpoint wraps the backbone under teacher/backbone.
    torch.save({"teacher": {f"backbone.{k}": v for k, v in raw.items()}}, tmp_path / "train.pth")
    for p in (path, tmp_path / "train.pth"):
        _same_outputs(a, create_backbone(name, str(p), tiny=True), 56)


def test_hf_save_pretrained_folder(tmp_path):
    a = create_backbone("rad_dino", "random", tiny=True)
    a.model.save_pretrained(tmp_path / "rad")
    assert (tmp_path / "rad" / "config.json").is_file()
    b = create_backbone("rad_dino", str(tmp_path / "rad"), tiny=True)
    assert json.loads((tmp_path / "rad" / "config.json").read_text())["hidden_size"] == b.embed_dim
    _same_outputs(a, b, 56)


def test_mismatched_weights_name_the_problem(tmp_path):
    a = create_backbone("deit_b16", "random", tiny=True)
    torch.save(a.model.state_dict(), tmp_path / "deit.pth")
    with pytest.raises(WeightsError, match="deit.pth"):
        create_backbone("dinov2_vits14", str(tmp_path / "deit.pth"), tiny=True)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        create_backbone("dinov2_vits14", str(tmp_path / "junk.pth"), tiny=True)
    with pytest.raises(WeightsError, match="neither"):
        create_backbone("dinov2_vits14", str(tmp_path / "missing.pth"), tiny=True)


def test_hub_weights_fail_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(WeightsError, match="model.safetensors") as e:
        create_backbone("dinov2_vits14", "hub", tiny=True)
    assert time.perf_counter() - t < 10
    assert "huggingface.co/timm/vit_small_patch14_dinov2.lvd142m" in str(e.value)


def test_truncate_keeps_first_blocks():
    bb = create_backbone("dinov2_vits14", "random", tiny=True)
    x = torch.randn(1, 3, 28, 28)
    with torch.inference_mode():
        full = bb.forward_tokens(x, blocks=[1])
    bb.truncate(2)
    assert bb.num_blocks == 2 and len(bb.block_modules()) == 2
    with torch.inference_mode():
        cut = bb.forward_tokens(x)
    torch.testing.assert_close(cut.cls, full.blocks[0].cls)


@pytest.mark.parametrize("name", TESTED)
def test_attention_through_the_backbone_contract(name):
    bb = create_backbone(name, "random", tiny=True)
    s = _size(bb)
    x = torch.randn(1, 3, s, s)
    # timm/open_clip recompute it from q/k (CLS models without rotary embeddings); transformers returns it
    supported = bb.is_vit and not getattr(bb, "is_sam", False) and name != "dinov3_vitb16" and (
        bb.has_cls_token or bb.spec.family == "hf")
    if not supported:
        with pytest.raises(ConfigError):
            bb.attention(x)
        return
    with torch.no_grad():
        att = bb.attention(x)
    n = (s // bb.patch_size) ** 2 + getattr(bb, "num_prefix_tokens", 1)  # open_clip: CLS only
    assert att.shape[0] == 1 and att.shape[2:] == (n, n)
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]))


def test_check_weights_command(tmp_path, capsys):
    from medprobe.cli import main
    a = create_backbone("deit_s16", "random", tiny=True)
    torch.save({"model": a.model.state_dict(), "epoch": 3}, tmp_path / "deit.pth")
    assert main(["check-weights", "deit_s16", str(tmp_path / "deit.pth"), "--tiny"]) == 0
    out = capsys.readouterr().out
    assert "PyTorch checkpoint" in out and "'model'" in out and "OK" in out
    assert f"{sum(p.numel() for p in a.parameters()):,}" in out
    assert main(["check-weights", "dinov2_vits14", str(tmp_path / "deit.pth"), "--tiny"]) == 2
    assert "deit.pth" in capsys.readouterr().err


def test_list_backbones_details_names_the_weights_file(capsys):
    from medprobe.cli import main
    assert main(["list", "backbones", "--details", "sam_vitb16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "sam_vit_b_01ec64.pth" in info["weights_file"] and "segment_anything" in info["published_at"]
    for s in list_backbones():
        from medprobe.backbones.registry import weights_help
        assert all(weights_help(s).values()), s.name


def test_siglip_tower_from_an_image_text_folder(tmp_path):
    import transformers
    a = create_backbone("siglip_vitb16", "random", tiny=True)
    cfg = transformers.SiglipConfig(vision_config=a.model.config.to_dict(),
                                    text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100))
    full = transformers.SiglipModel(cfg)
    full.vision_model.load_state_dict(a.model.state_dict())
    full.save_pretrained(tmp_path / "siglip")
    b = create_backbone("siglip_vitb16", str(tmp_path / "siglip"), tiny=True)
    _same_outputs(a, b, 64)
    assert any("vision tower" in c for c in b.load_report.conversions)


def test_dino_v1_release_layout(tmp_path):
    a = create_backbone("dino_vitb16", "random", tiny=True)
    sd = {k: v for k, v in a.model.state_dict().items()}
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"head.mlp.0.weight": torch.ones(2, 2)}},
               tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth")
    _same_outputs(a, create_backbone("dino_vitb16", str(tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth"),
                                     tiny=True), 64)
