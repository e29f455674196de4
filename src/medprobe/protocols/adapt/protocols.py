"""Adaptation protocols: finetune, lora, bitfit, deit_head, freeze_blocks, first_blocks, scratch.

Each protocol only *builds* its model (which parameters exist and which train); training,
model selection, test scoring and the records (trainable parameters, wall time, inference
time, peak memory, epochs to best) are shared (:func:`train_and_score`, one loop in
:mod:`.training`). 3D datasets work with every protocol: slices are encoded in batches and
pooled per volume (mean, max or attention) before the head. The frozen 3D probe on cached
slice embeddings (``volume_probe``) lives in :mod:`medprobe.protocols.volume`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from medprobe.backbones import create_backbone
from medprobe.backbones.base import Backbone
from medprobe.data.base import ImageDataset
from medprobe.data.preprocess import Preprocessor
from medprobe.errors import ConfigError
from medprobe.options import require
from medprobe.features.extract import preprocessor_for
from medprobe.metrics import MetricValue, classification_metrics
from medprobe.distributed import world_size
from medprobe.protocols.adapt.augment import DEFAULT_AUGMENT, AugmentSpec, Augmenter
from medprobe.protocols.checkpointing import checkpoint_modules, enable_activation_checkpointing
from medprobe.protocols.adapt.data import ImageSource, Source
from medprobe.protocols.adapt.models import (AppendedDeiT, BackboneEncoder, Classifier, count_params, layer_ids,
                                             small_input_stem)
from medprobe.protocols.adapt.peft import apply_bitfit, apply_lora
from medprobe.protocols.adapt.training import FitResult, TrainConfig, balanced_weights, fit, latency_batch1, predict
from medprobe.predictions import Predictions, classification_predictions
from medprobe.protocols.base import Protocol, Unit, UnitContext, UnitResult, register_protocol

CLASSIFICATION = ("binary", "multiclass", "multilabel")
IMAGE_CACHE_MB = 4096.0  # prepared images kept in memory (float16) per dataset; larger sets are streamed
Mode = Literal["frozen", "unfrozen"]


# --------------------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """Options shared by every trainable protocol (keys under ``protocols.<name>:``)."""

    epochs: int = 10
    lr: list[float] = field(default_factory=lambda: [1e-3])  # several values: one unit each, chosen on val
    backbone_lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: Literal["cosine", "constant", "step", "plateau"] = "cosine"
    plateau_patience: int = 2  # schedule=plateau: evaluations without improvement before lr /= 10
    layer_decay: float = 1.0
    grad_clip: float | None = 1.0
    optimizer: Literal["adamw", "adam"] = "adamw"
    batch_size: int | None = None
    volume_batch_size: int = 4
    patience: int | None = 5
    select_metric: Literal["auroc", "accuracy", "loss"] = "auroc"
    evals_per_epoch: int = 1
    augment: list[str] = field(default_factory=lambda: list(DEFAULT_AUGMENT))
    crop_scale: list[float] = field(default_factory=lambda: [0.7, 1.0])
    rotate: float = 10.0
    translate: float = 0.05
    zoom: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    class_weighting: bool = False
    head_input: Literal["cls", "cls+mean"] = "cls"
    pooling: Literal["mean", "max", "attention"] = "mean"
    save_checkpoint: bool = False
    # memory for time: an optimizer step takes batch_size x grad_accum samples in grad_accum micro-batches
    # (the effective batch; the number of torchrun processes does not change it: each takes a part of
    # every micro-batch); activation_checkpointing recomputes the backbone's block activations in the
    # backward pass instead of storing them (same gradients)
    grad_accum: int = 1
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"epochs: must be >= 1, got {self.epochs}")
        lrs = self.lr if isinstance(self.lr, list) else [self.lr]
        require(len(lrs) > 0 and all(v > 0 for v in lrs), f"lr: every learning rate must be > 0, got {self.lr}")
        require(self.plateau_patience >= 1, f"plateau_patience: must be >= 1, got {self.plateau_patience}")
        require(self.backbone_lr is None or self.backbone_lr > 0,
                f"backbone_lr: the learning rate must be > 0 (or left out), got {self.backbone_lr}")
        require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        require(0 <= self.warmup_epochs <= self.epochs,
                f"warmup_epochs: must be within [0, epochs={self.epochs}], got {self.warmup_epochs}")
        require(0 < self.layer_decay <= 1, f"layer_decay: must be in (0, 1] (1 = no decay), got {self.layer_decay}")
        require(self.grad_clip is None or self.grad_clip >= 0, f"grad_clip: must be >= 0 (0 = off), got {self.grad_clip}")
        require(self.batch_size is None or self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require(self.volume_batch_size >= 1, f"volume_batch_size: must be >= 1, got {self.volume_batch_size}")
        require(self.patience is None or self.patience >= 1,
                f"patience: must be >= 1 epochs (or null for no early stopping), got {self.patience}")
        require(self.evals_per_epoch >= 1, f"evals_per_epoch: must be >= 1, got {self.evals_per_epoch}")
        require(self.grad_accum >= 1, f"grad_accum: must be >= 1 micro-batches per step, got {self.grad_accum}")
        require(len(self.crop_scale) == 2, f"crop_scale: expected [low, high], got {self.crop_scale}")
        self.augment_spec = AugmentSpec(tuple(self.augment), (self.crop_scale[0], self.crop_scale[1]), self.rotate,
                                        self.translate, self.zoom, self.brightness, self.contrast)

    def describe(self) -> dict[str, Any]:
        """The options as unit parameters (part of the run key)."""
        return dataclasses.asdict(self)


def _classification_only(dataset: ImageDataset) -> str | None:
    if dataset.task.kind not in CLASSIFICATION:
        return f"needs a classification dataset, {dataset.name} is {dataset.task.kind}"
    return None


def _check_k(values: list[int], key: str) -> None:
    require(len(values) > 0, f"{key}: give at least one number of blocks, e.g. {key}: [0, 4, 8]")
    require(all(k >= 0 for k in values), f"{key}: every number of blocks must be >= 0, got {values}")


# --------------------------------------------------------------------------- data and the shared run
def _splits(dataset: ImageDataset, seed: int) -> tuple[dict[str, np.ndarray], str]:
    """train/val/test indices; without a val split, 10 % of the training patients are held out."""
    present = dataset.splits()
    for s in ("train", "test"):
        if s not in present:
            raise ConfigError(f"dataset {dataset.name} has no {s!r} split (it has {', '.join(present)}); "
                              "adaptation protocols train on 'train', select on 'val' and score on 'test'")
    out = {s: dataset.indices(s) for s in ("train", "val", "test") if s in present}
    if "val" in out and len(out["val"]):
        return out, "val split"
    train = out["train"]
    patients = np.array([dataset.records[i].patient_id for i in train])
    unique = np.unique(patients)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=max(1, len(unique) // 10), replace=False).tolist()) if len(unique) > 1 else set()
    mask = np.array([p in held for p in patients])
    out["train"], out["val"] = train[~mask], train[mask]
    return out, "10% of training patients held out (no val split)"


def _image_sources(ctx: UnitContext, pre: Preprocessor, seed: int) -> tuple[dict[str, ImageSource], str]:
    """Prepared images per split, shared by the units of one dataset x backbone (ctx.memo)."""
    has_val = "val" in ctx.dataset.splits()
    key = "adapt:images:" + json.dumps(pre.describe(), sort_keys=True, default=str) + ("" if has_val else f":{seed}")
    if key not in ctx.memo:
        idx, how = _splits(ctx.dataset, seed)
        total = max(1, sum(len(i) for i in idx.values()))  # the in-memory budget is shared by the splits
        ctx.memo[key] = ({s: ImageSource(ctx.dataset, i, pre, cache_mb=IMAGE_CACHE_MB * len(i) / total)
                          for s, i in idx.items()}, how)
    return ctx.memo[key]


def _class_count(dataset: ImageDataset) -> int:
    return dataset.task.num_classes if dataset.task.kind != "binary" else 2


def record_metrics(result: FitResult, trainable: int, total: int, inference_s: float, n_test: int
                   ) -> list[MetricValue]:
    """The cost records every adaptation run writes next to its test metrics."""
    return [
        MetricValue("trainable_params", float(trainable)),
        MetricValue("trainable_pct", 100.0 * trainable / max(1, total)),
        MetricValue("train_wall_s", result.train_wall_s),
        MetricValue("train_s_to_best", result.train_s_to_best),
        MetricValue("epochs_to_best", result.best_epoch),
        MetricValue("inference_ms_per_sample", 1000.0 * inference_s / max(1, n_test)),
        MetricValue("val_score", result.best_score, note=f"selected on {result.selected_on}"),
        MetricValue("peak_memory_mb", result.peak_memory_mb, note=result.memory_kind),
    ]


def unit_lr(options: Any) -> float:
    """The one learning rate of a unit's options (a grid is narrowed to the unit's value before training)."""
    lr = options.lr
    if isinstance(lr, list):
        if len(lr) != 1:
            raise ValueError(f"a unit trains with one learning rate, got {lr}")
        return float(lr[0])
    return float(lr)


def activation_checkpointing(model: Classifier, backbone: Backbone) -> str:
    """Checkpoint the backbone's blocks (and an appended DeiT's); returns how, for the unit's info."""
    how = enable_activation_checkpointing(backbone)
    deit = model.encoder if isinstance(model.encoder, AppendedDeiT) else None
    if deit is not None:
        how += f"; torch.utils.checkpoint over the appended classifier's {checkpoint_modules(deit.blocks)} blocks"
    return how


