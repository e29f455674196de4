"""Self-supervised pretraining (issue 7): losses, centring, schedules, masks, crops, resume, DDP, errors."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medprobe.errors import ConfigError
from medprobe.pretrain import parse_pretrain_config, pretrain, pretrain_distributed, read_losses
from medprobe.pretrain.augment import MultiCrop, crop_box, gaussian_blur
from medprobe.pretrain.config import AugmentConfig, CropsConfig, TrainConfig
from medprobe.pretrain.heads import DINOHead
from medprobe.pretrain.losses import (SoftmaxCenter, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp)
from medprobe.pretrain.masking import batch_masks, block_mask
from medprobe.pretrain.schedules import Schedules, cosine, linear_warmup, warmup_cosine
from medprobe.pretrain.meta_arch import ema_update


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(out: Path, **sections) -> dict:
    """A few-second run: tiny ViT-S/14 (4 blocks, width 48), 28 px global / 14 px local crops."""
    cfg = {
        "name": "test-ssl",
        "output_dir": str(out),
        "backbone": {"name": "dinov2_vits14", "tiny": True},
        "data": {"adapter": "phantom", "options": {"n": 24, "size": 32}},
        "crops": {"global_size": 28, "local_size": 14, "n_local": 2},
        "train": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "teacher_temp_warmup_steps": 3,
                  "checkpoint_every": 2, "keep_checkpoints": 0, "precision": "fp32", "workers": 0},
        "loss": {"prototypes": 32, "ibot_prototypes": 32, "head_hidden": 32, "bottleneck": 16,
                 "mask_ratio": [0.25, 0.75]},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


# --------------------------------------------------------------------------- losses
def test_dino_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    tau = 0.5
    expected = 0.0
    for i in range(2):
        z = [v / tau for v in s[i].tolist()]
        log_norm = math.log(sum(math.exp(v) for v in z))
        expected += -sum(t[i, k].item() * (z[k] - log_norm) for k in range(3)) / 2
    assert dino_loss([s], [t], tau).item() == pytest.approx(expected, rel=1e-6)
    # two student views x two teacher views: the sum of the four pair terms
    assert dino_loss([s, s], [t, t], tau).item() == pytest.approx(4 * expected, rel=1e-6)


def test_ibot_loss_averages_per_image_then_over_images():
    masks = torch.tensor([[True, False], [True, True], [False, False]])
    s = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    ce = [-(t[i] * torch.log_softmax(s[i] / 0.1, -1)).sum().item() for i in range(3)]
    expected = (ce[0] / 1 + (ce[1] + ce[2]) / 2 + 0.0) / 3  # image 3 has no masked patch and counts as 0
    assert ibot_loss(s, t, masks, 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_loss_hand_case():
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # normalised: east, north, west
    # nearest neighbours are all at distance sqrt(2) (east<->north, north<->east or west, west<->north)
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_sinkhorn_knopp_one_iteration_by_hand_and_marginals():
    logits = torch.tensor([[0.2, -0.1], [0.0, 0.4]])  # 2 samples x 2 prototypes
    temp = 0.5
    q = np.exp(logits.numpy().T / temp).astype(np.float64)  # (K, B)
    q /= q.sum()
    q /= q.sum(1, keepdims=True) * 2  # each prototype gets 1/K of the mass
    q /= q.sum(0, keepdims=True) * 2  # each sample gets 1/B of the mass
    expected = (q * 2).T
    np.testing.assert_allclose(sinkhorn_knopp(logits, temp, iterations=1).numpy(), expected, rtol=1e-5)

    gen = torch.Generator().manual_seed(0)
    big = torch.randn(12, 6, generator=gen)
    out = sinkhorn_knopp(big, 0.3, iterations=3)
    torch.testing.assert_close(out.sum(1), torch.ones(12))  # every target is a distribution
    converged = sinkhorn_knopp(big, 0.3, iterations=200)
    torch.testing.assert_close(converged.sum(0), torch.full((6,), 12 / 6), rtol=1e-4, atol=1e-4)  # equal usage
    assert sinkhorn_knopp(torch.zeros(0, 6), 0.1).shape == (0, 6)  # no masked patch anywhere


def test_softmax_center_moves_towards_batch_mean():
    c = SoftmaxCenter(3, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    torch.testing.assert_close(c.targets(logits, 1.0), torch.softmax(logits, -1))
    c.update(logits)
    torch.testing.assert_close(c.center, torch.full((1, 3), 0.2))  # 0.1 * mean (2, 2, 2)
    c.update(torch.zeros(0, 3))  # an empty batch leaves the centre alone
    torch.testing.assert_close(c.center, torch.full((1, 3), 0.2))
    torch.testing.assert_close(c.targets(logits, 0.5), torch.softmax((logits - 0.2) / 0.5, -1))


def test_dino_head_prototypes_are_weight_normalised():
    torch.manual_seed(0)
    head = DINOHead(8, 5, hidden=16, bottleneck=4, layers=3)
    x = torch.randn(3, 8)
    out = head(x)
    assert out.shape == (3, 5) and out.abs().max() <= 1 + 1e-6  # cosine similarities
    with torch.no_grad():
        head.prototypes.weight.mul_(7.0)
    torch.testing.assert_close(head(x), out)


def test_ema_update():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t0, t1, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)
    ema_update(teacher, student, 0.0)
    for t1, s in zip(teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t1, s)


# --------------------------------------------------------------------------- schedules
def test_schedules():
    assert cosine(0, 10, 1.0, 0.0) == 1.0
    assert cosine(5, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(10, 10, 1.0, 0.0) == 0.0 and cosine(99, 10, 1.0, 0.0) == 0.0
    assert [warmup_cosine(s, 10, 1.0, 0.0, 4) for s in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert warmup_cosine(4, 10, 1.0, 0.0, 4) == 1.0
    assert warmup_cosine(7, 10, 1.0, 0.0, 4) == pytest.approx(0.5)
    assert linear_warmup(0, 4, 0.04, 0.07) == 0.04 and linear_warmup(2, 4, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(9, 4, 0.04, 0.07) == 0.07
    sched = Schedules(TrainConfig(steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10, momentum=[0.99, 1.0],
                                  weight_decay=[0.04, 0.4], freeze_last_layer_steps=3))
    first, last = sched.at(0), sched.at(99)
    assert first.lr == 0 and sched.at(10).lr == pytest.approx(1e-3) and last.lr < 2e-5
    assert first.momentum == pytest.approx(0.99) and last.momentum == pytest.approx(1.0, abs=1e-5)
    assert first.weight_decay == pytest.approx(0.04) and last.weight_decay == pytest.approx(0.4, abs=1e-3)
    assert first.last_layer_lr_scale == 0.0 and sched.at(3).last_layer_lr_scale == 1.0


# --------------------------------------------------------------------------- masks and crops
def test_block_mask_exact_count_and_batch_ratios():
    rng = random.Random(0)
    for n in (0, 1, 5, 13, 16):
        m = block_mask(4, 4, n, rng)
        assert m.shape == (4, 4) and m.sum() == n
    big = block_mask(14, 14, 60, random.Random(1))
    assert big.sum() == 60
    rows = np.flatnonzero(big.any(1))
    assert len(rows) < 14  # grown as blocks, not scattered over every row

    masks = batch_masks(40, 8, 8, (0.1, 0.5), 0.5, random.Random(2))
    assert masks.shape == (40, 64) and masks.dtype == bool
    counts = masks.sum(1)
    masked = np.sort(counts[counts > 0])
    assert (counts > 0).sum() == 20  # mask_probability of the images are masked
    bins = np.linspace(0.1, 0.5, 21)
    for i, c in enumerate(masked):  # one ratio drawn in each stratum
        assert int(64 * bins[i]) <= c <= int(64 * bins[i + 1])
    assert counts[:20].sum() != counts.sum() or counts[20:].sum() != 0  # shuffled, not masked-first
    np.testing.assert_array_equal(masks, batch_masks(40, 8, 8, (0.1, 0.5), 0.5, random.Random(2)))


def test_multicrop_views_shapes_ranges_and_determinism():
    crops = CropsConfig(global_size=28, local_size=14, n_local=3, global_scale=[0.5, 1.0], local_scale=[0.1, 0.3])
    aug = MultiCrop(crops, AugmentConfig(blur_p=[1.0, 1.0, 1.0], solarize_p=1.0))
    gen = torch.Generator().manual_seed(0)
    gray = torch.rand(1, 40, 40, generator=gen)
    views = aug(gray, random.Random(5))
    assert [tuple(v.shape) for v in views.globals] == [(1, 28, 28)] * 2
    assert [tuple(v.shape) for v in views.locals] == [(1, 14, 14)] * 3
    for v in views.globals + views.locals:
        assert 0.0 <= v.min() and v.max() <= 1.0
    again = aug(gray, random.Random(5))
    for a, b in zip(views.globals + views.locals, again.globals + again.locals):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rgb = aug(torch.rand(3, 30, 50, generator=gen), random.Random(1))
    assert rgb.globals[0].shape == (3, 28, 28)
    rng = random.Random(3)
    for _ in range(50):
        top, left, h, w = crop_box(40, 60, (0.2, 0.6), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.15 <= h * w / 2400 <= 0.65
    flat = torch.full((1, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)  # blur keeps constant images


# --------------------------------------------------------------------------- configuration and bad input
@pytest.mark.parametrize("section, value, message", [
    ("train", {"stepz": 5}, "stepz"),
    ("train", {"steps": "many"}, "expected an integer"),
    ("loss", {"centering": "sinkhorn"}, "sinkhorn_knopp"),
    ("crops", {"global_scale": [0.9, 0.2]}, "global_scale"),
    ("augment", {"hflip": 1.5}, "hflip"),
    ("train", {"momentum": [0.99]}, "two numbers"),
])
def test_config_errors_name_the_key(tmp_path, section, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_pretrain_config(tiny_config(tmp_path, **{section: value}))


def test_data_config_needs_exactly_one_source(tmp_path):
    raw = tiny_config(tmp_path)
    raw["data"]["folder"] = str(tmp_path)
    with pytest.raises(ConfigError, match="exactly one"):
        parse_pretrain_config(raw)


@pytest.mark.parametrize("change, message", [
    ({"backbone": {"name": "resnet18"}}, "not a ViT"),
    ({"crops": {"local_size": 20}}, "not a multiple of the patch size 14.*14 or 28"),
    ({"data": {"adapter": None, "options": {}, "folder": "EMPTY"}}, "holds no images"),
    ({"data": {"adapter": None, "options": {}, "folder": "MISSING"}}, "is not a folder"),
])
def test_bad_input_fails_before_training(tmp_path, change, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "EMPTY" / "notes.txt").write_text("not an image")
    raw = tiny_config(tmp_path / "out")
    for key, value in change.items():
        raw[key] = {**raw[key], **value}
    if raw["data"].get("folder"):
        raw["data"]["folder"] = str(tmp_path / raw["data"]["folder"])
    with pytest.raises(ConfigError, match=message):
        pretrain(raw, progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run with a checkpoint every 2 steps."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ssl") / "full"
    path = pretrain(tiny_config(out), progress=False)
    return out, path


def test_run_outputs(full_run):
    out, path = full_run
    rows = read_losses(out / "losses.csv")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert list(rows[0]) == ["step", "total", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp"]
    assert all(math.isfinite(r["total"]) for r in rows)
    assert rows[0]["lr"] == 0 and rows[2]["teacher_temp"] == pytest.approx(0.06)
    for r in rows:  # the logged total is the weighted sum of its parts
        assert r["total"] == pytest.approx(r["dino"] + r["ibot"] + 0.1 * r["koleo"], rel=1e-5)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000002.pt", "step_0000004.pt", "step_0000006.pt"]
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path == out / "teacher_backbone.pth" and path.is_file()
    assert not list(out.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_teacher_checkpoint_loads_back_as_backbone(full_run):
    from medprobe.backbones import create_backbone
    from medprobe.pretrain.trainer import Trainer
    out, path = full_run
    sd = torch.load(path, weights_only=True)
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "norm.weight"} <= set(sd)  # the facebookresearch/dinov2 layout
    assert not any(k.startswith(("dino_head", "ibot_head", "head.")) for k in sd)
    state = torch.load(out / "checkpoints" / "step_0000006.pt", weights_only=False)
    teacher_vit = create_backbone("dinov2_vits14", tiny=True).model
    teacher_vit.load_state_dict({k[len("backbone."):]: v for k, v in state["teacher"].items()
                                 if k.startswith("backbone.")})
    loaded = create_backbone("dinov2_vits14", weights=str(path), tiny=True)
    assert loaded.weights_tag.startswith("file:")
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        final, _ = teacher_vit.forward_intermediates(x, indices=[3], return_prefix_tokens=True, norm=True)
        got = loaded.forward_tokens(x, blocks=[-1])
    torch.testing.assert_close(got.cls, final[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(got.patch_grid.flatten(2).transpose(1, 2), final[:, 1:], rtol=0, atol=0)
    # the mask token of the student is kept: continual pretraining from this file starts from it
    raw = tiny_config(out.parent / "cont", backbone={"weights": str(path)})
    trainer = Trainer(parse_pretrain_config(raw), progress=False)
    torch.testing.assert_close(trainer.student.mask_token.detach(), sd["mask_token"])
    torch.testing.assert_close(trainer.student.backbone.cls_token.detach(), teacher_vit.cls_token.detach())


def test_kill_and_resume_gives_the_same_loss_curve(full_run, tmp_path):
    full_out, full_path = full_run
    out = tmp_path / "killed"
    raw = tiny_config(out)

    def crash(step: int, row: dict) -> None:
        if step == 5:  # after the checkpoint of step 4, before the one of step 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(raw, progress=False, on_step=crash)
    assert [r["step"] for r in read_losses(out / "losses.csv")] == [1, 2, 3, 4, 5]
    assert not (out / "teacher_backbone.pth").exists()
    pretrain(raw, progress=False)  # resumes from step 4; step 5 is recomputed
    assert read_losses(out / "losses.csv") == read_losses(full_out / "losses.csv")
    a, b = torch.load(full_path, weights_only=True), torch.load(out / "teacher_backbone.pth", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # a changed recipe in the same output folder is refused instead of mixed into the run
    with pytest.raises(ConfigError, match="different configuration.*train.lr"):
        pretrain(tiny_config(out, train={"lr": 1e-3}), progress=False)


def test_folder_of_images_softmax_centering_and_cli(tmp_path):
    from PIL import Image

    from medprobe.cli import main
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (33, 33, 3), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
    np.save(folder / "c.npy", rng.random((20, 24)).astype(np.float32) * 1000)
    (folder / "readme.txt").write_text("skipped")
    raw = tiny_config(tmp_path / "out", train={"steps": 2, "checkpoint_every": 1},
                      loss={"centering": "softmax", "koleo_weight": 0.0})
    raw["data"] = {"folder": str(folder)}
    cfg_file = tmp_path / "ssl.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    assert main(["pretrain", str(cfg_file), "--quiet", "--set", "train.steps=3", "--no-resume"]) == 0
    rows = read_losses(tmp_path / "out" / "losses.csv")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["koleo"] == 0.0
    assert all(math.isfinite(r["total"]) for r in rows)
    assert main(["pretrain", str(cfg_file), "--quiet", "--set", "crops.global_size=30"]) == 2  # user error


def test_two_process_gloo_run_matches_single_process(tmp_path):
    """DDP over 2 CPU processes: same global batches and targets, averaged gradients -> same run."""
    raw = tiny_config(tmp_path / "single", backbone={"name": "dinov2_vits14_reg"},
                      train={"steps": 3, "checkpoint_every": 3}, loss={"koleo_weight": 0.0})
    single = pretrain(raw, progress=False)
    raw_ddp = {**raw, "output_dir": str(tmp_path / "ddp")}
    ddp = pretrain_distributed(raw_ddp, nprocs=2)
    a, b = read_losses(tmp_path / "single" / "losses.csv"), read_losses(tmp_path / "ddp" / "losses.csv")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ("total", "dino", "ibot"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5)
    sa, sb = torch.load(single, weights_only=True), torch.load(ddp, weights_only=True)
    assert "register_tokens" in sb
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5)
    from medprobe.backbones import create_backbone
    bb = create_backbone("dinov2_vits14_reg", weights=str(ddp), tiny=True)
    assert bb.forward_tokens(torch.zeros(1, 3, 28, 28)).cls.shape == (1, 48)


# --------------------------------------------------------------------------- issue 15: RAD-DINO recipe
def test_side_uniform_crops_follow_rad_dino():
    """crops.mode side: square crops with side ~ U(259, 518) -> 518 and U(104, 259) -> 196, scaled with global_size."""
    rad = CropsConfig(mode="side", global_size=518, local_size=196)
    assert rad.side_range("global") == (259.0, 518.0) and rad.side_range("local") == (104.0, 259.0)
    half = CropsConfig(mode="side", global_size=259, local_size=98)
    assert half.side_range("global") == pytest.approx((129.5, 259.0))
    assert half.side_range("local") == pytest.approx((52.0, 129.5))
    aug = MultiCrop(CropsConfig(mode="side", global_size=56, local_size=28, n_local=2), AugmentConfig())
    rng = random.Random(0)
    for which, (lo, hi) in (("global", (28, 56)), ("local", (104 * 56 / 518, 259 * 56 / 518))):
        sides = []
        for _ in range(400):
            top, left, h, w = aug.box(56, 60, which, rng)
            assert h == w and 0 <= top <= 56 - h and 0 <= left <= 60 - w
            sides.append(h)
        assert round(lo) <= min(sides) and max(sides) <= round(hi)
        assert np.mean(sides) == pytest.approx((lo + hi) / 2, abs=1.0)  # uniform on the side, not the area
        assert min(sides) <= lo + 2 and max(sides) >= hi - 2
    assert aug.box(30, 40, "global", rng)[2] <= 30  # capped by a smaller image
    views = aug(torch.rand(1, 56, 56, generator=torch.Generator().manual_seed(0)), random.Random(1))
    assert [tuple(v.shape) for v in views.globals + views.locals] == [(1, 56, 56)] * 2 + [(1, 28, 28)] * 2
    with pytest.raises(ConfigError, match="crops.mode"):
        parse_pretrain_config(tiny_config(Path("unused"), crops={"mode": "sides"}))


def test_65536_prototypes_fit_in_memory_and_train(tmp_path):
    """DINOv2/RAD-DINO's 65,536 prototypes: the ViT-B head has DINOv2's parameter count; a tiny-width run trains."""
    with torch.device("meta"):
        head = DINOHead(768, 65536, hidden=2048, bottleneck=256, layers=3)
        # the reference: DINOv2's head, an MLP and torch's weight_norm(Linear(256, 65536, bias=False))
        ref = torch.nn.ModuleList([torch.nn.Linear(768, 2048), torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 256),
                                   torch.nn.utils.parametrizations.weight_norm(
                                       torch.nn.Linear(256, 65536, bias=False))])
    n = sum(p.numel() for p in head.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert n * 4 < 100 * 2 ** 20  # under 100 MiB in fp32 per head copy
    raw = tiny_config(tmp_path / "big", train={"steps": 2, "checkpoint_every": 2},
                      loss={"prototypes": 65536, "ibot_prototypes": 65536, "head_hidden": 16, "bottleneck": 8})
    pretrain(raw, progress=False)
    rows = read_losses(tmp_path / "big" / "losses.csv")
    assert all(math.isfinite(r["total"]) for r in rows)
    state = torch.load(tmp_path / "big" / "checkpoints" / "step_0000002.pt", weights_only=False)
    assert state["student"]["dino_head.prototypes.weight"].shape == (65536, 8)
    assert state["student"]["ibot_head.gain"].shape == (65536, 1)


class _RefDINOv2Head(torch.nn.Module):
    """DINOv2's DINOHead as its repository builds it: mlp (Linear, GELU, ...) then a weight-normalised last layer."""

    def __init__(self, in_dim, out_dim, hidden, bottleneck, new_weight_norm=False):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.GELU(), torch.nn.Linear(hidden, bottleneck))
        wn = torch.nn.utils.parametrizations.weight_norm if new_weight_norm else torch.nn.utils.weight_norm
        self.last_layer = wn(torch.nn.Linear(bottleneck, out_dim, bias=False))

    def forward(self, x):
        return self.last_layer(torch.nn.functional.normalize(self.mlp(x), dim=-1))


