"""The segmentation protocol: decoders, losses, training on cached grids, 3D volumes, pictures, bad input."""
from __future__ import annotations

import math
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from medprobe.backbones import create_backbone
from medprobe.backbones.timm_family import TimmBackbone
from medprobe.data.adapters import build_dataset
from medprobe.errors import ConfigError, DataError
from medprobe.features import extract_features
from medprobe.protocols.base import UnitContext, get_protocol
from medprobe.protocols.segmentation import protocol as seg_protocol
from medprobe.protocols.segmentation.decoders import build_decoder, count_trainable
from medprobe.protocols.segmentation.items import Geometry, build_items, input_masks
from medprobe.protocols.segmentation.losses import DiceCELoss, soft_dice_per_class
from medprobe.protocols.segmentation.protocol import default_blocks
from medprobe.protocols.segmentation.scratch import build_scratch
from medprobe.protocols.segmentation.train import GridSource, fit, predict
from medprobe.protocols.segmentation.volumes import from_slices, to_slices

TINY_SCRATCH = {"unet_width": 4, "vit_dim": 32, "vit_depth": 1, "vit_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the (timm) backbone's forward_tokens."""
    counter = {"n": 0}
    original = TimmBackbone.forward_tokens

    def counting(self, images, blocks=()):
        counter["n"] += 1
        return original(self, images, blocks)

    monkeypatch.setattr(TimmBackbone, "forward_tokens", counting)
    return counter


def make_ctx(tmp_path: Path, dataset, image_size: int = 28, batch_size: int = 16) -> UnitContext:
    """A unit context like the runner's: tiny random ViT, feature store under tmp_path/cache."""
    stores: dict = {}

    def backbone_fn():
        return create_backbone("dinov2_vits14", "random", tiny=True)

    def features_fn(needs):
        if needs not in stores:
            stores[needs] = extract_features(backbone_fn(), dataset, tmp_path / "cache", image_size=image_size,
                                             last_blocks=needs.last_blocks, patch_blocks=needs.patch_blocks,
                                             precision="fp32", batch_size=batch_size, progress=False).store
        return stores[needs]

    return UnitContext(dataset_name="ds", dataset=dataset, backbone_name="vit", backbone_config=None,
                       image_size=image_size, precision="fp32", batch_size=batch_size, bootstrap=20,
                       device=torch.device("cpu"), work_dir=tmp_path / "out" / "units" / "first",
                       features_fn=features_fn, backbone_fn=backbone_fn, plots_dir=tmp_path / "out" / "plots")


def run_protocol(ctx: UnitContext, seeds=(0,), **options) -> dict:
    """Run every unit of the protocol with ``options``; {variant: UnitResult} (last seed wins)."""
    proto = get_protocol("segmentation")
    opts = proto.parse_options(options, "protocols.segmentation")
    out = {}
    for unit in proto.units(opts, list(seeds), ctx.dataset):
        variant = proto.variant(unit.params)
        ctx.work_dir = ctx.work_dir.parent / f"{variant.replace(' ', '_')}_{unit.seed}"
        out[variant] = proto.run(unit, opts, ctx)
    return out


def metric(result, name: str, cls: str | None = None) -> float:
    return next(m.value for m in result.metrics if m.metric == name and m.cls == cls)


# --------------------------------------------------------------------------- decoders and baselines
@pytest.mark.parametrize("patch", [14, 16])
def test_decoder_shapes_any_patch_non_square_grid(patch):
    torch.manual_seed(0)
    dims, classes, (h, w) = [24, 32, 40, 48], 3, (3, 5)
    grids = [torch.randn(2, d, h, w) for d in dims]
    out_size = (h * patch, w * patch)
    for name in ("linear", "unet", "upernet", "vitdet"):
        dec = build_decoder(name, dims, classes, width=32)
        assert dec(grids, out_size).shape == (2, classes, *out_size), name
        assert count_trainable(dec) > 0
    assert count_trainable(build_decoder("linear", dims, classes)) == (48 + 1) * classes
    # a single image in training mode (batch norm statistics, 1x1 pyramid pooling) works too
    up = build_decoder("upernet", dims, classes, width=16).train()
    assert up([g[:1] for g in grids], out_size).shape == (1, classes, *out_size)


def test_scratch_models_any_input_size():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 72)  # not a multiple of 16
    for name in ("unet_scratch", "transunet_scratch"):
        model = build_scratch(name, 4, unet_width=4, vit_dim=32, vit_depth=1, vit_heads=2)
        assert model(x).shape == (2, 4, 40, 72), name
    assert count_trainable(build_scratch("unet_scratch", 2)) > 31_000_000  # the original 64-1024 U-Net


