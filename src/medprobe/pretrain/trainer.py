"""The DINOv2-style training loop: data, schedules, optimiser steps, checkpoints, resuming.

The networks, losses, EMA and parameter groups are in :mod:`medprobe.pretrain.meta_arch`
(DINOv2's ``SSLMetaArch``), the process group and gradient averaging in
:mod:`medprobe.pretrain.distributed`, the run's loss log in :mod:`medprobe.pretrain.history`.
AdamW with per-layer learning rates, per-module gradient clipping, then the teacher moves
towards the student. Everything random is a function of (seed, step), which makes resuming
exact, also across processes (each takes its slice of every global batch).
"""
from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from medprobe.errors import ConfigError, MedprobeError
from medprobe.fsutil import atomic_write
from medprobe.pretrain.augment import MultiCrop
from medprobe.pretrain.config import PretrainConfig
from medprobe.pretrain.data import BatchMaker, _mix, iterate_batches, open_sources
from medprobe.pretrain.distributed import average_gradients, setup_distributed
from medprobe.pretrain.history import CSV_COLUMNS, csv_text, fmt, list_checkpoints, plot_losses
from medprobe.pretrain.losses import all_reduce_sum
from medprobe.pretrain.meta_arch import MetaArch
from medprobe.pretrain.schedules import Schedules, StepValues
from medprobe.progress import ProgressBar

CHECKPOINT_FORMAT = 1
TEACHER_FILE = "teacher_backbone.pth"
BEST_TEACHER_FILE = "teacher_best.pth"
PROBE_FILE = "probe.csv"
StepCallback = Callable[[int, dict[str, float]], None]


# --------------------------------------------------------------------------- validation
HF_ARCHS = ("Dinov2Model", "Dinov2WithRegistersModel")


