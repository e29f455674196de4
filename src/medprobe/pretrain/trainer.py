"""The DINOv2-style training loop: EMA teacher, multi-crop DINO + iBOT + KoLeo, checkpoints, DDP.

One step: the teacher (EMA of the student, no gradients) embeds the 2 global crops; its
CLS prototype scores (views swapped) and its masked-patch scores become targets after
Sinkhorn-Knopp or softmax centring at the current teacher temperature. The student embeds
the masked global crops and the local crops; the loss is the DINO cross-entropy over all
(student view, other teacher view) pairs, the iBOT cross-entropy on masked patches and the
KoLeo regulariser on the student's global CLS tokens. AdamW with per-layer learning rates,
per-module gradient clipping, then the teacher moves towards the student.

Distributed: under ``torchrun`` (or :func:`spawn_local`) each process takes its slice of
every global batch; gradients are averaged with one all-reduce per step and batch
statistics of the targets are all-reduced, so all processes keep identical weights.
Everything random is a function of (seed, step), which makes resuming exact.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medprobe.errors import ConfigError, MedprobeError, WeightsError
from medprobe.pretrain.augment import MultiCrop
from medprobe.pretrain.config import PretrainConfig
from medprobe.pretrain.data import BatchMaker, _mix, iterate_batches, open_source
from medprobe.pretrain.heads import DINOHead, SSLNetwork
from medprobe.pretrain.losses import (SoftmaxCenter, all_reduce_sum, dino_loss, ibot_loss, koleo_loss,
                                      sinkhorn_knopp)
from medprobe.pretrain.schedules import Schedules, StepValues

CSV_COLUMNS = ("step", "total", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp")
CHECKPOINT_FORMAT = 1
TEACHER_FILE = "teacher_backbone.pth"
StepCallback = Callable[[int, dict[str, float]], None]


# --------------------------------------------------------------------------- validation
def supported_backbones() -> list[str]:
    """Registered backbones the trainer can pretrain (timm ViTs with a class token)."""
    from medprobe.backbones import list_backbones
    return [s.name for s in list_backbones() if s.family == "timm" and s.is_vit and s.has_cls_token
            and "samvit" not in s.arch]


def validate_config(cfg: PretrainConfig) -> int:
    """Checks that need the registry (backbone kind, crop sizes); returns the patch size."""
    from medprobe.backbones import get_spec
    spec = get_spec(cfg.backbone.name)
    if not spec.is_vit:
        raise ConfigError(f"backbone {spec.name!r} is not a ViT (it has no patch tokens); self-supervised "
                          f"pretraining needs a ViT: {', '.join(supported_backbones())}")
    if spec.name not in supported_backbones():
        raise ConfigError(f"backbone {spec.name!r} ({spec.family} {spec.arch}) is not supported for pretraining; "
                          f"supported: {', '.join(supported_backbones())}")
    patch = int(spec.patch_size)
    for key in ("global_size", "local_size"):
        size = getattr(cfg.crops, key)
        if size % patch:
            lower = size - size % patch
            hint = f"{lower} or {lower + patch}" if lower else str(patch)
            raise ConfigError(f"crops.{key} {size} is not a multiple of the patch size {patch} of "
                              f"{spec.name}; use e.g. {hint}")
    if cfg.loss.koleo_weight > 0 and cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be >= 2 per process when loss.koleo_weight > 0")
    return patch


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> Dist:
    """Join (or start, from torchrun's environment) the process group and pick the device."""
    cuda = torch.cuda.is_available() and device_pref != "cpu"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use auto or cpu")
    owns = False
    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device, owns)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_worker(rank: int, world_size: int, port: int, config: PretrainConfig, kwargs: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend="gloo", rank=rank, world_size=world_size)
    try:
        pretrain_in_process(config, **kwargs)
    finally:
        dist.destroy_process_group()


def spawn_local(config: PretrainConfig, nprocs: int, **kwargs: Any) -> Path:
    """Run :func:`pretrain_in_process` in ``nprocs`` CPU processes (gloo), like ``torchrun`` on one machine."""
    import torch.multiprocessing as mp
    mp.spawn(_spawn_worker, args=(nprocs, _free_port(), config, kwargs), nprocs=nprocs, join=True)
    return config.output_path / TEACHER_FILE