def test_default_blocks_evenly_spaced_ending_with_last():
    assert default_blocks(12) == [2, 5, 8, 11]
    assert default_blocks(24) == [5, 11, 17, 23]
    assert default_blocks(4) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- loss
def test_dice_ce_loss_hand_cases():
    target = torch.tensor([[[0, 1], [1, 1]]])
    uniform = torch.zeros(1, 2, 2, 2)  # p = 0.5 everywhere
    # CE = ln 2; Dice background = 2*0.5/(2+1) = 1/3, foreground = 2*1.5/(2+3) = 0.6
    expected = math.log(2) + 1 - (1 / 3 + 0.6) / 2
    assert DiceCELoss(2)(uniform, target).item() == pytest.approx(expected, abs=1e-4)
    # class weights [0, 1]: CE over foreground pixels only, Dice of the foreground only
    assert DiceCELoss(2, class_weights=[0, 1])(uniform, target).item() == pytest.approx(math.log(2) + 0.4, abs=1e-4)
    # a confident correct prediction costs (almost) nothing
    perfect = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 40
    assert DiceCELoss(2)(perfect, target).item() < 1e-4
    # pure CE equals torch's; a class absent from prediction and truth has Dice 1
    logits = torch.randn(3, 4, 5, 6)
    labels = torch.randint(0, 3, (3, 5, 6))
    ce = DiceCELoss(4, dice_weight=0)(logits, labels)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    probs = F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert soft_dice_per_class(probs, labels).tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- learning
def test_decoders_learn_an_easy_mask_from_grids():
    """Masks that threshold one grid channel: every decoder gets Dice far above chance.

    (The linear head is capped by its bilinear upsampling of blocky, patch-sized targets.)
    """
    g = torch.Generator().manual_seed(0)
    n, dims, (h, w), patch = 48, [8, 8, 8, 8], (4, 6), 4
    feats = torch.randn(n, 8, h, w, generator=g)
    labels = torch.zeros(n, h, w, dtype=torch.long)
    labels[feats[:, 0] > 0.5] = 1
    labels[feats[:, 0] < -1.0] = 2
    masks = labels.repeat_interleave(patch, 1).repeat_interleave(patch, 2).numpy().astype(np.uint8)
    grids = [feats.numpy().astype(np.float16)] * 4
    train, test = np.arange(36), np.arange(36, n)
    fg = [(masks[test] == c).mean() for c in (1, 2)]
    chance = np.mean([2 * p / (1 + p) for p in fg])  # Dice of painting the whole image with the class
    for name, lr, epochs, floor in (("linear", 0.3, 20, 0.6), ("unet", 1e-2, 10, 0.8), ("upernet", 1e-2, 10, 0.8),
                                    ("vitdet", 1e-2, 10, 0.8)):
        torch.manual_seed(0)
        dec = build_decoder(name, dims, 3, width=16)
        model = seg_protocol.FrozenSegmenter(dec, (h * patch, w * patch))
        fit(model, GridSource(grids, masks, train), None, DiceCELoss(3), epochs=epochs, lr=lr, weight_decay=0,
            batch_size=8, seed=0, device=torch.device("cpu"))
        pred = torch.cat([lo.argmax(1) for _, lo in predict(model, GridSource(grids, None, test), 16,
                                                              torch.device("cpu"))]).numpy()
        truth = masks[test]
        dice = np.mean([2 * ((pred == c) & (truth == c)).sum() / ((pred == c).sum() + (truth == c).sum())
                        for c in (1, 2)])
        assert dice > max(floor, chance + 0.3), (name, dice, chance)