def _dinov2_teacher_checkpoint(path, new_weight_norm=False, ibot=True, extra=None):
    """A DINOv2 ``teacher_checkpoint.pth`` for the tiny ViT-S/14 (width 48) and the tiny_config heads."""
    torch.manual_seed(3)
    heads = {"dino_head": _RefDINOv2Head(48, 32, 32, 16, new_weight_norm)}
    if ibot:
        heads["ibot_head"] = _RefDINOv2Head(48, 32, 32, 16, new_weight_norm)
    sd = {"backbone.cls_token": torch.zeros(1, 1, 48)}
    for name, h in heads.items():
        with torch.no_grad():  # trained gains differ from 1: they must be kept
            g = next(p for n, p in h.named_parameters() if n.endswith(("weight_g", "original0")))
            g.uniform_(0.5, 2.0)
        sd.update({f"{name}.{k}": v for k, v in h.state_dict().items()})
    sd.update(extra or {})
    torch.save({"teacher": sd}, path)
    return heads


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("new_weight_norm", [False, True])
def test_released_dino_and_ibot_heads_load_exactly(tmp_path, new_weight_norm):
    from medprobe.pretrain.trainer import Trainer
    ckpt = tmp_path / "teacher_checkpoint.pth"
    ref = _dinov2_teacher_checkpoint(ckpt, new_weight_norm)
    trainer = Trainer(parse_pretrain_config(tiny_config(tmp_path / "out", heads={"weights": str(ckpt)})),
                      progress=False)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name in ("dino_head", "ibot_head"):
            want = ref[name](x)
            torch.testing.assert_close(getattr(trainer.student, name)(x), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(getattr(trainer.teacher, name)(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"ibot": False}, r"not in the file: ibot_head\.gain, ibot_head\.mlp\.0\.bias"),
    ({"extra": {"dino_head.extra.weight": torch.zeros(2)}}, r"no place in the model: dino_head\.extra\.weight"),
    ({"extra": {"student_thing": torch.zeros(2)}}, r"no place in the model: student_thing"),
    ({"loss": {"prototypes": 64}}, r"another shape: dino_head\.gain \(file \(32, 1\), run \(64, 1\)\)"),
])
def test_head_weights_that_do_not_fit_name_the_keys(tmp_path, change, message):
    from medprobe.errors import WeightsError
    from medprobe.pretrain.trainer import Trainer
    ckpt = tmp_path / "teacher_checkpoint.pth"
    _dinov2_teacher_checkpoint(ckpt, new_weight_norm=True, ibot=change.get("ibot", True), extra=change.get("extra"))
    raw = tiny_config(tmp_path / "out", heads={"weights": str(ckpt)}, loss=change.get("loss", {}))
    with pytest.raises(WeightsError, match=message):
        Trainer(parse_pretrain_config(raw), progress=False)


