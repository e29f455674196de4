"""WACV preprocessing: resize the shortest edge to size*256/224, then centre-crop size; per backbone or per
experiment, and part of the feature-store identity and the unit key."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from medprobe.backbones.ref import BackboneRef
from medprobe.backbones.registry import IMAGENET
from medprobe.data.preprocess import Preprocessor
from medprobe.errors import ConfigError
from medprobe.experiment.config import load_experiment
from medprobe.experiment.runner import plan_experiment


@pytest.mark.parametrize("h,w,size", [(300, 400, 224), (512, 384, 224), (256, 256, 112)])
def test_matches_torchvision_resize_256_center_crop_224(h, w, size):
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    pre = Preprocessor(replace(IMAGENET, resize="resize256_crop224"), size)
    edge = round(size * 256 / 224)
    ref = TF.center_crop(TF.resize(x, [edge], interpolation=InterpolationMode.BICUBIC, antialias=True), [size, size])
    out = pre.resize(x)
    assert out.shape == ref.shape == (1, 3, size, size)
    assert float((out - ref).abs().max()) < 1e-4
    square = Preprocessor(IMAGENET, size).resize(x)
    assert float((out - square).abs().max()) > 1e-2  # the policy changes the pixels


def test_segmentation_masks_follow_the_same_crop():
    from medprobe.protocols.segmentation.items import Geometry
    mask = np.zeros((300, 400), dtype=np.uint8)
    mask[:, :200] = 1  # left half
    out = Geometry(224, "resize256_crop224").mask_to_input(mask)
    # resized to 256 x 341, columns 58..281 kept: the boundary (at 170.7 of 341) lands at column ~113
    assert out.shape == (224, 224) and out[:, :110].all() and not out[:, 116:].any()


def _experiment(tmp_path: Path, top: str | None, own: str | None) -> Path:
    backbone = {"name": "dinov2_vits14", "weights": "random", "tiny": True}
    if own:
        backbone["resize"] = own
    cfg = {"name": "e", "output_dir": str(tmp_path / "out"), "image_size": 28, "precision": "fp32",
           "datasets": {"d": {"adapter": "phantom", "n": 12, "size": 32}}, "backbones": {"b": backbone},
           "protocols": {"knn": {"k": [3]}}}
    if top:
        cfg["resize"] = top
    path = tmp_path / f"e-{top}-{own}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resize_per_experiment_or_per_backbone_enters_the_unit_key(tmp_path):
    keys = {}
    for top, own in [(None, None), ("resize256_crop224", None), (None, "resize256_crop224"),
                     ("resize256_crop224", "square")]:
        config = load_experiment(_experiment(tmp_path, top, own))
        keys[(top, own)] = {u.key for u in plan_experiment(config).units}
        ref = config.backbone_configs["b"]
        assert ref.resize == (own or top)
        assert ref.build().preprocess.resize == (own or top or "square")
    assert keys[("resize256_crop224", None)] == keys[(None, "resize256_crop224")]
    assert not keys[(None, None)] & keys[("resize256_crop224", None)]
    assert not keys[(None, None)] & keys[("resize256_crop224", "square")]  # explicit square: own key


def test_resize_enters_the_feature_store_identity():
    from medprobe.data.adapters import build_dataset
    from medprobe.features.extract import preprocessor_for, store_identity
    ds = build_dataset("phantom", None, n=12, size=32, seed=0)
    ids = []
    for resize in (None, "resize256_crop224"):
        bb = BackboneRef(name="dinov2_vits14", tiny=True, resize=resize).build()
        pre = preprocessor_for(bb, ds, 28)
        ids.append(store_identity(bb, ds, pre, [3], [], "fp32"))
    assert ids[0]["preprocess"]["resize"] == "square" and ids[1]["preprocess"]["resize"] == "resize256_crop224"


def test_unknown_policy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="resize"):
        load_experiment(_experiment(tmp_path, None, "crop256"))