def test_runner_end_to_end_2d_with_overlays(tmp_path):
    """Through the experiment runner: decoders and a scratch baseline on phantom chest X-rays."""
    cfg = {"name": "seg", "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "seeds": [0],
           "image_size": 56, "bootstrap": 20, "precision": "fp32", "batch_size": 16,
           "datasets": {"chest": {"adapter": "phantom", "n": 24, "size": 48, "task": "segmentation"}},
           "backbones": {"vit": {"name": "dinov2_vits14", "weights": "random", "tiny": True}},
           "protocols": {"segmentation": {"decoders": ["linear", "unet", "unet_scratch"], "epochs": 5,
                                          "overlays": 2, "scratch": TINY_SCRATCH}}}
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import run_experiment
    summary = run_experiment(load_experiment(path), progress=False, log=lambda s: None)
    assert summary.done == 3 and not summary.failed
    with sqlite3.connect(tmp_path / "run" / "results.db") as db:
        rows = db.execute("SELECT r.variant, m.metric, IFNULL(m.class, ''), m.value FROM runs r "
                          "JOIN metrics m ON m.run_key = r.key").fetchall()
    values = {(v, m, c): x for v, m, c, x in rows}
    for variant in ("linear", "unet", "unet_scratch"):
        for name in ("dice", "jaccard", "dice_jaccard_mean"):
            assert 0 <= values[(variant, name, "")] <= 1
        for name in ("dice", "jaccard"):
            assert 0 <= values[(variant, name, "lungs")] <= 1 and 0 <= values[(variant, name, "heart")] <= 1
        assert values[(variant, "dice_jaccard_mean", "")] == pytest.approx(
            (values[(variant, "dice", "")] + values[(variant, "jaccard", "")]) / 2, abs=1e-9)
    assert values[("linear", "trainable_params", "")] == (48 + 1) * 3
    assert values[("unet", "trainable_params", "")] > values[("linear", "trainable_params", "")]
    # the U-Net decoder learns the lungs/heart well above chance (whole image = class)
    ds = build_dataset("phantom", None, n=24, size=48, task="segmentation")
    truth = np.stack([ds.load_mask(i) for i in ds.indices("test")])
    chance = np.mean([2 * (truth == c).mean() / (1 + (truth == c).mean()) for c in (1, 2)])
    assert values[("unet", "dice", "")] > max(0.5, chance + 0.2)
    pngs = sorted((tmp_path / "run" / "plots").glob("segmentation_chest_vit_*.png"))
    assert len(pngs) == 2
    from PIL import Image
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.size[0] > 4 * im.size[1]  # image, truth and three decoders side by side
    saved = sorted(p.name for p in (tmp_path / "run" / "plots" / ".segmentation").rglob("*.npz"))
    assert saved == ["linear__seed0.npz", "unet__seed0.npz", "unet_scratch__seed0.npz"]


# --------------------------------------------------------------------------- cached grids
def test_cached_grids_backbone_not_run_per_epoch(tmp_path, calls):
    ds = build_dataset("phantom", None, n=20, size=28, task="segmentation")
    extraction_batches = sum(math.ceil(len(ds.indices(s)) / 16) for s in ds.splits())
    res = {}
    for epochs in (1, 3):
        calls["n"] = 0
        ctx = make_ctx(tmp_path / f"e{epochs}", ds)
        res[epochs] = run_protocol(ctx, decoders=["linear", "unet"], epochs=epochs, overlays=0)
        assert calls["n"] == extraction_batches  # one extraction pass for both decoders, whatever the epochs
        assert all(r.info["backbone_calls_in_training"] == 0 for r in res[epochs].values())
        assert res[epochs]["unet"].info["input"] == "cached patch grids (feature store)"
    # with augmentations on, the backbone runs on every training batch (under inference mode)
    calls["n"] = 0
    ctx = make_ctx(tmp_path / "aug", ds)
    aug = run_protocol(ctx, decoders=["linear"], epochs=2, augment=True, overlays=0)["linear aug"]
    steps = 2 * math.ceil(len(ds.indices("train")) / 8)
    assert aug.info["backbone_calls_in_training"] == steps
    assert calls["n"] >= steps