def test_continual_pretraining_of_the_hugging_face_rad_dino(tmp_path):
    """backbone rad_dino (transformers Dinov2Model) from a save_pretrained folder: trains, writes a loadable teacher."""
    from medprobe.backbones import create_backbone
    from medprobe.pretrain.meta_arch import param_groups
    from medprobe.pretrain.trainer import Trainer
    start = create_backbone("rad_dino", tiny=True)
    torch.manual_seed(1)
    with torch.no_grad():
        start.model.embeddings.mask_token.normal_()
    start.model.save_pretrained(tmp_path / "rad-dino")
    raw = tiny_config(tmp_path / "out", backbone={"name": "rad_dino", "tiny": True, "weights": str(tmp_path / "rad-dino")},
                      train={"steps": 3, "checkpoint_every": 3})
    trainer = Trainer(parse_pretrain_config(raw), progress=False)
    for k, v in start.model.state_dict().items():  # every tensor, the mask token included, from the folder
        torch.testing.assert_close(trainer.student.backbone.state_dict()[k], v, rtol=0, atol=0)
    assert trainer.student.mask_token is trainer.student.backbone.embeddings.mask_token
    groups = param_groups(trainer.student, 0.5, 0.2)
    mult = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    layers = trainer.student.backbone.encoder.layer
    assert mult[id(next(layers[0].parameters()))] == pytest.approx(0.5 ** 4)  # block 1 of 4: decay^(4 + 1 - 1)
    assert mult[id(trainer.student.backbone.embeddings.cls_token)] == pytest.approx(0.5 ** 5)
    path = trainer.run()
    rows = read_losses(tmp_path / "out" / "losses.csv")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["total"]) and r["ibot"] > 0 for r in rows)
    loaded = create_backbone("rad_dino", weights=str(path), tiny=True)
    assert not torch.equal(loaded.model.embeddings.mask_token, start.model.embeddings.mask_token)  # trained
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, patch = trainer.teacher.tokens(x)
        got = loaded.forward_tokens(x)
    torch.testing.assert_close(got.cls, cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.patch_grid.flatten(2).transpose(1, 2), patch, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- several sources, probe
def test_mixture_sampler_weights_order_and_state():
    from medprobe.pretrain.data import MixtureSampler
    a = MixtureSampler([30, 10], [0.75, 0.25], 8, seed=4)
    draws = [key for step in range(300) for key in a.indices(step)]
    share = np.mean([s == 0 for s, _ in draws])
    assert share == pytest.approx(0.75, abs=4 * math.sqrt(0.75 * 0.25 / len(draws)))
    firsts = [i for s, i in draws if s == 0][:30]
    assert sorted(firsts) == list(range(30))  # each pass over a source is a permutation (no replacement)
    assert [i for s, i in draws if s == 1][:10] != list(range(10))  # shuffled
    b = MixtureSampler([30, 10], [0.75, 0.25], 8, seed=4)
    assert [b.indices(t) for t in (0, 7, 3)] == [draws[0:8], draws[56:64], draws[24:32]]  # a pure function of step
    assert MixtureSampler([30, 10], [0.75, 0.25], 8, seed=5).indices(0) != draws[:8]
    state = a.state_dict(150)
    assert sum(state["drawn"]) == 150 * 8
    c = MixtureSampler([30, 10], [0.75, 0.25], 8, seed=4)
    c.load_state_dict(state)
    assert c.indices(150) == draws[1200:1208]
    with pytest.raises(ConfigError, match="changed size"):
        MixtureSampler([31, 10], [0.75, 0.25], 8, seed=4).load_state_dict(state)


@pytest.mark.parametrize("data, message", [
    ({"adapter": "phantom", "sources": [{"adapter": "phantom"}]}, "inside each source"),
    ({"sources": [{"adapter": "phantom", "weight": 0}]}, "weight must be > 0"),
    ({"sources": [{"adapter": "phantom", "folder": "x"}]}, "exactly one"),
    ({"sources": []}, "at least one source"),
])
def test_data_sources_config_errors(tmp_path, data, message):
    raw = tiny_config(tmp_path)
    raw["data"] = data
    with pytest.raises(ConfigError, match=message):
        parse_pretrain_config(raw)


def _mixed_probe_config(out: Path, **probe) -> dict:
    raw = tiny_config(out)
    raw["data"] = {"sources": [{"adapter": "phantom", "options": {"n": 24, "size": 32}, "weight": 3},
                               {"adapter": "phantom", "options": {"n": 10, "size": 40, "seed": 1}, "split": "all",
                                "weight": 1}]}
    raw["probe"] = {"adapter": "phantom", "options": {"n": 40, "size": 32}, "every": 2, **probe}
    return raw


def test_mixed_sources_with_probe_resume_exactly(tmp_path):
    """Two weighted sources and a probe every 2 steps: a killed and resumed run equals an uninterrupted one."""
    from medprobe.pretrain.probe import read_probe
    full = pretrain(_mixed_probe_config(tmp_path / "full"), progress=False)
    state = torch.load(tmp_path / "full" / "checkpoints" / "step_0000004.pt", weights_only=False)
    assert sum(state["sampler"]["drawn"]) == 4 * 4 and min(state["sampler"]["drawn"]) > 0
    probe_rows = read_probe(tmp_path / "full" / "probe.csv")
    assert [r["step"] for r in probe_rows] == [2, 4, 6] and all(0 <= r["value"] <= 1 for r in probe_rows)

    def crash(step: int, row: dict) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(_mixed_probe_config(tmp_path / "killed"), progress=False, on_step=crash)
    pretrain(_mixed_probe_config(tmp_path / "killed"), progress=False)
    assert read_losses(tmp_path / "killed" / "losses.csv") == read_losses(tmp_path / "full" / "losses.csv")
    assert read_probe(tmp_path / "killed" / "probe.csv") == probe_rows
    a, b = torch.load(full, weights_only=True), torch.load(tmp_path / "killed" / "teacher_backbone.pth", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_probe_early_stopping_keeps_the_best_teacher(tmp_path):
    """patience 1 with an unreachable min_delta: stops at the second evaluation; teacher_best.pth is the first one's
    teacher, and its probe value is reproduced by scikit-learn on the loaded backbone's features."""
    import json

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from medprobe.backbones import create_backbone
    from medprobe.pretrain.config import ProbeConfig
    from medprobe.pretrain.probe import Probe, read_probe
    out = tmp_path / "stop"
    raw = _mixed_probe_config(out, patience=1, min_delta=5.0)
    pretrain(raw, progress=False)
    assert [r["step"] for r in read_losses(out / "losses.csv")] == [1, 2, 3, 4]
    rows = read_probe(out / "probe.csv")
    assert [(r["step"], r["best_step"], r["bad_evals"]) for r in rows] == [(2, 2, 0), (4, 2, 1)]
    info = json.loads((out / "pretrain_info.json").read_text())
    assert info["stopped_early"] and info["probe"]["stopped_early"] and info["probe"]["best_step"] == 2
    pretrain(raw, progress=False)  # a rerun does not continue a run its probe stopped
    assert len(read_losses(out / "losses.csv")) == 4
    # the best value, recomputed from teacher_best.pth through the backbone wrapper and scikit-learn's AUROC
    bb = create_backbone("dinov2_vits14", weights=str(out / "teacher_best.pth"), tiny=True)
    probe = Probe(ProbeConfig(adapter="phantom", options={"n": 40, "size": 32}), 28, bb.preprocess.mean,
                  bb.preprocess.std)
    with torch.no_grad():
        feats = {k: bb.forward_tokens(d.images).cls.double().numpy() for k, d in probe.splits.items()}
    sc = StandardScaler().fit(feats["train_split"])
    clf = LogisticRegression(max_iter=1000).fit(sc.transform(feats["train_split"]), probe.splits["train_split"].labels)
    auc = roc_auc_score(probe.splits["eval_split"].labels, clf.predict_proba(sc.transform(feats["eval_split"]))[:, 1])
    assert rows[0]["value"] == pytest.approx(auc, abs=1e-6)
