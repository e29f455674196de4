"""The papers' segmentation recipe: decoder widths sized to the published parameter counts, paired
elastic/gamma/flip augmentations, Dice/Jaccard sd across cases."""
from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from medprobe.data.adapters import build_dataset
from medprobe.errors import ConfigError
from medprobe.metrics import MetricValue, aggregate_cases
from medprobe.protocols.base import get_protocol
from medprobe.protocols.segmentation.augment import adjust_gamma, augment_pair
from medprobe.protocols.segmentation.decoders import PAPER_WIDTHS, build_decoder, count_trainable, resolve_width

from test_segmentation import make_ctx, metric, run_protocol  # noqa: E402  (shared helpers)

pytestmark = pytest.mark.usefixtures("one_thread")


def meta_params(name: str, dim: int, classes: int, width) -> int:
    with torch.device("meta"):  # no memory, no initialisation: counts only
        return count_trainable(build_decoder(name, [dim] * 4, classes, width))


# published counts (trainable parameters): DINOv2-radiology Table 6 and RAD-DINO Table 3
@pytest.mark.parametrize("name, dim, classes, published", [
    ("unet", 1024, 1, 17e6),     # ViT-L/14, "17M (5%)"
    ("unet", 1536, 1, 38e6),     # ViT-g/14, "38M (3%)": not used to fit the width fraction
    ("upernet", 768, 2, 39.3e6),
    ("vitdet", 768, 2, 24.8e6),
])
def test_paper_widths_give_the_published_parameter_counts(name, dim, classes, published):
    n = meta_params(name, dim, classes, "paper")
    assert abs(n - published) / published < 0.03, (name, dim, n)
    assert meta_params(name, dim, classes, 128) < 0.5 * published  # the default width is far from it


def test_paper_width_resolution_and_errors():
    assert resolve_width("unet", 96, [64] * 4) == 96
    assert resolve_width("unet", "paper", [1024] * 4) == PAPER_WIDTHS["unet"].width(1024)
    assert resolve_width("unet", "paper", [1024] * 4) % 8 == 0
    with pytest.raises(ConfigError, match="width"):
        resolve_width("unet", "wide", [64] * 4)


def test_width_paper_option_goes_into_the_unit_identity():
    proto = get_protocol("segmentation")
    ds = build_dataset("phantom", None, n=12, size=28, task="segmentation")
    paper = proto.units(proto.parse_options({"decoders": ["unet", "linear"], "width": "paper"}, "p"), [0], ds)
    plain = proto.units(proto.parse_options({"decoders": ["unet", "linear"]}, "p"), [0], ds)
    assert "0.836" in paper[0].params["width"] and plain[0].params["width"] == 128
    assert "width" not in paper[1].params  # the linear decoder has no width
    with pytest.raises(ConfigError, match="width"):
        proto.parse_options({"width": 4}, "protocols.segmentation")
    with pytest.raises(ConfigError, match="augment"):
        proto.parse_options({"augment": True, "augmentations": ["elastik"]}, "protocols.segmentation")