# --------------------------------------------------------------------------- model
def build_networks(cfg: PretrainConfig) -> tuple[Any, SSLNetwork, SSLNetwork]:
    """(backbone wrapper, student, teacher) with identical initial weights."""
    from medprobe.backbones import create_backbone
    from medprobe.backbones.weights import parse_weights, read_state_dict
    b = cfg.backbone
    overrides = dict(b.overrides)
    if cfg.train.drop_path > 0:
        overrides["drop_path_rate"] = cfg.train.drop_path
    try:
        backbone = create_backbone(b.name, b.weights, tiny=b.tiny, overrides=overrides or None)
    except ConfigError as e:  # a bad constructor override
        raise ConfigError(f"backbone.overrides: {e}") from None
    vit = backbone.model
    if getattr(vit, "cls_token", None) is None or not hasattr(vit, "_pos_embed"):
        raise ConfigError(f"backbone {b.name!r} is not a timm VisionTransformer with a class token")
    dim = int(vit.embed_dim)
    lc = cfg.loss
    dino_head = DINOHead(dim, lc.prototypes, lc.head_hidden, lc.bottleneck, lc.head_layers)
    ibot_head = (DINOHead(dim, lc.ibot_prototypes, lc.head_hidden, lc.bottleneck, lc.head_layers)
                 if lc.separate_ibot_head and lc.ibot_weight > 0 else None)
    student = SSLNetwork(vit, dino_head, ibot_head)
    source = parse_weights(b.weights)
    if source.kind == "file":  # a DINOv2-format checkpoint (e.g. an earlier run) keeps its mask token
        try:
            token = read_state_dict(source.path).get("mask_token")
        except WeightsError:
            token = None
        if token is not None and token.numel() == dim:
            student.mask_token.data.copy_(token.reshape(1, dim))
    teacher = SSLNetwork(_clone(vit), _clone(dino_head), _clone(ibot_head) if ibot_head is not None else None)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return backbone, student, teacher


def _clone(module: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(module)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student`` for every parameter."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def param_groups(student: SSLNetwork, layer_decay: float, patch_embed_mult: float) -> list[dict[str, Any]]:
    """AdamW groups with DINOv2's multipliers: layer-wise lr decay, patch-embed lr, no decay on biases/norms."""
    depth = len(student.backbone.blocks)
    groups: dict[tuple[float, float, bool], list[nn.Parameter]] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            sub = name[len("backbone."):]
            m = re.match(r"blocks\.(\d+)\.", sub)
            if m:
                layer = int(m.group(1)) + 1
            elif sub.startswith(("pos_embed", "patch_embed", "cls_token", "reg_token")):
                layer = 0
            else:
                layer = depth + 1
        elif name == "mask_token":
            layer = 0
        else:
            layer = depth + 1
        lr_mult = layer_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= patch_embed_mult
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        last = name.endswith("prototypes.weight")
        groups.setdefault((lr_mult, wd_mult, last), []).append(p)
    return [{"params": ps, "lr_mult": k[0], "wd_mult": k[1], "last_layer": k[2]} for k, ps in groups.items()]


# --------------------------------------------------------------------------- files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    out = []
    for p in folder.glob("step_*.pt") if folder.is_dir() else []:
        m = re.fullmatch(r"step_(\d+)\.pt", p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _csv_text(rows: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c]) for c in CSV_COLUMNS])
    return buf.getvalue()


def _fmt(v: float) -> str:
    return str(int(v)) if isinstance(v, int) else repr(float(v))