# --------------------------------------------------------------------------- 3D
def test_slices_reassemble_along_any_axis():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    for axis in range(3):
        slices = to_slices(vol, axis)
        assert slices.shape[0] == vol.shape[axis]
        np.testing.assert_array_equal(from_slices(list(slices), axis), vol)


class _Oracle(torch.nn.Module):
    """Returns its first input grid as logits: the test feeds one-hot true masks."""

    def forward(self, grids):
        return grids[0]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_predictions_reassembled_in_order_and_scored_per_volume(axis, monkeypatch):
    ds = build_dataset("phantom", None, n=6, size=16, ndim=3, task="segmentation")  # volumes (8, 16, 16)
    items = build_items(ds, "test", axis)
    geometry = Geometry(16)
    onehot = np.eye(3, dtype=np.float16)[input_masks(ds, items, geometry)].transpose(0, 3, 1, 2) * 20
    source = GridSource([onehot], None, np.arange(len(items)))
    scored = []
    original = seg_protocol.segmentation_metrics

    def spy(pred, target, *args, **kwargs):
        scored.append((pred.shape, target.shape))
        return original(pred, target, *args, **kwargs)

    monkeypatch.setattr(seg_protocol, "segmentation_metrics", spy)
    ctx = make_ctx(Path("/nonexistent"), ds, image_size=28)
    opts = seg_protocol.SegmentationOptions(slice_axis=axis, overlays=1)
    state = seg_protocol.SegState(None, None, geometry, [0, 1, 2, 3], 3)  # type: ignore[arg-type]
    per_case, pictures, _ = get_protocol("segmentation")._evaluate(_Oracle(), source, items, opts, ctx, state,
                                                                    overlay=True)
    n_test = len(ds.indices("test"))
    assert len(per_case) == n_test and len(scored) == n_test  # one score per volume, not per slice
    assert all(p == t == (8, 16, 16) for p, t in scored)
    assert all(m.value == 1.0 for case in per_case for m in case if m.metric == "dice")
    assert len(pictures) == 1 and pictures[0].image.ndim == 2


def test_3d_manifest_run_writes_nifti_with_original_affine(tmp_path):
    import nibabel as nib

    from medprobe.data.phantom import write_phantom_files
    csv = write_phantom_files(tmp_path / "data", n=8, size=16, fmt="nii")
    ds = build_dataset("manifest", csv, num_classes=3)
    ctx = make_ctx(tmp_path, ds, image_size=28)
    res = run_protocol(ctx, decoders=["linear"], epochs=1, write_nifti=True, overlays=1, hd95=True)["linear"]
    test = ds.indices("test")
    assert res.info["test_cases"] == len(test) and len(res.info["nifti"]) == len(test)
    for i, path in zip(test, res.info["nifti"]):
        original = nib.load(ds.records[i].image_path)
        written = nib.load(path)
        np.testing.assert_allclose(written.affine, original.affine)
        assert written.shape == original.shape
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    assert 0 <= metric(res, "dice") <= 1 and "hd95" in {m.metric for m in res.metrics}
    assert list((tmp_path / "out" / "plots").glob("segmentation_ds_vit_*slice*.png"))


def test_volume_axis_other_than_depth_uses_memory_grids(tmp_path, calls):
    ds = build_dataset("phantom", None, n=6, size=16, ndim=3, task="segmentation")
    ctx = make_ctx(tmp_path, ds, image_size=28)
    res = run_protocol(ctx, decoders=["unet"], epochs=1, slice_axis=2, overlays=0)["unet"]
    assert res.info["input"] == "cached patch grids (memory)"
    assert res.info["train_items"] == len(ds.indices("train")) * 16  # 16 slices along W per volume
    assert res.info["backbone_calls_in_training"] == 0