def _lr_label(params: dict[str, Any]) -> str:
    return f" lr={params['lr']:g}" if "lr_grid" in params else ""


def train_and_score(model: Classifier, sources: dict[str, Source], options: TrainOptions, ctx: UnitContext,
                    unit: Unit, *, augment: bool, batch_size: int, backbone_lr: float | None,
                    extra_total: int = 0, info: dict[str, Any] | None = None) -> UnitResult:
    """Train with the one loop, select on val, score test; metrics + cost records + info."""
    trainable, total = count_params(model)
    total += extra_total
    if trainable == 0:
        raise ConfigError(f"{unit.protocol}: nothing to train (every parameter is frozen)")
    task = ctx.dataset.task.kind
    volumetric = ctx.dataset.ndim == 3  # a batch is `batch_size` volumes: evaluate with the same
    ckpt = ctx.work_dir / "best.pt" if options.save_checkpoint else None
    cfg = TrainConfig(epochs=options.epochs, lr=unit_lr(options), backbone_lr=backbone_lr,
                      weight_decay=options.weight_decay, warmup_epochs=options.warmup_epochs,
                      schedule=options.schedule, plateau_patience=getattr(options, "plateau_patience", 2),
                      layer_decay=options.layer_decay,
                      grad_clip=options.grad_clip or None, optimizer=options.optimizer, batch_size=batch_size,
                      eval_batch_size=batch_size if volumetric else max(batch_size, ctx.batch_size),
                      patience=options.patience,
                      select_metric=options.select_metric, evals_per_epoch=options.evals_per_epoch,
                      precision=ctx.precision, device=ctx.device, seed=unit.seed, checkpoint=ckpt,
                      protocol=unit.protocol,
                      class_weights=balanced_weights(sources["train"].labels, task, _class_count(ctx.dataset))
                      if options.class_weighting else None, grad_accum=getattr(options, "grad_accum", 1))
    aug = Augmenter(options.augment_spec) if augment and options.augment_spec.active else None
    result = fit(model, sources["train"], sources.get("val"), cfg, task, augment=aug)
    test = sources["test"]
    scores, _, seconds = predict(model, test, cfg, task)
    metrics = classification_metrics(test.labels, scores, task, ctx.dataset.task.class_names,
                                     bootstrap=ctx.bootstrap, seed=unit.seed)
    split_scores = {"test": scores}
    if sources.get("val") is not None and len(sources["val"]):
        split_scores["val"] = predict(model, sources["val"], cfg, task)[0]
    predictions = source_predictions(sources, split_scores, task, ctx.dataset.task.class_names)
    metrics += record_metrics(result, trainable, total, seconds, len(test))
    metrics.append(MetricValue("inference_latency_ms_b1", latency_batch1(model, test, cfg),
                               note="median per-instance time at batch size 1, after one warm-up call"))
    out = dict(info or {})
    out.update(trainable_params=trainable, total_params=total, best_epoch=result.best_epoch,
               best_val=result.best_score, selected_on=result.selected_on, epochs_run=result.epochs_run,
               steps=result.steps, steps_to_best=result.best_step, stopped_early=result.stopped_early,
               train_wall_s=result.train_wall_s, inference_s=seconds, peak_memory_kind=result.memory_kind,
               device=str(ctx.device), precision=ctx.precision, batch_size=batch_size,
               grad_accum=cfg.grad_accum, effective_batch=batch_size * cfg.grad_accum, processes=world_size(),
               augment=list(options.augment) if aug else [], history=result.history,
               train_samples=len(sources["train"]), val_samples=len(sources.get("val") or []),
               test_samples=len(test))
    if ckpt is not None:
        out["checkpoint"] = str(ckpt)
    return UnitResult(metrics, out, predictions=predictions)


