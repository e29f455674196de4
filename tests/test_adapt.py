"""Adaptation protocols: one training loop, parameter accounting, records, 3D volumes, bad input."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medprobe.backbones import create_backbone
from medprobe.data.adapters import build_dataset
from medprobe.data.base import ArrayDataset, Record, TaskSpec
from medprobe.errors import ConfigError
from medprobe.backbones.ref import BackboneRef
from medprobe.protocols.adapt import training
from medprobe.protocols.adapt.augment import AugmentSpec, Augmenter
from medprobe.protocols.adapt.data import Batch, EmbeddingSource, ImageSource
from medprobe.protocols.adapt.models import Classifier, SlicePooling, count_params, layer_ids, small_input_stem
from medprobe.protocols.adapt.peft import DEFAULT_LORA_TARGETS
from medprobe.protocols.base import UnitContext, get_protocol

RECORDS = {"trainable_params", "trainable_pct", "train_wall_s", "inference_ms_per_sample", "peak_memory_mb",
           "epochs_to_best"}


@pytest.fixture(scope="module")
def phantom():
    return build_dataset("phantom", None, n=32, size=32, seed=0)


def make_ctx(dataset, backbone: str, tmp_path: Path, image_size: int = 28, precision: str = "fp32",
             features_fn=None) -> UnitContext:
    bc = BackboneRef(name=backbone, weights="random", tiny=True)
    return UnitContext(dataset_name="d", dataset=dataset, backbone_name=backbone, backbone_config=bc,
                       image_size=image_size, precision=precision, batch_size=16, bootstrap=0,
                       device=torch.device("cpu"), work_dir=tmp_path / "unit", features_fn=features_fn,
                       backbone_fn=lambda: create_backbone(backbone, "random", tiny=True), memo={})


def run_protocol(name: str, raw: dict, ctx: UnitContext, unit_index: int = 0):
    proto = get_protocol(name)
    options = proto.parse_options(raw, f"protocols.{name}")
    unit = proto.units(options, [0], ctx.dataset)[unit_index]
    return proto, options, unit, proto.run(unit, options, ctx)


def values(result) -> dict[str, float]:
    return {m.metric: m.value for m in result.metrics if m.cls is None}


def built(name: str, raw: dict, ctx: UnitContext, unit_index: int = 0):
    proto = get_protocol(name)
    options = proto.parse_options(raw, f"protocols.{name}")
    unit = proto.units(options, [0], ctx.dataset)[unit_index]
    return proto.build(unit, options, ctx)


# --------------------------------------------------------------------------- every protocol through run()
CASES = [
    ("finetune", {"epochs": 2, "layer_decay": 0.75}, "dinov2_vits14", 28),
    ("lora", {"epochs": 1, "r": 4}, "dinov2_vits14", 28),
    ("bitfit", {"epochs": 1}, "deit_s16", 32),
    ("deit_head", {"epochs": 1, "classifier": "deit_s16", "classifier_weights": "random", "foundation": ["unfrozen"]},
     "dinov2_vits14", 28),
    ("freeze_blocks", {"epochs": 1, "k": [2]}, "resnet18", 32),
    ("first_blocks", {"epochs": 1, "k": [2], "head": "deit", "classifier": "deit_s16", "classifier_weights": "random",
                      "foundation": ["frozen"]}, "dinov2_vits14", 28),
    ("scratch", {"epochs": 1, "augment": []}, "resnet18", 28),
]


@pytest.mark.parametrize("name,raw,backbone,size", CASES, ids=[c[0] for c in CASES])
def test_protocol_runs_and_records_costs(name, raw, backbone, size, phantom, tmp_path):
    proto, _, unit, res = run_protocol(name, raw, make_ctx(phantom, backbone, tmp_path, size))
    v = values(res)
    assert RECORDS <= set(v), f"missing records: {RECORDS - set(v)}"
    assert {"auroc", "accuracy"} <= set(v)
    assert 0 <= v["auroc"] <= 1
    assert 0 < v["trainable_pct"] <= 100 and v["trainable_params"] == res.info["trainable_params"]
    assert v["train_wall_s"] > 0 and v["inference_ms_per_sample"] > 0 and v["peak_memory_mb"] > 0
    assert 1 <= v["epochs_to_best"] <= raw["epochs"]
    assert res.info["test_samples"] == len(phantom.indices("test"))
    assert proto.variant(unit.params).startswith(name)


def test_runs_are_deterministic(phantom, tmp_path):
    a = values(run_protocol("finetune", {"epochs": 1}, make_ctx(phantom, "dinov2_vits14", tmp_path))[3])
    b = values(run_protocol("finetune", {"epochs": 1}, make_ctx(phantom, "dinov2_vits14", tmp_path))[3])
    assert a["auroc"] == b["auroc"] and a["accuracy"] == b["accuracy"]


def test_bf16_autocast_trains(phantom, tmp_path):
    res = run_protocol("bitfit", {"epochs": 1, "augment": ["hflip"]},
                       make_ctx(phantom, "dinov2_vits14", tmp_path, precision="bf16"))[3]
    assert res.info["precision"] == "bf16" and np.isfinite(values(res)["auroc"])


# --------------------------------------------------------------------------- parameter accounting
def test_bitfit_trains_biases_and_head_only(phantom, tmp_path):
    model, bb, _ = built("bitfit", {}, make_ctx(phantom, "deit_s16", tmp_path))
    biases = sum(p.numel() for n, p in bb.named_parameters() if n.endswith(".bias"))
    head = sum(p.numel() for p in model.head.parameters())
    assert count_params(model) == (biases + head, sum(p.numel() for p in model.parameters()))
    assert all(p.requires_grad == n.endswith(".bias") for n, p in bb.named_parameters())


def test_lora_count_matches_peft(phantom, tmp_path):
    from peft import LoraConfig, get_peft_model
    model, bb, info = built("lora", {"r": 4, "alpha": 8}, make_ctx(phantom, "dinov2_vits14", tmp_path))
    head = sum(p.numel() for p in model.head.parameters())
    reference = create_backbone("dinov2_vits14", "random", tiny=True).model
    names = [n for n, _ in reference.named_modules() if n.startswith("blocks.") and n.split(".")[-1] in DEFAULT_LORA_TARGETS]
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    peft_trainable, _ = peft_model.get_nb_trainable_parameters()
    assert count_params(model)[0] == peft_trainable + head
    assert info["lora_modules"] == 4 * 4 and info["lora_targets"] == sorted(DEFAULT_LORA_TARGETS)
    # r * (in + out) per adapted layer of the 4-block, width-48 tiny ViT (mlp 192)
    assert peft_trainable == 4 * 4 * ((48 + 144) + (48 + 48) + (48 + 192) + (192 + 48))


def test_lora_on_cnn_lists_module_names_before_training(phantom, tmp_path):
    ctx = make_ctx(phantom, "resnet18", tmp_path)
    with pytest.raises(ConfigError) as err:
        run_protocol("lora", {"epochs": 1}, ctx)
    msg = str(err.value)
    assert "qkv" in msg and "resnet18" in msg and "conv1 (Conv2d)" in msg and "conv2 (Conv2d)" in msg
    with pytest.raises(ConfigError, match="qkvv.*named: .*qkv \\(Linear\\)"):
        run_protocol("lora", {"epochs": 1, "targets": ["qkvv"]}, make_ctx(phantom, "dinov2_vits14", tmp_path))


@pytest.mark.parametrize("backbone,k", [("deit_s16", 2), ("deit_s16", 0), ("resnet18", 3)])
def test_freeze_blocks_freezes_exactly_first_k(backbone, k, phantom, tmp_path):
    model, bb, _ = built("freeze_blocks", {"k": [k]}, make_ctx(phantom, backbone, tmp_path, 32))
    blocks = bb.block_modules()
    for i, block in enumerate(blocks):
        flags = {p.requires_grad for p in block.parameters()}
        assert flags <= {i >= k}, f"block {i}: requires_grad {flags} with k={k}"
    stem = [p for n, p in bb.named_parameters() if layer_ids(bb)[n] == 0]
    assert stem and all(p.requires_grad == (k == 0) for p in stem)
    assert all(p.requires_grad for p in model.head.parameters())
    if backbone == "deit_s16":
        assert all(p.requires_grad for p in bb.model.norm.parameters())


def test_freeze_and_first_blocks_reject_too_many_blocks(phantom, tmp_path):
    with pytest.raises(ConfigError, match="k: 9 blocks .* has 4 blocks"):
        built("freeze_blocks", {"k": [9]}, make_ctx(phantom, "deit_s16", tmp_path, 32))
    model, bb, _ = built("first_blocks", {"k": [2], "foundation": ["unfrozen"]},
                         make_ctx(phantom, "dinov2_vits14", tmp_path))
    assert bb.num_blocks == 2 and len(bb.block_modules()) == 2
    assert all(p.requires_grad for p in bb.parameters())


def test_layer_decay_and_backbone_lr_groups(phantom, tmp_path):
    model, bb, _ = built("finetune", {}, make_ctx(phantom, "deit_s16", tmp_path, 32))
    cfg = training.TrainConfig(lr=1.0, backbone_lr=0.1, layer_decay=0.5, weight_decay=0.05)
    groups, counts = training.param_groups(model, cfg)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    L = bb.num_blocks
    assert lr_of[id(model.head.weight)] == 1.0
    assert lr_of[id(bb.model.blocks[L - 1].mlp.fc1.weight)] == pytest.approx(0.1 * 0.5)
    assert lr_of[id(bb.model.blocks[0].mlp.fc1.weight)] == pytest.approx(0.1 * 0.5 ** L)
    assert lr_of[id(bb.model.patch_embed.proj.weight)] == pytest.approx(0.1 * 0.5 ** (L + 1))
    assert lr_of[id(bb.model.norm.weight)] == pytest.approx(0.1)
    assert wd_of[id(bb.model.blocks[0].mlp.fc1.bias)] == 0 and wd_of[id(bb.model.blocks[0].mlp.fc1.weight)] == 0.05
    assert counts["backbone"] + counts["new"] == count_params(model)[0]


def test_scratch_small_input_stem():
    bb = create_backbone("resnet18", "random", tiny=True)
    assert "3x3" in small_input_stem(bb)
    assert bb.model.conv1.kernel_size == (3, 3) and bb.model.conv1.stride == (1, 1)
    assert bb.forward_tokens(torch.zeros(2, 3, 28, 28)).patch_grid.shape[-2:] == (4, 4)
    dn = create_backbone("densenet121", "random", tiny=True)
    small_input_stem(dn)
    assert dn.forward_tokens(torch.zeros(2, 3, 28, 28)).patch_grid.shape[-1] == 3


# --------------------------------------------------------------------------- the loop: selection, early stop
def _toy_sources(n: int = 48, dim: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    owner = np.arange(n)  # one "slice" per volume
    return EmbeddingSource(x[:32], owner[:32], y[:32], "binary"), EmbeddingSource(x[32:], owner[:16], y[32:], "binary")


def test_early_stopping_restores_the_best_state(monkeypatch):
    torch.manual_seed(0)
    train, val = _toy_sources()
    model = Classifier(None, 6, 2)
    snapshots = []

    def falling_score(labels, scores, loss, task, metric):  # validation gets worse after the first epoch
        snapshots.append(model.head.weight.detach().clone())
        return -float(len(snapshots))

    monkeypatch.setattr(training, "selection_score", falling_score)
    cfg = training.TrainConfig(epochs=20, lr=0.1, batch_size=8, patience=2, warmup_epochs=0, seed=0)
    result = training.fit(model, train, val, cfg, "binary")
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    assert len(snapshots) == 3 and not torch.equal(snapshots[0], snapshots[2])
    assert torch.equal(model.head.weight, snapshots[0])


def test_no_early_stop_runs_all_epochs_and_warmup_cosine():
    train, val = _toy_sources()
    model = Classifier(None, 6, 2)
    cfg = training.TrainConfig(epochs=3, lr=0.05, batch_size=8, patience=None, warmup_epochs=1, seed=0)
    result = training.fit(model, train, val, cfg, "binary")
    assert not result.stopped_early and result.epochs_run == 3 and len(result.history) == 3
    assert [training.lr_factor(s, 12, 4, "cosine") for s in (0, 3)] == [0.25, 1.0]
    assert training.lr_factor(11, 12, 4, "cosine") < 0.05 and training.lr_factor(6, 12, 0, "step") == 0.1


# --------------------------------------------------------------------------- 3D volumes
def test_pooling_ignores_other_volumes_no_padding():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(7, 5) * 10
    x = torch.cat([a, b])
    owners = torch.tensor([0] * 3 + [1] * 7)
    for kind in ("mean", "max", "attention"):
        pool = SlicePooling(kind, 5)
        both = pool(x, owners, 2)
        alone = pool(a, torch.zeros(3, dtype=torch.long), 1)
        torch.testing.assert_close(both[0], alone[0])
    torch.testing.assert_close(SlicePooling("mean", 5)(x, owners, 2)[0], a.mean(0))
    torch.testing.assert_close(SlicePooling("max", 5)(x, owners, 2)[1], b.max(0).values)
    w = SlicePooling("attention", 5).weights(x, owners, 2)
    torch.testing.assert_close(torch.stack([w[:3].sum(), w[3:].sum()]), torch.ones(2))


def _volumes(n: int = 24, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images, records = [], []
    for i in range(n):
        depth = 3 + i % 6  # 3..8 slices
        vol = rng.normal(0.3, 0.05, size=(depth, 24, 24)).astype(np.float32)
        label = i % 2
        if label:
            vol[depth // 2, 8:16, 8:16] += 0.6
        split = "train" if i < 14 else "val" if i < 19 else "test"
        images.append(np.clip(vol, 0, 1))
        records.append(Record(f"v{i}", split, f"p{i}", label))
    ds = ArrayDataset(images, records, TaskSpec("binary", ("no", "yes")), name="vols", ndim=3)
    ds.value_range = (0.0, 1.0)
    return ds


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_finetune_on_volumes_of_different_depth(pooling, tmp_path):
    ds = _volumes()
    ctx = make_ctx(ds, "dinov2_vits14", tmp_path)
    proto, options, unit, res = run_protocol("finetune", {"epochs": 1, "pooling": pooling, "volume_batch_size": 3}, ctx)
    assert res.info["volumetric"] and res.info["pooling"] == pooling and res.info["test_samples"] == 5
    assert RECORDS <= set(values(res))
    # a volume's logits do not depend on the other volumes in its batch (no padding leaks in)
    model, _, _ = proto.build(unit, options, ctx)
    model.eval()
    big, small = torch.randn(7, 3, 28, 28), torch.randn(3, 3, 28, 28)
    y = torch.zeros(2, dtype=torch.long)
    together = model(Batch(torch.cat([small, big]), y, torch.tensor([0] * 3 + [1] * 7)))
    alone = model(Batch(small, y[:1], torch.zeros(3, dtype=torch.long)))
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- augmentation
def test_augmentations_deterministic_in_range_and_shared_within_volume():
    x = torch.rand(6, 1, 16, 16)
    aug = Augmenter(AugmentSpec())
    out1 = aug(x, torch.Generator().manual_seed(3))
    out2 = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(out1, out2) and out1.shape == x.shape and 0 <= out1.min() and out1.max() <= 1
    flip = Augmenter(AugmentSpec(names=("hflip",)))
    same = torch.rand(1, 1, 8, 8).expand(4, -1, -1, -1)
    out = flip(same, torch.Generator().manual_seed(0), groups=torch.tensor([0, 0, 1, 1]))
    for row in out:
        assert torch.allclose(row, same[0], atol=1e-5) or torch.allclose(row, same[0].flip(-1), atol=1e-5)
    assert torch.equal(out[0], out[1]) and torch.equal(out[2], out[3])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,raw,pattern", [
    ("finetune", {"lr": 0}, r"protocols\.finetune: lr: every learning rate must be > 0, got \[0"),
    ("finetune", {"backbone_lr": -1e-4}, r"backbone_lr: the learning rate must be > 0"),
    ("lora", {"epochs": 0}, r"protocols\.lora: epochs: must be >= 1, got 0"),
    ("bitfit", {"augment": ["hflip", "rotat"]}, r"augment\[1\]: unknown augmentation 'rotat'.*Available: affine"),
    ("scratch", {"augment": "flip"}, r"Did you mean 'hflip'"),
    ("finetune", {"crop_scale": [0.5, 1.5]}, r"crop_scale"),
    ("freeze_blocks", {}, r"k: give at least one number of blocks"),
    ("first_blocks", {"k": [0]}, r"keep at least 1 block"),
    ("deit_head", {"foundation": ["thawed"]}, r"foundation\[0\]: unknown value 'thawed'. Available: frozen, unfrozen"),
    ("finetune", {"epochz": 3}, r"unknown key 'epochz'.*Did you mean 'epochs'"),
])
def test_bad_options_fail_before_training(name, raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        get_protocol(name).parse_options(raw, f"protocols.{name}")


# --------------------------------------------------------------------------- through the runner
def test_runner_records_adaptation_and_volume_probe(tmp_path):
    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import plan_experiment, run_experiment
    cfg = {
        "name": "adapt", "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "seeds": [0],
        "image_size": 28, "bootstrap": 0, "precision": "fp32", "batch_size": 16,
        "datasets": {"ph3d": {"adapter": "phantom", "n": 20, "size": 16, "seed": 0, "ndim": 3}},
        "backbones": {"vit": {"name": "dinov2_vits14", "weights": "random", "tiny": True}},
        "protocols": {"volume_probe": {"pooling": ["max", "attention"], "epochs": 3},
                      "bitfit": {"epochs": 1, "augment": []}},
    }
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_experiment(path)
    plan = plan_experiment(config)
    assert sorted(u.variant for u in plan.units) == ["bitfit", "volume_probe attention", "volume_probe max"]
    summary = run_experiment(config, progress=False, log=lambda s: None, plan=plan)
    assert summary.done == 3 and not summary.failed
    with sqlite3.connect(config.output_path / "results.db") as c:
        rows = c.execute("SELECT r.variant, m.metric, m.value FROM metrics m JOIN runs r ON r.key = m.run_key "
                         "WHERE m.class IS NULL").fetchall()
    by_variant: dict[str, dict[str, float]] = {}
    for variant, metric, value in rows:
        by_variant.setdefault(variant, {})[metric] = value
    for variant, metrics in by_variant.items():
        assert RECORDS | {"auroc"} <= set(metrics), variant
    assert by_variant["volume_probe max"]["trainable_params"] == 48 * 2 + 2
    assert by_variant["volume_probe attention"]["trainable_params"] > by_variant["volume_probe max"]["trainable_params"]
    assert by_variant["bitfit"]["trainable_pct"] < 10


def test_streamed_images_match_cached(phantom):
    from medprobe.data.preprocess import Preprocessor
    from medprobe.backbones.registry import IMAGENET
    pre = Preprocessor(IMAGENET, 28, (0.0, 1.0))
    idx = phantom.indices("train")
    cached, streamed = ImageSource(phantom, idx, pre), ImageSource(phantom, idx, pre, cache_mb=0)
    assert cached.in_memory and not streamed.in_memory
    a = list(cached.batches(8, shuffle=True, generator=torch.Generator().manual_seed(1)))
    b = list(streamed.batches(8, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert len(a) == len(b) == -(-len(idx) // 8)
    for x, y in zip(a, b):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
    reference = pre([phantom.load_image(int(i)) for i in idx[:8]])  # the frozen path's preprocessing
    torch.testing.assert_close(next(cached.batches(8)).inputs, reference, atol=2e-3, rtol=0)


def test_class_weighting_balances_classes():
    w = training.balanced_weights(np.array([0, 1, 1, 1]), "binary", 2)
    torch.testing.assert_close(w, torch.tensor([2.0, 2 / 3]))
    assert float(w[0]) * 1 == pytest.approx(float(w[1]) * 3)  # each class weighs the same in total
    pos = training.balanced_weights(np.array([[1, 0], [0, 0], [1, 1], [0, 0]]), "multilabel", 2)
    torch.testing.assert_close(pos, torch.tensor([1.0, 3.0]))
    loss = training.loss_fn("binary", w)(torch.zeros(4, 2), torch.tensor([0, 1, 1, 1]))
    assert float(loss) == pytest.approx(np.log(2))
