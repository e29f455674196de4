"""Released checkpoint layouts, written by the authors' model code (random weights, tiny configs):
each loads with every tensor accounted for and gives the same outputs, or fails with a
WeightsError naming the file and what is wrong (issue 13, items 2-6; issue 18, item 10)."""
import argparse
import pathlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from backbone_util import images, perturb
from medprobe.backbones import create_backbone
from medprobe.errors import WeightsError

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a, b, size):
    x = images(size)
    with torch.inference_mode():
        oa, ob = a.forward_tokens(x, blocks=[0]), b.forward_tokens(x, blocks=[0])
    torch.testing.assert_close(oa.cls, ob.cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oa.patch_grid, ob.patch_grid, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oa.blocks[0].patch_grid, ob.blocks[0].patch_grid, atol=1e-5, rtol=1e-5)


def _hf(name):
    bb = create_backbone(name, "random", tiny=True)
    perturb(bb.model)
    return bb


# --------------------------------------------------------------------------- item 2: HF folders, every tensor
def test_hf_folder_missing_tensors_is_an_error(tmp_path):
    a = _hf("rad_dino")
    a.model.save_pretrained(tmp_path / "rad")
    f = tmp_path / "rad" / "model.safetensors"
    sd = load_file(str(f))
    save_file({k: v for k, v in sd.items() if not k.startswith(("encoder.layer.3.", "layernorm."))}, str(f))
    with pytest.raises(WeightsError, match=r"model\.safetensors.*not in the file.*(layernorm|layers?\.3)"):
        create_backbone("rad_dino", str(tmp_path / "rad"), tiny=True)


def test_hf_folder_of_another_size_is_an_error(tmp_path):
    small = create_backbone("rad_dino", "random", tiny=True, overrides={"hidden_size": 32})
    small.model.save_pretrained(tmp_path / "vits")
    with pytest.raises(WeightsError, match="hidden_size=32"):
        create_backbone("rad_dino", str(tmp_path / "vits"), tiny=True)


# --------------------------------------------------------------------------- item 3: released safetensors file
@pytest.mark.parametrize("name", ["rad_dino", "msn_vitl16"])
def test_released_hf_safetensors_file_loads(tmp_path, name):
    a = _hf(name)
    a.model.save_pretrained(tmp_path / "hf")  # transformers writes the released (legacy) key names
    f = tmp_path / "hf" / "model.safetensors"
    assert any(".attention.attention.query." in k for k in load_file(str(f)))
    b = create_backbone(name, str(f), tiny=True)
    _same(a, b, a.patch_size * 4)
    assert "transformers" in " ".join(b.load_report.conversions)


def test_hf_file_with_a_missing_tensor_names_it(tmp_path):
    a = _hf("msn_vitl16")
    a.model.save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    sd.pop("encoder.layer.1.output.dense.weight")
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match=r"w\.safetensors.*1 tensor\(s\) of the model are not in the file"):
        create_backbone("msn_vitl16", str(tmp_path / "w.safetensors"), tiny=True)


# --------------------------------------------------------------------------- item 4: broken HF folders
def test_broken_hf_folders_are_weights_errors(tmp_path):
    a = _hf("rad_dino")
    a.model.save_pretrained(tmp_path / "rad")
    f = tmp_path / "rad" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        create_backbone("rad_dino", str(tmp_path / "rad"), tiny=True)
    f.unlink()
    with pytest.raises(WeightsError, match=r"no weights file"):
        create_backbone("rad_dino", str(tmp_path / "rad"), tiny=True)


# --------------------------------------------------------------------------- item 5: MSN blocks, LoRA targets
def test_msn_blocks_and_truncation():
    bb = create_backbone("msn_vitl16", "random", tiny=True)
    assert len(bb.block_modules()) == bb.num_blocks == 4
    x = images(64, n=1)
    with torch.inference_mode():
        full = bb.forward_tokens(x, blocks=[1])
    bb.truncate(2)
    assert len(bb.block_modules()) == 2
    with torch.inference_mode():
        torch.testing.assert_close(bb.forward_tokens(x).cls, full.blocks[0].cls)


