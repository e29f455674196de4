"""Training across processes (DDP over gloo on CPU), gradient accumulation, activation checkpointing.

The reference is always a plain single-process run of the same loop: two processes sharing
every batch must end with the same weights (fp32, max abs diff 1e-5), the same chosen epoch and
the same test metrics; ``grad_accum=2`` at batch ``b`` must equal batch ``2b``; checkpointed
backbones must give the same gradients while recomputing their blocks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medprobe.backbones import create_backbone
from medprobe.backbones.ref import BackboneRef
from medprobe.data.adapters import build_dataset
from medprobe.distributed import shard_bounds, spawn_local, split_micro
from medprobe.features.extract import preprocessor_for
from medprobe.protocols.adapt import protocols as adapt_protocols
from medprobe.protocols.adapt import training
from medprobe.protocols.base import UnitContext, get_protocol
from medprobe.protocols.checkpointing import enable_activation_checkpointing
from medprobe.protocols.segmentation import train as seg_train
from medprobe.protocols.segmentation.decoders import build_decoder
from medprobe.protocols.segmentation.losses import DiceCELoss

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5
BACKBONE = "dinov2_vits14"


# --------------------------------------------------------------------------- shared set-ups (run in every process)
def _ctx(work: Path) -> UnitContext:
    ds = build_dataset("phantom", None, n=32, size=32, seed=0)
    ref = BackboneRef(name=BACKBONE, weights="random", tiny=True)
    return UnitContext(dataset_name="d", dataset=ds, backbone_name=BACKBONE, backbone_config=ref, image_size=28,
                       precision="fp32", batch_size=16, bootstrap=0, device=torch.device("cpu"), work_dir=work,
                       features_fn=None, backbone_fn=lambda: create_backbone(BACKBONE, "random", tiny=True), memo={})


def _finetune(batch_size: int, grad_accum: int, work: Path, class_weighting: bool = False):
    """A fine-tuned tiny ViT (no augmentation, no dropout): its trainable state, fit result and test scores."""
    ctx = _ctx(work)
    proto = get_protocol("finetune")
    options = proto.parse_options({"epochs": 2, "augment": []}, "protocols.finetune")
    unit = proto.units(options, [0], ctx.dataset)[0]
    torch.manual_seed(0)
    model, backbone, _ = proto.build(unit, options, ctx)
    sources, _ = adapt_protocols._image_sources(ctx, preprocessor_for(backbone, ctx.dataset, 28), 0)
    weights = training.balanced_weights(sources["train"].labels, "binary", 2) if class_weighting else None
    cfg = training.TrainConfig(epochs=2, lr=1e-3, backbone_lr=3e-4, batch_size=batch_size, eval_batch_size=7,
                               patience=None, warmup_epochs=0.5, seed=0, grad_accum=grad_accum,
                               class_weights=weights)
    result = training.fit(model, sources["train"], sources["val"], cfg, "binary")
    scores = training.predict(model, sources["test"], cfg, "binary")[0]
    return training.trainable_state(model), result, scores


def _seg_data():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(15, 8, 4, 4, generator=g)
    labels = torch.zeros(15, 4, 4, dtype=torch.long)
    labels[feats[:, 0] > 0.5] = 1
    labels[feats[:, 0] < -1.0] = 2
    masks = labels.repeat_interleave(2, 1).repeat_interleave(2, 2).numpy().astype(np.uint8)
    grids = [feats.numpy().astype(np.float32)]
    return (seg_train.GridSource(grids, masks, np.arange(9)), seg_train.GridSource(grids, masks, np.arange(9, 15)))


def _segment(batch_size: int, grad_accum: int, loss: torch.nn.Module | None = None, decoder: str = "linear"):
    """A decoder trained on random grids (9 training items: the last micro-batch is smaller than the others)."""
    train, val = _seg_data()
    torch.manual_seed(0)
    model = seg_train.FrozenSegmenter(build_decoder(decoder, [8] * 4, 3, width=8), (8, 8))
    res = seg_train.fit(model, train, val, loss or DiceCELoss(3, class_weights=[0.5, 1.0, 2.0]), epochs=3, lr=0.05,
                        weight_decay=0.01, batch_size=batch_size, seed=0, device=torch.device("cpu"),
                        grad_accum=grad_accum)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, res


def _lora_metrics(work: Path) -> dict[str, float]:
    ctx = _ctx(work)
    proto = get_protocol("lora")
    options = proto.parse_options({"epochs": 1, "r": 4, "dropout": 0.0, "augment": [], "batch_size": 8},
                                  "protocols.lora")
    unit = proto.units(options, [0], ctx.dataset)[0]
    res = proto.run(unit, options, ctx)
    keep = {"auroc", "accuracy", "val_score", "epochs_to_best", "trainable_params"}
    return {m.metric: m.value for m in res.metrics if m.cls is None and m.metric in keep}


def _distributed_scenarios(out: str) -> None:
    """Run in each of two processes; every rank saves what it ended with."""
    rank = torch.distributed.get_rank()
    work = Path(out) / f"work{rank}"
    found = {
        "finetune_accum": _finetune(4, 2, work, class_weighting=True),
        "segment": _segment(4, 1),
        "segment_accum": _segment(2, 2),
        "lora": _lora_metrics(work),
    }
    torch.save(found, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn_local(_distributed_scenarios, 2, str(out), threads=1)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# --------------------------------------------------------------------------- two processes = one process
def test_two_processes_finetune_like_one(two_processes, tmp_path):
    """2 processes x grad_accum 2 x batch 4 (class-weighted loss) = 1 process x batch 8: same weights,
    the same validation curve and chosen step, the same test scores."""
    state, result, scores = _finetune(8, 1, tmp_path, class_weighting=True)
    for rank in two_processes:
        d_state, d_result, d_scores = rank["finetune_accum"]
        assert _max_diff(state, d_state) < TOL
        assert d_result.best_step == result.best_step and d_result.steps == result.steps
        assert np.allclose([h["val_score"] for h in d_result.history], [h["val_score"] for h in result.history],
                           atol=TOL)
        assert np.allclose([h["train_loss"] for h in d_result.history],
                           [h["train_loss"] for h in result.history], atol=TOL)
        assert d_scores.shape == scores.shape and np.abs(d_scores - scores).max() < TOL
    # the two processes hold the same weights
    assert _max_diff(two_processes[0]["finetune_accum"][0], two_processes[1]["finetune_accum"][0]) == 0.0


def test_two_processes_segmentation_like_one(two_processes):
    """Batch Dice is computed over the whole micro-batch (statistics summed over the processes);
    the last micro-batch (1 item) is taken whole by both processes."""
    for key, (batch, accum) in {"segment": (4, 1), "segment_accum": (2, 2)}.items():
        state, result = _segment(batch, accum)
        for rank in two_processes:
            d_state, d_result = rank[key]
            assert _max_diff(state, d_state) < TOL, key
            assert d_result.best_epoch == result.best_epoch and d_result.steps == result.steps
            assert np.allclose([h["val_loss"] for h in d_result.history], [h["val_loss"] for h in result.history],
                               atol=TOL)
            assert np.allclose([h["train_loss"] for h in d_result.history],
                               [h["train_loss"] for h in result.history], atol=TOL)


def test_two_processes_lora_protocol_same_test_metrics(two_processes, tmp_path):
    single = _lora_metrics(tmp_path)
    for rank in two_processes:
        assert rank["lora"].keys() == single.keys() and {"auroc", "accuracy"} <= single.keys()
        for k, v in single.items():
            assert abs(rank["lora"][k] - v) < TOL, (k, rank["lora"][k], v)


# --------------------------------------------------------------------------- gradient accumulation (one process)
def test_grad_accum_equals_the_bigger_batch(tmp_path):
    state, result, scores = _finetune(8, 1, tmp_path / "a", class_weighting=True)
    a_state, a_result, a_scores = _finetune(4, 2, tmp_path / "b", class_weighting=True)
    assert a_result.steps == result.steps
    assert _max_diff(state, a_state) < TOL and np.abs(a_scores - scores).max() < TOL
    # and it is not a check that cannot fail: batch 4 without accumulation trains differently
    small_state = _finetune(4, 1, tmp_path / "c", class_weighting=True)[0]
    assert _max_diff(state, small_state) > 1e-3


def test_segmentation_grad_accum_equals_the_bigger_batch():
    """Cross-entropy is a per-sample mean: 2 micro-batches of 4 = one batch of 8 (here 9 items: 8 + 1)."""
    ce = DiceCELoss(3, dice_weight=0.0)
    big = _segment(8, 1, ce)[0]
    accum = _segment(4, 2, ce)[0]
    assert _max_diff(big, accum) < TOL
    assert _max_diff(big, _segment(4, 1, ce)[0]) > 1e-3


def test_dice_ce_from_statistics_equals_forward():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(5, 3, 6, 6, generator=g), torch.randint(0, 3, (5, 6, 6), generator=g)
    for loss in (DiceCELoss(3), DiceCELoss(3, class_weights=[0.2, 1.0, 3.0], dice_background=False),
                 DiceCELoss(3, ce_weight=0.0)):
        whole = loss.from_statistics(loss.statistics(logits, target))
        parts = loss.from_statistics(loss.statistics(logits[:2], target[:2]) + loss.statistics(logits[2:], target[2:]))
        assert torch.allclose(whole, loss(logits, target), atol=1e-6)
        assert torch.allclose(parts, whole, atol=1e-6)


def test_micro_batches_cover_the_batch_once():
    rows = np.arange(10)
    parts = [split_micro(rows, 3, r, lambda x: len(x) / 10) for r in range(3)]
    assert np.array_equal(np.concatenate([p.rows for p in parts]), rows)
    assert sum(p.loss_share for p in parts) == pytest.approx(1.0)
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    tiny = [split_micro(np.arange(1), 2, r, lambda x: 1.0) for r in range(2)]  # fewer samples than processes
    assert all(len(p.rows) == 1 and p.grad_scale == 1.0 and p.loss_share == 0.5 for p in tiny)


def test_grad_accum_option_validated_and_in_the_unit_key():
    from medprobe.errors import ConfigError
    proto = get_protocol("finetune")
    with pytest.raises(ConfigError, match="grad_accum"):
        proto.parse_options({"grad_accum": 0}, "protocols.finetune")
    a = proto.unit_options(proto.parse_options({}, "p"), proto.units(proto.parse_options({}, "p"), [0], None)[0])
    assert "grad_accum" in a and "activation_checkpointing" in a


# --------------------------------------------------------------------------- activation checkpointing
def _grads_and_block_calls(name: str, checkpointing: bool, size: int):
    torch.manual_seed(0)
    bb = create_backbone(name, "random", tiny=True)
    how = enable_activation_checkpointing(bb) if checkpointing else None
    bb.train()
    calls = []
    block = bb.block_modules()[-1]  # its first layer runs again when the backward pass recomputes the block
    first = next(m for m in block.modules() if not list(m.children()) and list(m.parameters(recurse=False)))
    first.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = bb.forward_tokens(x)
    (out.cls.square().sum() + out.patch_grid.mean()).backward()
    grads = {n: p.grad.detach().clone() for n, p in bb.named_parameters() if p.grad is not None}
    return grads, len(calls), how


@pytest.mark.parametrize("name,size", [("dinov2_vits14", 28), ("rad_dino", 28), ("clip_vitl14", 28), ("resnet18", 32)])
def test_activation_checkpointing_same_gradients_blocks_recomputed(name, size):
    plain, plain_calls, _ = _grads_and_block_calls(name, False, size)
    ckpt, ckpt_calls, how = _grads_and_block_calls(name, True, size)
    assert how and plain_calls == 1
    assert ckpt_calls == 2, f"{name}: the block was not recomputed in the backward pass ({how})"
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    assert max(float((plain[k] - ckpt[k]).abs().max()) for k in plain) < 1e-6


def test_activation_checkpointing_in_a_protocol_run(tmp_path):
    ctx = _ctx(tmp_path)
    proto = get_protocol("lora")
    raw = {"epochs": 1, "r": 4, "dropout": 0.0, "augment": []}
    ref = proto.run(proto.units(proto.parse_options(raw, "p"), [0], ctx.dataset)[0], proto.parse_options(raw, "p"),
                    ctx)
    raw["activation_checkpointing"] = True
    options = proto.parse_options(raw, "p")
    res = proto.run(proto.units(options, [0], ctx.dataset)[0], options, _ctx(tmp_path))
    assert "set_grad_checkpointing" in res.info["activation_checkpointing"]
    got = {m.metric: m.value for m in res.metrics if m.cls is None}
    want = {m.metric: m.value for m in ref.metrics if m.cls is None}
    assert abs(got["auroc"] - want["auroc"]) < 1e-6 and abs(got["val_score"] - want["val_score"]) < 1e-6


# --------------------------------------------------------------------------- the runner under torchrun
def test_torchrun_run_writes_the_results_of_a_single_process_run(tmp_path):
    """``torchrun --nproc_per_node 2 -m medprobe run``: both processes train every unit together,
    rank 0 alone writes results.db, whose units and numbers are those of a one-process run."""
    import os
    import sqlite3
    import subprocess
    import sys

    import yaml

    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import run_experiment

    def experiment(out: str) -> Path:
        cfg = {"name": "ddp", "output_dir": str(tmp_path / out), "cache_dir": str(tmp_path / "cache"), "seeds": [0],
               "image_size": 28, "bootstrap": 0, "precision": "fp32", "batch_size": 16,
               "datasets": {"ph": {"adapter": "phantom", "n": 32, "size": 32, "seed": 0}},
               "backbones": {"vit": {"name": BACKBONE, "weights": "random", "tiny": True}},
               "protocols": {"lora": {"epochs": 1, "r": 4, "dropout": 0.0, "augment": [], "batch_size": 8}}}
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def rows(out: str) -> list[tuple]:
        with sqlite3.connect(tmp_path / out / "results.db") as c:
            return c.execute("SELECT r.key, r.status, m.metric, m.value FROM metrics m JOIN runs r ON r.key = m.run_key "
                             "WHERE m.class IS NULL AND m.metric IN ('auroc', 'accuracy', 'val_score', "
                             "'epochs_to_best') ORDER BY r.key, m.metric").fetchall()

    assert run_experiment(load_experiment(experiment("single")), progress=False, log=lambda s: None).done == 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "medprobe", "run", str(experiment("ddp")), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished 1 units") == 1  # rank 0 alone reports
    single, ddp = rows("single"), rows("ddp")
    assert len(single) == 4 and [r[:3] for r in ddp] == [r[:3] for r in single]
    assert np.allclose([r[3] for r in ddp], [r[3] for r in single], atol=TOL)


def test_transunet_checkpointing_same_gradients():
    from medprobe.protocols.segmentation.protocol import _checkpointing
    from medprobe.protocols.segmentation.scratch import build_scratch

    def grads(checkpointed: bool):
        torch.manual_seed(0)
        model = build_scratch("transunet_scratch", 3, vit_dim=32, vit_depth=2, vit_heads=2, unet_width=8)
        how = _checkpointing(model) if checkpointed else ""
        model.eval()  # BatchNorm in eval: only the blocks' recomputation differs
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, how

    plain, _ = grads(False)
    ckpt, how = grads(True)
    assert how.startswith("torch.utils.checkpoint over 2")
    assert plain.keys() == ckpt.keys() and max(float((plain[k] - ckpt[k]).abs().max()) for k in plain) < 1e-6