def supported_backbones() -> list[str]:
    """Registered backbones the trainer can pretrain (timm ViTs with a class token, transformers DINOv2 models)."""
    from medprobe.backbones import list_backbones
    return [s.name for s in list_backbones() if s.is_vit and s.has_cls_token
            and ((s.family == "timm" and "samvit" not in s.arch) or (s.family == "hf" and s.arch in HF_ARCHS))]


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
    sizes = {f"crops.{k}": getattr(cfg.crops, k) for k in ("global_size", "local_size")}
    if cfg.probe is not None and cfg.probe.image_size is not None:
        sizes["probe.image_size"] = cfg.probe.image_size
    for key, size in sizes.items():
        if size % patch:
            lower = size - size % patch
            hint = f"{lower} or {lower + patch}" if lower else str(patch)
            raise ConfigError(f"{key} {size} is not a multiple of the patch size {patch} of "
                              f"{spec.name}; use e.g. {hint}")
    if cfg.loss.koleo_weight > 0 and cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be >= 2 per process when loss.koleo_weight > 0")
    return patch


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
        self.source = open_sources(cfg.data, image_size)
        for src in self.source.sources:
            src.load(0)  # fail on an unreadable first image before building the model
        self.probe = None
        self.tracker = None
        if cfg.probe is not None:
            from medprobe.backbones import get_spec
            from medprobe.pretrain.probe import Probe, ProbeTracker
            pre = get_spec(cfg.backbone.name).preprocess
            if self.dist.main:  # evaluated on the main process; the decision is broadcast
                self.probe = Probe(cfg.probe, cfg.probe.image_size or cfg.crops.global_size, pre.mean, pre.std)
            self.tracker = ProbeTracker(cfg.probe.metric, cfg.probe.metric != "loss", cfg.probe.patience,
                                        cfg.probe.min_delta, [])
        seed_everything(cfg.train.seed)
        self.arch = MetaArch(cfg, self.precision, self.dist.device)
        lc, t = cfg.loss, cfg.train
        self.optimizer = torch.optim.AdamW(self.arch.param_groups(), lr=t.lr, betas=(t.betas[0], t.betas[1]),
                                           weight_decay=0.0)
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

    # the networks of the meta-architecture
    @property
    def backbone(self) -> Any:
        return self.arch.backbone

    @property
    def student(self) -> Any:
        return self.arch.student

    @property
    def teacher(self) -> Any:
        return self.arch.teacher

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, **self.arch.state_dict(),
                "optimizer": self.optimizer.state_dict(), "history": self.history,
                "sampler": self.batches.sampler.state_dict(self.step),
                "probe": self.tracker.state_dict() if self.tracker is not None else None,
                "config": self.cfg.fingerprint_dict(), "world_size": self.dist.world_size, "elapsed": self.elapsed}

    def load_state(self, state: dict[str, Any], path: Path) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise MedprobeError(f"{path}: unknown checkpoint format {state.get('format')!r}")
        if state["config"] != self.cfg.fingerprint_dict():
            diff = _diff(state["config"], self.cfg.fingerprint_dict())
            raise ConfigError(f"{self.out} holds a run with a different configuration ({'; '.join(diff[:5])}); "
                              f"use another output_dir, restore the settings, or start over with --no-resume")
        self.arch.load_state_dict(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if "sampler" in state:
            self.batches.sampler.load_state_dict(state["sampler"])
        if self.tracker is not None and state.get("probe") is not None:
            self.tracker.load_state_dict(state["probe"])
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
        state = self.state()
        atomic_write(self.ckpt_dir / f"step_{self.step:07d}.pt", lambda fh: torch.save(state, fh))
        keep = self.cfg.train.keep_checkpoints
        if keep:
            for _, old in list_checkpoints(self.ckpt_dir)[:-keep]:
                old.unlink(missing_ok=True)
        if self.history and time.perf_counter() - self._last_plot > 120:  # refresh the picture now and then
            plot_losses(self.history, self.out / "losses.png", self.cfg.name)
            self._last_plot = time.perf_counter()

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """The teacher backbone in the DINOv2 original layout (timm) or its transformers layout (Dinov2Model)."""
        from medprobe.backbones.weights import timm_vit_to_dinov2
        vit = self.teacher.backbone
        if self.teacher.hf:
            sd = dict(vit.state_dict())  # includes embeddings.mask_token
        else:
            sd = timm_vit_to_dinov2(vit.state_dict(), self.backbone.spec.num_register_tokens)
            sd["mask_token"] = self.teacher.mask_token.detach().cpu().clone()
        return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}

    def write_teacher(self, stopped_early: bool = False) -> Path:
        """Write the teacher backbone (see :meth:`teacher_state`), plus how to load it."""
        path = self.out / TEACHER_FILE
        if not self.dist.main:
            return path
        sd = self.teacher_state()
        atomic_write(path, lambda fh: torch.save(sd, fh))
        b = self.cfg.backbone
        info = {"backbone": b.name, "tiny": b.tiny, "overrides": b.overrides, "initial_weights": b.weights,
                "weights": str(path), "steps_done": self.step, "steps": self.cfg.train.steps,
                "stopped_early": stopped_early, "precision": self.precision, "world_size": self.dist.world_size,
                "train_seconds": round(self.elapsed, 1),
                "probe": None if self.tracker is None else {
                    "metric": self.tracker.metric, "best_step": self.tracker.best_step,
                    "best_value": self.tracker.best_value, "stopped_early": self.tracker.stopped,
                    "best_weights": str(self.out / BEST_TEACHER_FILE), "history": str(self.out / PROBE_FILE)},
                "load_with": f"create_backbone({b.name!r}, weights={str(path)!r}, tiny={b.tiny}, "
                             f"overrides={b.overrides or None})",
                "config": self.cfg.to_dict()}
        atomic_write(self.out / "pretrain_info.json", json.dumps(info, indent=1))
        return path

    def evaluate_probe(self) -> bool:
        """Evaluate the probe on the teacher (main process), log it, keep the best teacher; True = stop early."""
        assert self.tracker is not None
        value = math.nan
        if self.dist.main:
            from medprobe.pretrain.probe import probe_csv_text
            with self.arch._autocast():
                value, n_tr, n_ev = self.probe.evaluate(self.teacher, self.dist.device)
            better = self.tracker.record(self.step, value, n_tr, n_ev)
            atomic_write(self.out / PROBE_FILE, probe_csv_text(self.tracker.history))
            if better:
                sd = self.teacher_state()
                atomic_write(self.out / BEST_TEACHER_FILE, lambda fh: torch.save(sd, fh))
        if self.dist.world_size > 1:  # every process follows the main one's decision
            flag = torch.tensor([float(self.tracker.stopped)], device=self.dist.device)
            dist.broadcast(flag, 0)
            self.tracker.stopped = bool(flag.item())
        return self.tracker.stopped

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ one step
    def _set_optimizer(self, v: StepValues) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = v.lr * g["lr_mult"] * (v.last_layer_lr_scale if g["last_layer"] else 1.0)
            g["weight_decay"] = v.weight_decay * g["wd_mult"]

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimisation step on ``batch``; returns the logged row (losses averaged over processes)."""
        step = batch.step
        v = self.schedules.at(step)
        self._set_optimizer(v)
        torch.manual_seed(_mix(self.cfg.train.seed, step, self.dist.rank, 4))  # stochastic depth
        dev = self.dist.device
        losses = self.arch.compute_losses(batch.globals.to(dev, non_blocking=True), batch.locals.to(dev, non_blocking=True),
                                     batch.masks.to(dev, non_blocking=True), v.teacher_temp)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        average_gradients([p for p in self.student.parameters() if p.requires_grad], self.dist.world_size)
        self.arch.clip_gradients()
        self.optimizer.step()
        self.arch.update_teacher(v.momentum)
        values = torch.stack([losses[k].detach().float() for k in ("total", "dino", "ibot", "koleo")])
        values = all_reduce_sum(values) / self.dist.world_size
        total, dino, ibot, koleo = (float(x) for x in values.cpu())
        return {"step": step + 1, "total": total, "dino": dino, "ibot": ibot, "koleo": koleo, "lr": v.lr,
                "wd": v.weight_decay, "momentum": v.momentum, "teacher_temp": v.teacher_temp}

    # ------------------------------------------------------------------ loop
    def run(self) -> Path:
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
            atomic_write(self.out / "losses.csv", csv_text(self.history))
            if self.tracker is not None:
                from medprobe.pretrain.probe import probe_csv_text
                atomic_write(self.out / PROBE_FILE, probe_csv_text(self.tracker.history))
        stopped_by_probe = self.tracker is not None and self.tracker.stopped
        if stopped_by_probe and self.dist.main:
            print(f"medprobe: {cfg.name} was stopped early by its probe at step {self.step} (nothing to do)")
        csv_file = open(self.out / "losses.csv", "a", newline="") if self.dist.main else None
        writer = csv.writer(csv_file, lineterminator="\n") if csv_file else None
        bar = ProgressBar(t.steps, f"pretrain {cfg.backbone.name}", unit="step", initial=self.step,
                          enabled=self.progress and self.dist.main)
        start_clock = time.perf_counter()
        start_elapsed = self.elapsed
        stopped_early = False
        try:
            for batch in iterate_batches(self.batches, self.step, t.steps if not stopped_by_probe else self.step,
                                         t.workers):
                row = self.train_step(batch)
                if not all(math.isfinite(row[k]) for k in ("total", "dino", "ibot", "koleo")):
                    raise MedprobeError(f"pretraining diverged at step {row['step']} (loss {row['total']}); "
                                        f"lower train.lr, raise train.warmup_steps or use precision fp32")
                self.step = row["step"]
                self.elapsed = start_elapsed + time.perf_counter() - start_clock
                self.history.append(row)
                if writer is not None:
                    writer.writerow([fmt(row[c]) for c in CSV_COLUMNS])
                    csv_file.flush()
                bar.update(1, loss=f"{row['total']:.3f}", dino=f"{row['dino']:.3f}", ibot=f"{row['ibot']:.3f}")
                if self.on_step is not None:
                    self.on_step(self.step, row)
                out_of_time = (t.max_minutes is not None  # per invocation: a rerun gets a fresh budget
                               and time.perf_counter() - start_clock > 60 * t.max_minutes)
                if self.dist.world_size > 1:
                    flag = torch.tensor([float(out_of_time)], device=self.dist.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    out_of_time = bool(flag.item())
                if cfg.probe is not None and (self.step % cfg.probe.every == 0 or self.step == t.steps):
                    if self.evaluate_probe() and self.step < t.steps:
                        stopped_by_probe = True
                        self.save_checkpoint()
                        if self.dist.main:
                            print(f"medprobe: early stop at step {self.step}/{t.steps}: probe {cfg.probe.metric} did "
                                  f"not improve for {cfg.probe.patience} evaluations (best "
                                  f"{self.tracker.best_value:.4g} at step {self.tracker.best_step})")
                        break
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
            atomic_write(self.out / "losses.csv", csv_text(self.history))
            plot_losses(self.history, self.out / "losses.png", cfg.name)
        path = self.write_teacher(stopped_early or stopped_by_probe)
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