def read_losses(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``losses.csv`` as dicts (``step`` int, the rest float)."""
    with open(path, newline="") as fh:
        return [{k: int(v) if k == "step" else float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def plot_losses(rows: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Loss curves (and the learning rate) as a PNG, written atomically."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in rows]
    for key in ("total", "dino", "ibot", "koleo"):
        ax.plot(steps, [r[key] for r in rows], label=key, lw=1.2 if key == "total" else 0.9)
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or "self-supervised pretraining")
    ax2.plot(steps, [r["lr"] for r in rows], color="tab:gray")
    ax2.set_ylabel("lr")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- trainer
class Trainer:
    """One pretraining run; :meth:`run` trains (resuming when asked) and returns the teacher checkpoint path."""

    def __init__(self, cfg: PretrainConfig, resume: bool = True, progress: bool = True,
                 on_step: StepCallback | None = None) -> None:
        from medprobe.runtime import resolve_precision, seed_everything
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.on_step = on_step
        self.patch = validate_config(cfg)
        self.dist = setup_distributed(cfg.train.device)
        if cfg.train.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be divisible by the number of "
                              f"processes {self.dist.world_size}")
        if cfg.loss.koleo_weight > 0 and cfg.train.batch_size // self.dist.world_size < 2:
            raise ConfigError("train.batch_size must give >= 2 images per process when loss.koleo_weight > 0")
        self.precision = resolve_precision(cfg.train.precision, self.dist.device)
        self.out = cfg.output_path
        self.ckpt_dir = self.out / "checkpoints"
        image_size = cfg.data.image_size or cfg.crops.global_size
        self.source = open_source(cfg.data, image_size)
        self.source.load(0)  # fail on an unreadable first image before building the model
        seed_everything(cfg.train.seed)
        self.backbone, self.student, self.teacher = build_networks(cfg)
        dev = self.dist.device
        self.student.to(dev).train()
        self.teacher.to(dev).eval()
        lc = cfg.loss
        self.dino_center = SoftmaxCenter(lc.prototypes, lc.center_momentum).to(dev)
        self.ibot_center = SoftmaxCenter(lc.ibot_prototypes if self.student.ibot_head is not None
                                         else lc.prototypes, lc.center_momentum).to(dev)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(self.student, t.layer_decay, t.patch_embed_lr_mult),
                                           lr=t.lr, betas=(t.betas[0], t.betas[1]), weight_decay=0.0)
        self.schedules = Schedules(t)
        grid = (cfg.crops.global_size // self.patch,) * 2
        self.batches = BatchMaker(self.source, MultiCrop(cfg.crops, cfg.augment), t.batch_size, t.seed, grid,
                                  (lc.mask_ratio[0], lc.mask_ratio[1]),
                                  lc.mask_probability if lc.ibot_weight > 0 else 0.0,
                                  self.backbone.preprocess.mean, self.backbone.preprocess.std,
                                  self.dist.rank, self.dist.world_size)
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.elapsed = 0.0
        self._last_plot = time.perf_counter()

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "student": self.student.state_dict(),
                "teacher": self.teacher.state_dict(), "optimizer": self.optimizer.state_dict(),
                "dino_center": self.dino_center.state_dict(), "ibot_center": self.ibot_center.state_dict(),
                "history": self.history, "config": self.cfg.fingerprint_dict(),
                "world_size": self.dist.world_size, "elapsed": self.elapsed}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise MedprobeError(f"{path}: unknown checkpoint format {state.get('format')!r}")
        if state["config"] != self.cfg.fingerprint_dict():
            diff = _diff(state["config"], self.cfg.fingerprint_dict())
            raise ConfigError(f"{self.out} holds a run with a different configuration ({'; '.join(diff[:5])}); "
                              f"use another output_dir, restore the settings, or start over with --no-resume")
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dino_center.load_state_dict(state["dino_center"])
        self.ibot_center.load_state_dict(state["ibot_center"])
        self.history = list(state["history"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed", 0.0))

    def _restore(self) -> Path | None:
        found = list_checkpoints(self.ckpt_dir)
        if not self.resume:
            if self.dist.main:
                for _, p in found:
                    p.unlink(missing_ok=True)
            self._barrier()
            return None
        for step, path in reversed(found):
            try:
                state = torch.load(path, map_location=self.dist.device, weights_only=False)
            except Exception as e:  # a damaged file: fall back to the previous checkpoint
                print(f"medprobe: skipping unreadable checkpoint {path}: {e}")
                continue
            self.load_state(state, path)
            return path
        return None

    def save_checkpoint(self) -> None:
        if not self.dist.main:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.state(), self.ckpt_dir / f"step_{self.step:07d}.pt")
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for _, old in list_checkpoints(self.ckpt_dir)[:-keep]:
                old.unlink(missing_ok=True)
        if self.history and time.perf_counter() - self._last_plot > 120:  # refresh the picture now and then
            plot_losses(self.history, self.out / "losses.png", self.cfg.name)
            self._last_plot = time.perf_counter()

    def write_teacher(self, stopped_early: bool = False) -> Path:
        """Write the teacher backbone in the DINOv2 original layout, plus how to load it."""
        from medprobe.backbones.weights import timm_vit_to_dinov2
        path = self.out / TEACHER_FILE
        if not self.dist.main:
            return path
        vit = self.teacher.backbone
        sd = timm_vit_to_dinov2(vit.state_dict(), self.backbone.spec.num_register_tokens)
        sd["mask_token"] = self.teacher.mask_token.detach().cpu().clone()
        atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, path)
        b = self.cfg.backbone
        info = {"backbone": b.name, "tiny": b.tiny, "overrides": b.overrides, "initial_weights": b.weights,
                "weights": str(path), "steps_done": self.step, "steps": self.cfg.train.steps,
                "stopped_early": stopped_early, "precision": self.precision, "world_size": self.dist.world_size,
                "train_seconds": round(self.elapsed, 1),
                "load_with": f"create_backbone({b.name!r}, weights={str(path)!r}, tiny={b.tiny}, "
                             f"overrides={b.overrides or None})",
                "config": self.cfg.to_dict()}
        atomic_write_bytes(self.out / "pretrain_info.json", json.dumps(info, indent=1).encode())
        return path

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ one step
    def _set_optimizer(self, v: StepValues) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = v.lr * g["lr_mult"] * (v.last_layer_lr_scale if g["last_layer"] else 1.0)
            g["weight_decay"] = v.weight_decay * g["wd_mult"]

    def _autocast(self) -> Any:
        from medprobe.runtime import autocast
        return autocast(self.precision, self.dist.device)

    def compute_losses(self, globals_: torch.Tensor, locals_: torch.Tensor, masks: torch.Tensor,
                       teacher_temp: float) -> dict[str, torch.Tensor]:
        """The step's losses (scalars, this process's share) for one batch; builds the student graph."""
        lc, t = self.cfg.loss, self.cfg.train
        b = globals_.shape[0] // 2
        n_local = locals_.shape[0] // b if b else 0
        use_ibot = lc.ibot_weight > 0
        masks = masks if use_ibot else torch.zeros_like(masks)
        with torch.no_grad(), self._autocast():
            t_cls, t_patch = self.teacher.tokens(globals_)
            t_dino = self.teacher.dino_head(t_cls).float()
            t_dino = torch.cat([t_dino[b:], t_dino[:b]])  # student view 1 learns from teacher view 2 and back
            t_ibot = self.teacher.patch_head(t_patch[masks]).float() if use_ibot else None
        if lc.centering == "sinkhorn_knopp":
            dino_targets = sinkhorn_knopp(t_dino, teacher_temp, lc.sinkhorn_iterations)
            ibot_targets = (sinkhorn_knopp(t_ibot, teacher_temp, lc.sinkhorn_iterations) if use_ibot else None)
        else:
            dino_targets = self.dino_center.targets(t_dino, teacher_temp)
            self.dino_center.update(t_dino)
            ibot_targets = None
            if use_ibot:
                ibot_targets = self.ibot_center.targets(t_ibot, teacher_temp)
                self.ibot_center.update(t_ibot)

        with self._autocast():
            s_cls, s_patch = self.student.tokens(globals_, masks if use_ibot else None)
            s_dino = self.student.dino_head(s_cls).float()
            s_local = (self.student.dino_head(self.student.tokens(locals_)[0]).float() if n_local else None)
            s_ibot = self.student.patch_head(s_patch[masks]).float() if use_ibot else None

        n_terms = 2 + 2 * n_local  # (student view, other teacher view) pairs per image
        zero = torch.zeros((), device=globals_.device)
        dino = zero
        if lc.dino_weight > 0:
            dino = dino_loss([s_dino], [dino_targets], t.student_temp) * 2 / n_terms
            if n_local:
                dino = dino + dino_loss(s_local.chunk(n_local), dino_targets.chunk(2), t.student_temp) / n_terms
        ibot = ibot_loss(s_ibot, ibot_targets, masks, t.student_temp) if use_ibot else zero
        koleo = (sum(koleo_loss(c) for c in s_cls.float().chunk(2)) if lc.koleo_weight > 0 else zero)
        total = lc.dino_weight * dino + lc.ibot_weight * ibot + lc.koleo_weight * koleo
        return {"total": total, "dino": dino, "ibot": ibot, "koleo": koleo}

    def _sync_gradients(self) -> None:
        if self.dist.world_size == 1:
            return
        params = [p for p in self.student.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.dist.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def _clip(self) -> None:
        c = self.cfg.train.clip_grad
        if c <= 0:
            return
        s = self.student
        modules = [list(s.backbone.parameters()) + [s.mask_token], list(s.dino_head.parameters())]
        if s.ibot_head is not None:
            modules.append(list(s.ibot_head.parameters()))
        for ps in modules:
            ps = [p for p in ps if p.grad is not None]
            if ps:
                torch.nn.utils.clip_grad_norm_(ps, c)

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step on ``batch``; returns the logged row (losses averaged over processes)."""
        step = batch.step
        v = self.schedules.at(step)
        self._set_optimizer(v)
        torch.manual_seed(_mix(self.cfg.train.seed, step, self.dist.rank, 4))  # stochastic depth
        dev = self.dist.device
        losses = self.compute_losses(batch.globals.to(dev, non_blocking=True), batch.locals.to(dev, non_blocking=True),
                                     batch.masks.to(dev, non_blocking=True), v.teacher_temp)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        self._sync_gradients()
        self._clip()
        self.optimizer.step()
        ema_update(self.teacher, self.student, v.momentum)
        values = torch.stack([losses[k].detach().float() for k in ("total", "dino", "ibot", "koleo")])
        values = all_reduce_sum(values) / self.dist.world_size
        total, dino, ibot, koleo = (float(x) for x in values.cpu())
        return {"step": step + 1, "total": total, "dino": dino, "ibot": ibot, "koleo": koleo, "lr": v.lr,
                "wd": v.weight_decay, "momentum": v.momentum, "teacher_temp": v.teacher_temp}

    # ------------------------------------------------------------------ loop
    def run(self) -> Path:
        from tqdm.auto import tqdm
        cfg = self.cfg
        t = cfg.train
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._barrier()
        restored = self._restore()
        if restored is None and self.dist.world_size > 1:  # identical start on every process
            for p in list(self.student.parameters()) + list(self.teacher.parameters()):
                dist.broadcast(p.data, 0)
        if self.dist.main:
            if restored is not None:
                print(f"medprobe: resuming {cfg.name} from {restored} (step {self.step}/{t.steps})")
            atomic_write_bytes(self.out / "losses.csv", _csv_text(self.history).encode())
        csv_file = open(self.out / "losses.csv", "a", newline="") if self.dist.main else None
        writer = csv.writer(csv_file, lineterminator="\n") if csv_file else None
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.progress and self.dist.main),
                   desc=f"pretrain {cfg.backbone.name}", unit="step", dynamic_ncols=True)
        start_clock = time.perf_counter()
        start_elapsed = self.elapsed
        stopped_early = False
        try:
            for batch in iterate_batches(self.batches, self.step, t.steps, t.workers):
                row = self.train_step(batch)
                if not all(math.isfinite(row[k]) for k in ("total", "dino", "ibot", "koleo")):
                    raise MedprobeError(f"pretraining diverged at step {row['step']} (loss {row['total']}); "
                                        f"lower train.lr, raise train.warmup_steps or use precision fp32")
                self.step = row["step"]
                self.elapsed = start_elapsed + time.perf_counter() - start_clock
                self.history.append(row)
                if writer is not None:
                    writer.writerow([_fmt(row[c]) for c in CSV_COLUMNS])
                    csv_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{row['total']:.3f}", dino=f"{row['dino']:.3f}", ibot=f"{row['ibot']:.3f}")
                if self.on_step is not None:
                    self.on_step(self.step, row)
                out_of_time = (t.max_minutes is not None  # per invocation: a rerun gets a fresh budget
                               and time.perf_counter() - start_clock > 60 * t.max_minutes)
                if self.dist.world_size > 1:
                    flag = torch.tensor([float(out_of_time)], device=self.dist.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    out_of_time = bool(flag.item())
                if out_of_time and self.step < t.steps:
                    stopped_early = True
                    self.save_checkpoint()
                    if self.dist.main:
                        print(f"medprobe: train.max_minutes={t.max_minutes} reached at step {self.step}/{t.steps}; "
                              f"checkpoint saved (run again to continue)")
                    break
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if csv_file is not None:
                csv_file.close()
        if self.step == t.steps and self.dist.main and not list_checkpoints(self.ckpt_dir):
            self.save_checkpoint()  # resumed a finished run whose checkpoints were removed
        if self.dist.main and self.history:
            atomic_write_bytes(self.out / "losses.csv", _csv_text(self.history).encode())
            plot_losses(self.history, self.out / "losses.png", cfg.name)
        path = self.write_teacher(stopped_early)
        self._barrier()
        return path


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if a == b else [f"{where}: was {a!r}, now {b!r}"]


def pretrain_in_process(config: PretrainConfig, resume: bool = True, progress: bool = True,
                        on_step: StepCallback | None = None) -> Path:
    """Run (or resume) pretraining in this process (one rank under torch.distributed)."""
    trainer = Trainer(config, resume=resume, progress=progress, on_step=on_step)
    try:
        return trainer.run()
    finally:
        if trainer.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()