def source_predictions(sources: dict[str, Source], scores: dict[str, np.ndarray], task: str,
                       class_names: Any) -> Predictions | None:
    """Per-sample predictions of the scored splits (None when a source does not know its samples)."""
    if any(sources[s].sample_keys is None for s in scores):
        return None
    parts = {s: (sources[s].sample_keys, sources[s].patient_ids, sources[s].labels, sc) for s, sc in scores.items()}
    return classification_predictions(task, class_names, parts,
                                      metadata={s: sources[s].metadata or {} for s in scores})


# --------------------------------------------------------------------------- base protocol
class AdaptProtocol(Protocol):
    """A trainable protocol: subclasses build the model, the shared code trains and scores it."""

    Options: ClassVar[type] = TrainOptions
    backbone_lr_ratio: ClassVar[float] = 0.1  # default backbone_lr = lr * ratio
    uses_store = False  # trains on images, never on cached features

    def supports(self, dataset: ImageDataset) -> str | None:
        return _classification_only(dataset)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.expands = {**cls.__dict__.get("expands", {}), "lr": "lr"}  # every trainable protocol sweeps lr
        own = cls.__dict__.get("variant")
        if own is not None:  # a unit of an lr grid is labelled with its lr
            cls.variant = lambda self, params, _own=own: _own(self, params) + _lr_label(params)

    def sweep(self, options: Any) -> list[dict[str, Any]]:
        """The settings one experiment expands into (one unit each, times the learning rates and seeds)."""
        return [{}]

    def units(self, options: Any, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        base = options.describe()
        lrs = list(dict.fromkeys(options.lr if isinstance(options.lr, list) else [options.lr]))
        grid = {"lr_grid": lrs} if len(lrs) > 1 else {}  # the report picks the best lr (val_score) of a grid
        return [Unit(self.name, {**base, **point, **grid, "lr": lr}, s)
                for point in self.sweep(options) for lr in lrs for s in seeds]

    def variant(self, params: dict[str, Any]) -> str:
        return self.name + _lr_label(params)

    def build(self, unit: Unit, options: Any, ctx: UnitContext) -> tuple[Classifier, Backbone, dict[str, Any]]:
        """The model to train (requires_grad set), the backbone whose preprocessing applies, and info."""
        raise NotImplementedError

    def run(self, unit: Unit, options: Any, ctx: UnitContext) -> UnitResult:
        torch.manual_seed(unit.seed)
        options = dataclasses.replace(options, lr=[float(unit.params["lr"])])  # this unit's value of the grid
        model, backbone, info = self.build(unit, options, ctx)
        if options.activation_checkpointing:
            info["activation_checkpointing"] = activation_checkpointing(model, backbone)
        pre = preprocessor_for(backbone, ctx.dataset, ctx.image_size)
        sources, how = _image_sources(ctx, pre, unit.seed)
        volumetric = ctx.dataset.ndim == 3
        batch_size = options.volume_batch_size if volumetric else (options.batch_size or ctx.batch_size)
        info.update(image_size=pre.image_size, val_from=how, volumetric=volumetric,
                    pooling=options.pooling if volumetric else None)
        backbone_lr = options.backbone_lr if options.backbone_lr is not None else unit_lr(options) * self.backbone_lr_ratio
        return train_and_score(model, sources, options, ctx, unit, augment=True, batch_size=batch_size,
                               backbone_lr=backbone_lr, info=info)

    def classifier(self, encoder: torch.nn.Module, options: Any, ctx: UnitContext) -> Classifier:
        return Classifier(encoder, encoder.out_dim, _class_count(ctx.dataset), pooling=options.pooling,
                          slice_batch=ctx.batch_size)


# --------------------------------------------------------------------------- finetune
@register_protocol
class Finetune(AdaptProtocol):
    name = "finetune"
    summary = ("end-to-end fine-tuning: AdamW, warm-up + cosine, lower backbone lr (+ layer-wise decay), bf16, "
               "grad clipping, best val checkpoint, early stopping, medical augmentations")

    def build(self, unit: Unit, options: TrainOptions, ctx: UnitContext):
        bb = ctx.backbone()
        for p in bb.parameters():
            p.requires_grad_(True)
        return self.classifier(BackboneEncoder(bb, options.head_input), options, ctx), bb, {}


# --------------------------------------------------------------------------- LoRA / BitFit
@dataclass
class LoRAOptions(TrainOptions):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.r >= 1, f"r: the LoRA rank must be >= 1, got {self.r}")
        require(self.alpha > 0, f"alpha: must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, f"dropout: must be within [0, 1), got {self.dropout}")
        require(self.targets is None or len(self.targets) > 0, "targets: give at least one module name")


@register_protocol
class LoRA(AdaptProtocol):
    name = "lora"
    summary = "LoRA adapters (peft) on the blocks' qkv/proj/fc1/fc2 layers + linear head; backbone frozen"
    Options = LoRAOptions

    def variant(self, params: dict[str, Any]) -> str:
        return f"lora r={params['r']}"

    def build(self, unit: Unit, options: LoRAOptions, ctx: UnitContext):
        bb = ctx.backbone()
        info = apply_lora(bb, options.r, options.alpha, options.dropout, options.targets)
        return self.classifier(BackboneEncoder(bb, options.head_input), options, ctx), bb, info


@register_protocol
class BitFit(AdaptProtocol):
    name = "bitfit"
    summary = "BitFit: only the backbone's bias terms and the linear head train"
    backbone_lr_ratio = 1.0

    def build(self, unit: Unit, options: TrainOptions, ctx: UnitContext):
        bb = ctx.backbone()
        n = apply_bitfit(bb)
        return self.classifier(BackboneEncoder(bb, options.head_input), options, ctx), bb, {"bias_tensors": n}


# --------------------------------------------------------------------------- appended DeiT
@dataclass
class DeiTOptions(TrainOptions):
    classifier: Literal["deit_s16", "deit_b16"] = "deit_b16"
    classifier_weights: str = "hub"
    foundation: list[Mode] = field(default_factory=lambda: ["frozen", "unfrozen"])

    def __post_init__(self) -> None:
        super().__post_init__()
        require(len(self.foundation) > 0, "foundation: give frozen and/or unfrozen")


def _appended_deit(bb: Backbone, options: DeiTOptions, ctx: UnitContext) -> AppendedDeiT:
    tiny = bool(getattr(ctx.backbone_config, "tiny", False))
    deit = create_backbone(options.classifier, options.classifier_weights, tiny=tiny)
    return AppendedDeiT(bb, deit)


def _set_frozen(bb: Backbone, frozen: bool) -> None:
    for p in bb.parameters():
        p.requires_grad_(not frozen)


@register_protocol
class DeiTHead(AdaptProtocol):
    name = "deit_head"
    summary = ("the foundation's patch tokens (frozen or unfrozen) projected into a DeiT classifier whose patch "
               "embedding is bypassed; its CLS token predicts")
    Options = DeiTOptions
    expands = {"foundation": "foundation"}

    def sweep(self, options: DeiTOptions) -> list[dict[str, Any]]:
        return [{"foundation": m} for m in dict.fromkeys(options.foundation)]

    def variant(self, params: dict[str, Any]) -> str:
        return f"deit_head {params['classifier']} {params['foundation']}"

    def build(self, unit: Unit, options: DeiTOptions, ctx: UnitContext):
        bb = ctx.backbone()
        _set_frozen(bb, unit.params["foundation"] == "frozen")
        encoder = _appended_deit(bb, options, ctx)
        return self.classifier(encoder, options, ctx), bb, {"classifier": options.classifier,
                                                             "classifier_weights": options.classifier_weights}


# --------------------------------------------------------------------------- progressive freezing
@dataclass
class FreezeOptions(TrainOptions):
    k: list[int | Literal["all"]] = field(default_factory=list)  # "all": every block frozen, only the head trains

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_k([0 if k == "all" else k for k in self.k], "k")


def _check_blocks(k: int, bb: Backbone, key: str) -> None:
    if k > bb.num_blocks:
        raise ConfigError(f"{key}: {k} blocks asked but {bb.name} has {bb.num_blocks} blocks (use 0..{bb.num_blocks})")


@register_protocol
class FreezeBlocks(AdaptProtocol):
    name = "freeze_blocks"
    summary = "progressive freezing: the embeddings and first k blocks frozen, the rest fine-tuned (sweep over k)"
    Options = FreezeOptions
    expands = {"k": "k"}

    def sweep(self, options: FreezeOptions) -> list[dict[str, Any]]:
        return [{"k": k} for k in dict.fromkeys(options.k)]

    def variant(self, params: dict[str, Any]) -> str:
        return f"freeze_blocks k={params['k']}"

    def build(self, unit: Unit, options: FreezeOptions, ctx: UnitContext):
        bb = ctx.backbone()
        k = bb.num_blocks if unit.params["k"] == "all" else int(unit.params["k"])
        _check_blocks(k, bb, "k")
        ids = layer_ids(bb)
        for name, p in bb.named_parameters():  # k = every block: the final norm stays frozen too, only the head trains
            p.requires_grad_(k == 0 or (k < bb.num_blocks and ids[name] > k))
        return self.classifier(BackboneEncoder(bb, options.head_input), options, ctx), bb, {"frozen_blocks": k}


# --------------------------------------------------------------------------- decapitation
@dataclass
class FirstBlocksOptions(DeiTOptions):
    k: list[int] = field(default_factory=list)
    head: Literal["linear", "deit"] = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_k(self.k, "k")
        require(all(k >= 1 for k in self.k), f"k: keep at least 1 block, got {self.k}")


@register_protocol
class FirstBlocks(AdaptProtocol):
    name = "first_blocks"
    summary = "decapitation: only the first k blocks kept as the feature extractor (frozen or fine-tuned)"
    Options = FirstBlocksOptions
    expands = {"k": "k", "foundation": "foundation"}

    def sweep(self, options: FirstBlocksOptions) -> list[dict[str, Any]]:
        return [{"k": k, "foundation": m} for k in dict.fromkeys(options.k) for m in dict.fromkeys(options.foundation)]

    def variant(self, params: dict[str, Any]) -> str:
        return f"first_blocks k={params['k']} {params['foundation']} {params['head']}"

    def build(self, unit: Unit, options: FirstBlocksOptions, ctx: UnitContext):
        bb = ctx.backbone()
        k = int(unit.params["k"])
        _check_blocks(k, bb, "k")
        bb.truncate(k)
        _set_frozen(bb, unit.params["foundation"] == "frozen")
        encoder = _appended_deit(bb, options, ctx) if options.head == "deit" else BackboneEncoder(bb, options.head_input)
        return self.classifier(encoder, options, ctx), bb, {"kept_blocks": k}


# --------------------------------------------------------------------------- from scratch
@dataclass
class ScratchOptions(TrainOptions):
    small_input_stem: Literal["auto", "on", "off"] = "auto"


@register_protocol
class Scratch(AdaptProtocol):
    name = "scratch"
    summary = ("the same loop from random initialisation (CNN/ViT baselines); CIFAR-style stem for small "
               "CNN inputs")
    Options = ScratchOptions
    backbone_lr_ratio = 1.0

    def build(self, unit: Unit, options: ScratchOptions, ctx: UnitContext):
        bc = ctx.backbone_config
        bb = bc.build(weights="random")
        size = ctx.image_size or bb.default_image_size
        stem = None
        if options.small_input_stem == "on" or (options.small_input_stem == "auto" and size <= 64):
            stem = small_input_stem(bb)
        info = {"weights": "random (scratch)", "small_input_stem": stem}
        if not bc.is_random:
            info["note"] = f"configured weights {bc.weights!r} ignored: scratch always starts from random weights"
        return self.classifier(BackboneEncoder(bb, options.head_input), options, ctx), bb, info
