"""A fine-tuned ``best.pt`` (adaptation loop, ``save_checkpoint: true``) loads as ``weights:`` of the same backbone."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medprobe.backbones import create_backbone
from medprobe.backbones.ref import BackboneRef
from medprobe.backbones.weights import read_checkpoint
from medprobe.data.adapters import build_dataset
from medprobe.errors import WeightsError
from medprobe.protocols.base import UnitContext, get_protocol

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom():
    return build_dataset("phantom", None, n=24, size=32, seed=0)


def finetune(name: str, size: int, dataset, tmp_path: Path, protocol: str = "finetune", **raw):
    """Train one unit with save_checkpoint on; return the trained backbone object and the checkpoint path."""
    bb = create_backbone(name, "random", tiny=True)
    ref = BackboneRef(name=name, weights="random", tiny=True)
    ctx = UnitContext(dataset_name="d", dataset=dataset, backbone_name=name, backbone_config=ref, image_size=size,
                      precision="fp32", batch_size=8, bootstrap=0, device=torch.device("cpu"),
                      work_dir=tmp_path / "unit", features_fn=None, backbone_fn=lambda: bb, memo={})
    proto = get_protocol(protocol)
    options = proto.parse_options({"epochs": 1, "save_checkpoint": True, "augment": [], **raw}, protocol)
    unit = proto.units(options, [0], dataset)[0]
    result = proto.run(unit, options, ctx)
    return bb, Path(result.info["checkpoint"])


@pytest.mark.parametrize("name,size", [("dinov2_vits14", 28), ("rad_dino", 28), ("openclip_vitb16", 32),
                                       ("resnet18", 32), ("biomedclip", 32)])
def test_best_pt_gives_the_finetuned_backbone_exactly(name, size, phantom, tmp_path):
    trained, ckpt = finetune(name, size, phantom, tmp_path)
    loaded = create_backbone(name, weights=str(ckpt), tiny=True)
    fresh = create_backbone(name, "random", tiny=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref, before = (b.eval().forward_tokens(x) for b in (loaded, trained, fresh))
    torch.testing.assert_close(out.cls, ref.cls, rtol=0, atol=0)
    torch.testing.assert_close(out.patch_grid, ref.patch_grid, rtol=0, atol=0)
    assert not torch.equal(before.cls, ref.cls)  # training changed the backbone: the check can fail
    report = loaded.load_report
    assert report.layout.startswith("medprobe fine-tuning checkpoint")
    assert any(c.startswith("dropped the classifier head (head.bias, head.weight)") for c in report.conversions)


def test_frozen_blocks_are_saved_too_and_extra_modules_are_reported(phantom, tmp_path):
    trained, ckpt = finetune("dinov2_vits14", 28, phantom, tmp_path, "freeze_blocks", k=[2])
    loaded = create_backbone("dinov2_vits14", str(ckpt), tiny=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    _, ckpt = finetune("dinov2_vits14", 28, phantom, tmp_path / "deit", "deit_head", classifier="deit_s16",
                       classifier_weights="random", foundation=["unfrozen"])
    notes = " ".join(read_checkpoint(ckpt).conversions)
    assert "dropped the appended classifier (encoder.blocks" in notes


def test_lora_and_other_backbone_checkpoints_fail_loudly(phantom, tmp_path):
    _, ckpt = finetune("dinov2_vits14", 28, phantom, tmp_path, "lora", r=2)
    with pytest.raises(WeightsError, match="LoRA"):
        create_backbone("dinov2_vits14", str(ckpt), tiny=True)
    _, ckpt = finetune("dinov2_vits14", 28, phantom, tmp_path / "b", "finetune")
    with pytest.raises(WeightsError, match=str(ckpt)):
        create_backbone("deit_s16", str(ckpt), tiny=True)  # another architecture: strict loading names the file