@pytest.mark.parametrize("name,attention", [("rad_dino", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                            ("msn_vitl16", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                            ("dinov2_vits14", {"qkv", "proj"}), ("clip_vitl14", {"attn"})])
def test_lora_default_targets_include_attention(name, attention):
    from medprobe.protocols.adapt.peft import apply_lora
    bb = create_backbone(name, "random", tiny=True)
    info = apply_lora(bb, 2, 4, 0.0, None)
    assert attention <= set(info["lora_targets"])


def test_lora_target_set_not_fitting_the_family_fails():
    from medprobe.errors import ConfigError
    from medprobe.protocols.adapt.peft import apply_lora
    bb = create_backbone("rad_dino", "random", tiny=True)
    with pytest.raises(ConfigError, match="qkv"):
        apply_lora(bb, 2, 4, 0.0, ["qkv", "fc1"])
    bb.lora_targets = ("qkv", "proj", "fc1", "fc2")  # a timm target set on a transformers model
    with pytest.raises(ConfigError, match="qkv"):
        apply_lora(bb, 2, 4, 0.0, None)


# --------------------------------------------------------------------------- item 6: other released layouts
def test_mae_full_checkpoint_with_namespace(tmp_path):
    a = _hf("mae_vitl16")
    sd = dict(a.model.state_dict())
    sd["mask_token"] = torch.zeros(1, 1, 48)
    sd.update({"decoder_embed.weight": torch.randn(32, 48), "decoder_pos_embed": torch.randn(1, 17, 32),
               "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pred.weight": torch.randn(768, 32)})
    torch.save({"model": sd, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(model="mae_vit_large")},
               tmp_path / "mae_visualize_vit_large.pth")
    b = create_backbone("mae_vitl16", str(tmp_path / "mae_visualize_vit_large.pth"), tiny=True)
    _same(a, b, 64)
    assert any("decoder" in c for c in b.load_report.conversions)


def test_openai_torchscript_clip(tmp_path):
    a = _hf("clip_vitl14")
    holder = torch.nn.Module()
    holder.visual = a.model

    class Visual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = a.model

        def forward(self, x):
            return self.visual(x)

    torch.jit.save(torch.jit.trace(Visual().eval(), images(56, n=1), check_trace=False), tmp_path / "ViT-L-14.pt")
    b = create_backbone("clip_vitl14", str(tmp_path / "ViT-L-14.pt"), tiny=True)
    assert b.load_report.layout == "TorchScript archive"
    _same(a, b, 56)


@pytest.mark.parametrize("registers", [False, True])
def test_hf_facebook_dinov2_folder_for_dinov2_entries(tmp_path, registers):
    import transformers
    kw = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=4, image_size=56, patch_size=14,
              layer_norm_eps=1e-6)
    if registers:
        ref = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
    else:
        ref = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    perturb(ref.eval())
    ref.save_pretrained(tmp_path / "dinov2-small")
    bb = create_backbone("dinov2_vits14_reg" if registers else "dinov2_vits14", str(tmp_path / "dinov2-small"),
                         tiny=True)
    x = images(56)
    with torch.inference_mode():
        mine, theirs = bb.forward_tokens(x), ref(pixel_values=x).last_hidden_state
    torch.testing.assert_close(mine.cls, theirs[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.patch_grid.flatten(2).transpose(1, 2), theirs[:, 1 + 4 * registers:],
                               atol=1e-5, rtol=1e-5)


def test_register_mixup_is_explained(tmp_path):
    from medprobe.backbones import save_dinov2_checkpoint
    plain = create_backbone("dinov2_vits14", "random", tiny=True)
    save_dinov2_checkpoint(plain.model, tmp_path / "noreg.pth")
    with pytest.raises(WeightsError, match=r"noreg\.pth.*without register tokens.*without `_reg`"):
        create_backbone("dinov2_vits14_reg", str(tmp_path / "noreg.pth"), tiny=True)
    reg = create_backbone("dinov2_vits14_reg", "random", tiny=True)
    save_dinov2_checkpoint(reg.model, tmp_path / "reg.pth", 4)
    with pytest.raises(WeightsError, match=r"reg\.pth.*4 register tokens.*`_reg`"):
        create_backbone("dinov2_vits14", str(tmp_path / "reg.pth"), tiny=True)


def test_unreadable_files_say_why_without_torch_advice(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "notckpt.txt").write_text("hello\n")
    torch.save({"model": {"w": torch.ones(1)}, "where": pathlib.PurePosixPath("/x")}, tmp_path / "obj.pth")
    cases = {"empty.pth": "empty", "notckpt.txt": "not a PyTorch checkpoint", "obj.pth": "PurePosixPath"}
    for name, reason in cases.items():
        with pytest.raises(WeightsError) as e:
            create_backbone("deit_s16", str(tmp_path / name), tiny=True)
        assert name in str(e.value) and reason in str(e.value)
        assert "weights_only" not in str(e.value)


def test_sam_full_checkpoint(tmp_path):
    a = _hf("sam_vitb16")
    sd = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in a.model.state_dict().items()}
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    torch.save(sd, tmp_path / "sam_vit_b_01ec64.pth")
    b = create_backbone("sam_vitb16", str(tmp_path / "sam_vit_b_01ec64.pth"), tiny=True)
    _same(a, b, 64)
    assert any("dropped" in c for c in b.load_report.conversions)