# --------------------------------------------------------------------------- augmentations
def _label_batch(b: int = 4, size: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.zeros(b, size, size, dtype=torch.long)
    m[:, 8:30, 5:18] = 1
    m[:, 12:20, 22:36] = 2
    return m.float()[:, None].expand(-1, 3, -1, -1).contiguous(), m


@pytest.mark.parametrize("names", [["elastic"], ["hflip"], ["affine", "hflip", "elastic"]])
def test_geometric_augmentations_move_image_and_mask_together(names):
    img, mask = _label_batch()
    x, y = augment_pair(img, mask, torch.Generator().manual_seed(3), names)
    assert y.dtype == torch.long and set(y.unique().tolist()) <= {0, 1, 2}  # nearest: labels stay labels
    # the image is the mask drawn in grey levels: bilinear and nearest agree away from the edges
    agree = (x[:, 0].round().long() == y).float().mean()
    assert agree > 0.97
    assert not torch.equal(y, mask)  # something moved
    x2, y2 = augment_pair(img, mask, torch.Generator().manual_seed(3), names)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded
    x3, y3 = augment_pair(img, mask, torch.Generator().manual_seed(4), names)
    assert not torch.equal(y, y3)


def test_hflip_flips_exactly_or_not_at_all():
    img, mask = _label_batch(b=16)
    _, y = augment_pair(img, mask, torch.Generator().manual_seed(0), ["hflip"])
    flipped = [torch.equal(y[i], mask[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(y[i], mask[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_elastic_field_is_smooth_and_small():
    img, mask = _label_batch(b=2, size=64)
    _, y = augment_pair(img, mask, torch.Generator().manual_seed(1), ["elastic"])
    changed = (y != mask).float().mean()
    assert 0 < changed < 0.2  # a deformation of the edges, not a scramble


def test_gamma_matches_monai_adjust_contrast():
    monai_transforms = pytest.importorskip("monai.transforms")
    x = torch.randn(3, 3, 16, 16)
    gammas = torch.tensor([0.7, 1.0, 1.45])
    ours = adjust_gamma(x, gammas)
    for i, g in enumerate(gammas.tolist()):
        ref = monai_transforms.AdjustContrast(gamma=g)(x[i])
        np.testing.assert_allclose(ours[i].numpy(), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_gamma_leaves_the_mask_and_geometry_alone():
    img, mask = _label_batch()
    img = img + torch.rand(img.shape, generator=torch.Generator().manual_seed(0))
    x, y = augment_pair(img, mask, torch.Generator().manual_seed(2), ["gamma"])
    assert torch.equal(y, mask)
    assert not torch.allclose(x, img)
    # a monotone intensity map per image: the pixel order is kept
    for i in range(len(img)):
        a, b = img[i].flatten(), x[i].flatten()
        ordered = b[torch.argsort(a, stable=True)]
        assert bool((ordered[1:] >= ordered[:-1] - 1e-6).all())


# --------------------------------------------------------------------------- Dice sd across cases
def test_dice_and_jaccard_sd_across_cases():
    per_case = [[MetricValue("dice", d), MetricValue("dice", d, "lung"), MetricValue("jaccard", d / (2 - d)),
                 MetricValue("hd95", 3.0)] for d in (0.9, 0.5, float("nan"), 0.7)]
    out = {(m.metric, m.cls): m for m in aggregate_cases(per_case)}
    assert out[("dice_sd", None)].value == pytest.approx(statistics.stdev([0.9, 0.5, 0.7]))
    assert out[("dice_sd", "lung")].value == pytest.approx(statistics.stdev([0.9, 0.5, 0.7]))
    assert out[("jaccard_sd", None)].value == pytest.approx(statistics.stdev([d / (2 - d) for d in (0.9, 0.5, 0.7)]))
    assert ("hd95_sd", None) not in out
    one = {(m.metric, m.cls): m for m in aggregate_cases(per_case[:1])}
    assert np.isnan(one[("dice_sd", None)].value) and "undefined" in one[("dice_sd", None)].note


def test_protocol_runs_with_the_paper_recipe(tmp_path):
    ds = build_dataset("phantom", None, n=16, size=28, task="segmentation")
    ctx = make_ctx(tmp_path, ds)
    res = run_protocol(ctx, decoders=["vitdet"], epochs=1, width="paper", augment=True,
                       augmentations=["elastic", "gamma", "hflip"],
                       overlays=0)
    (variant, r), = res.items()
    assert variant == "vitdet aug(elastic+gamma+hflip)"
    assert r.info["width"] == PAPER_WIDTHS["vitdet"].width(ctx.backbone().embed_dim)
    assert r.info["augment"] == ["elastic", "gamma", "hflip"]
    assert r.info["backbone_calls_in_training"] > 0  # augmented images go through the frozen backbone
    cases = len(ds.indices("test"))
    per_case = r.predictions.splits["test"].columns["dice"]
    assert len(per_case) == cases
    assert metric(r, "dice_sd") == pytest.approx(float(np.nanstd(per_case, ddof=1)))