# --------------------------------------------------------------------------- few-shot and options
def test_fewshot_units_and_draws(tmp_path):
    ds = build_dataset("phantom", None, n=20, size=28, task="segmentation")
    proto = get_protocol("segmentation")
    opts = proto.parse_options({"decoders": ["linear", "unet"], "shots": [1, 3], "draws": 2}, "p")
    units = proto.units(opts, [0, 1], ds)
    assert len(units) == 2 * (2 + 2 * 2)
    assert {proto.variant(u.params) for u in units} == {"linear", "unet", "linear 1-shot", "linear 3-shot",
                                                         "unet 1-shot", "unet 3-shot"}
    ctx = make_ctx(tmp_path, ds)
    res = run_protocol(ctx, decoders=["linear", "unet"], shots=[3], draws=1, full_data=False, epochs=1, overlays=0)
    a, b = res["linear 3-shot"], res["unet 3-shot"]
    assert a.info["train_cases"] == 3 and a.info["train_keys"] == b.info["train_keys"]  # same draw for each decoder


def test_option_errors_name_the_key():
    proto = get_protocol("segmentation")
    with pytest.raises(ConfigError, match="decoders"):
        proto.parse_options({"decoders": ["unett"]}, "protocols.segmentation")
    with pytest.raises(ConfigError, match="blocks"):
        proto.parse_options({"blocks": [1, 2]}, "protocols.segmentation")
    ds = build_dataset("phantom", None, n=12, size=16, task="segmentation")
    with pytest.raises(ConfigError, match=r"class_weights: 2 weights for the 3 classes"):
        proto.units(proto.parse_options({"class_weights": [1, 2]}, "p"), [0], ds)
    with pytest.raises(ConfigError, match="shots"):
        proto.units(proto.parse_options({"shots": [500]}, "p"), [0], ds)
    assert proto.supports(build_dataset("phantom", None, n=12, size=16)) is not None  # classification: skipped


# --------------------------------------------------------------------------- bad input
def _manifest_with_bad_mask(tmp_path: Path, kind: str):
    from PIL import Image

    from medprobe.data.phantom import write_phantom_files
    csv = write_phantom_files(tmp_path / kind, n=8, size=16, fmt="nii" if kind == "2d_for_3d" else "png")
    rows = csv.read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    mask = csv.parent / first[header.index("mask")]
    if kind == "shape":
        Image.fromarray(np.zeros((12, 16), np.uint8)).save(mask)
    elif kind == "values":
        Image.fromarray(np.full((16, 16), 7, np.uint8)).save(mask)
    else:
        png = mask.with_name("flat.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
        csv.write_text(csv.read_text().replace(first[header.index("mask")], f"masks/{png.name}"))
        mask = png
    return csv, mask


@pytest.mark.parametrize("kind", ["shape", "values", "2d_for_3d"])
def test_bad_masks_surface_naming_the_file(tmp_path, kind):
    csv, mask = _manifest_with_bad_mask(tmp_path, kind)
    ds = build_dataset("manifest", csv, num_classes=3)
    ctx = make_ctx(tmp_path, ds, image_size=28)
    with pytest.raises(DataError, match=re.escape(mask.name)):
        run_protocol(ctx, decoders=["linear"], epochs=1, overlays=0)


# --------------------------------------------------------------------------- real data
def test_mni152_slice_dataset(shared_data):
    """The benchmark's dataset: grey-matter masks of axial MNI152 slices, split in separated slabs."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mni152_segmentation.py"
    spec = importlib.util.spec_from_file_location("mni152_segmentation", path)
    bench = importlib.util.module_from_spec(spec)
    from medprobe.data import adapters
    try:
        spec.loader.exec_module(bench)  # type: ignore[union-attr]  (registers the mni152_slices adapter)
        ds = build_dataset("mni152_slices", shared_data / "mni152", step=4)
    finally:
        adapters._REGISTRY.pop("mni152_slices", None)  # leave the global registry as it was
    assert ds.task.class_names == ("background", "grey_matter")
    z = {s: np.array([r.metadata["z"] for r in ds.records if r.split == s]) for s in ("train", "val", "test")}
    assert all(len(v) for v in z.values())
    for a in z:  # neighbouring slices never straddle two splits
        for b in z:
            if a != b:
                assert np.abs(z[a][:, None] - z[b][None, :]).min() > 1
    mask = ds.load_mask(int(ds.indices("test")[0]))
    assert mask.shape == ds.load_image(int(ds.indices("test")[0])).shape and set(np.unique(mask)) <= {0, 1}
