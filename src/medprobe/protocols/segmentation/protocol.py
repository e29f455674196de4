"""The ``segmentation`` protocol: decoders on a frozen backbone, and scratch baselines.

Experiment file::

    protocols:
      segmentation:
        decoders: [linear, unet, upernet, vitdet, unet_scratch, transunet_scratch]
        epochs: 20
        shots: [1, 4, 16]      # optional few-shot: n training images/volumes, `draws` draws each
        draws: 3
        surface: true          # HD95, ASSD, NSD in mm (voxel spacing from the volume's affine)
        tolerance_mm: 1.0      # NSD tolerance
        empty: one             # class absent from truth and prediction: Dice/Jaccard/NSD 1 (one) or NaN (nan)
        width: paper           # decoder widths giving the papers' parameter counts (or a number of channels)
        augment: true          # paired augmentations, image and mask alike:
        augmentations: [hflip, affine, elastic, brightness_contrast, gamma]

One unit per decoder x seed (and per decoder x shots x draw). Frozen decoders train on the
cached multi-block patch grids of the feature store when ``augment`` is off (the backbone
runs once, at extraction); with ``augment`` on, the backbone runs on every augmented batch
under ``torch.inference_mode``. 3D volumes are cut into slices along ``slice_axis``, slices
are predicted in batches and reassembled, and metrics are computed per volume.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medprobe.backbones.base import Backbone
from medprobe.data.base import ImageDataset, record_metadata
from medprobe.distributed import is_main_process, world_size
from medprobe.errors import ConfigError, DataError
from medprobe.fsutil import slug
from medprobe.options import require
from medprobe.features.extract import preprocessor_for
from medprobe.data.volume import to_source
from medprobe.metrics import SURFACE_METRICS, MetricValue, segmentation_metrics
from medprobe.predictions import Predictions, SplitPredictions
from medprobe.protocols.base import ArchInfo, FeatureNeeds, Protocol, Unit, UnitContext, UnitResult
from medprobe.protocols.checkpointing import checkpoint_modules
from medprobe.protocols.segmentation import overlays
from medprobe.protocols.segmentation.augment import DEFAULT_SEG_AUGMENT, augment_names
from medprobe.protocols.segmentation.decoders import FROZEN_DECODERS, MULTI_BLOCK, build_decoder, count_trainable, \
    resolve_width, width_identity
from medprobe.protocols.segmentation.items import Geometry, SplitItems, build_items, input_images, input_masks, \
    load_case
from medprobe.protocols.segmentation.losses import DiceCELoss
from medprobe.protocols.segmentation.scratch import SCRATCH_MODELS, TRANSUNET_VARIANT, TransUNet, build_scratch
from medprobe.protocols.segmentation.train import FrozenSegmenter, GridSource, ImageSource, fit, predict
from medprobe.protocols.segmentation.volumes import aggregate, foreground_slice, from_slices, iter_cases, to_slices, \
    voxel_spacing, write_nifti

Decoder = Literal["linear", "unet", "upernet", "vitdet", "unet_scratch", "transunet_scratch"]
SegAugmentation = Literal["affine", "hflip", "elastic", "brightness_contrast", "gamma"]
ALL_DECODERS: tuple[str, ...] = FROZEN_DECODERS + SCRATCH_MODELS


@dataclass
class ScratchOptions:
    """Sizes of the from-scratch baselines (U-Net base width 64 = the original 31 M-parameter U-Net)."""

    unet_width: int = 64
    vit_dim: int = 384
    vit_depth: int = 12
    vit_heads: int = 6
    lr: float | None = None  # default: the protocol's lr

    def __post_init__(self) -> None:
        require(self.unet_width >= 1, f"scratch.unet_width: must be >= 1, got {self.unet_width}")
        require(self.vit_depth >= 1, f"scratch.vit_depth: must be >= 1, got {self.vit_depth}")
        require(self.vit_heads >= 1 and self.vit_dim % self.vit_heads == 0,
                f"scratch.vit_dim ({self.vit_dim}) must be a multiple of scratch.vit_heads ({self.vit_heads})")
        require(self.lr is None or self.lr > 0, f"scratch.lr: must be > 0, got {self.lr}")


@dataclass
class SegmentationOptions:
    decoders: list[Decoder] = field(default_factory=lambda: ["linear", "unet"])
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    # channels of the unet/upernet/vitdet decoders (unet: width, /2, /4, /8), or "paper": the width giving the
    # studies' parameter counts (unet 17M on ViT-L, upernet 39.3M / vitdet 24.8M on 768-d features; decoders.PAPER_WIDTHS)
    width: int | Literal["paper"] = 128
    blocks: list[int] | None = None  # the four blocks feeding unet/upernet; default evenly spaced, last = last block
    augment: bool = False
    # with augment on: which paired augmentations (image and mask alike; segmentation.augment.SEG_AUGMENTATIONS)
    augmentations: list[SegAugmentation] = field(default_factory=lambda: list(DEFAULT_SEG_AUGMENT))
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    class_weights: list[float] | None = None  # one per class, background first
    include_background: bool = False  # in the class-mean metrics
    hd95: bool = False
    surface: bool = False  # HD95, ASSD and NSD (spacing-aware, in mm for volumes with an affine)
    tolerance_mm: float = 1.0  # NSD tolerance
    empty: Literal["one", "nan"] = "one"  # a class absent from truth and prediction: Dice/Jaccard/NSD 1 or NaN
    shots: list[int] = field(default_factory=list)  # few-shot: numbers of training images/volumes
    draws: int = 3  # few-shot draws per number of shots
    full_data: bool = True  # also train on the whole training split
    select_best: bool = True  # keep the epoch with the lowest validation loss
    slice_axis: int = 0  # 3D: slice volumes (D, H, W) along this axis
    overlays: int = 3  # test cases drawn as PNG overlays (0 = none)
    write_nifti: bool = False  # 3D: write test predictions as NIfTI with the source affine
    scratch: ScratchOptions = field(default_factory=ScratchOptions)
    # memory for time: an optimizer step takes batch_size x grad_accum samples in grad_accum micro-batches
    # (torchrun processes share every micro-batch and do not change it); activation_checkpointing recomputes
    # the transformer blocks of transunet_scratch in the backward pass (frozen backbones store nothing)
    grad_accum: int = 1
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        require(len(self.decoders) > 0, f"decoders: name at least one of {', '.join(ALL_DECODERS)}")
        require(len(set(self.decoders)) == len(self.decoders), f"decoders: listed twice in {self.decoders}")
        require(self.epochs >= 1, f"epochs: must be >= 1, got {self.epochs}")
        require(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"grad_accum: must be >= 1 micro-batches per step, got {self.grad_accum}")
        require(self.width == "paper" or self.width >= 8, f"width: must be >= 8 or 'paper', got {self.width}")
        augment_names(self.augmentations)  # repeated names fail here
        require(not self.augment or len(self.augmentations) > 0,
                "augmentations: name at least one with augment: true (or set augment: false)")
        require(self.blocks is None or len(self.blocks) == 4,
                f"blocks: give exactly four block indices (e.g. [2, 5, 8, 11]), got {self.blocks}")
        require(self.dice_weight >= 0 and self.ce_weight >= 0 and self.dice_weight + self.ce_weight > 0,
                f"dice_weight/ce_weight: must be >= 0 and not both 0, got {self.dice_weight}/{self.ce_weight}")
        require(self.class_weights is None or all(w >= 0 for w in self.class_weights) and sum(self.class_weights) > 0,
                f"class_weights: must be >= 0 with a positive sum, got {self.class_weights}")
        require(all(n >= 1 for n in self.shots), f"shots: every value must be >= 1, got {self.shots}")
        require(self.draws >= 1, f"draws: must be >= 1, got {self.draws}")
        require(self.full_data or bool(self.shots), "full_data: false needs a list of shots")
        require(self.slice_axis in (0, 1, 2), f"slice_axis: must be 0, 1 or 2, got {self.slice_axis}")
        require(self.overlays >= 0, f"overlays: must be >= 0, got {self.overlays}")
        require(self.tolerance_mm >= 0, f"tolerance_mm: must be >= 0, got {self.tolerance_mm}")
        require(self.empty in ("one", "nan"), f"empty: must be one or nan, got {self.empty!r}")


def _checkpointing(model: torch.nn.Module) -> str:
    """Activation checkpointing where it saves memory without changing results: transformer blocks."""
    blocks = getattr(model, "blocks", None)
    if isinstance(model, TransUNet) and blocks is not None:
        return f"torch.utils.checkpoint over {checkpoint_modules(blocks)} transformer blocks"
    if isinstance(model, FrozenSegmenter):
        return "not applied: the frozen backbone runs without gradients and stores no activations"
    return "not applied: BatchNorm statistics would be updated twice by the recomputation"


def default_blocks(num_blocks: int) -> list[int]:
    """Four evenly spaced blocks ending with the last one (12 blocks -> 2, 5, 8, 11)."""
    return [max(0, int(np.ceil((k + 1) * num_blocks / 4)) - 1) for k in range(4)]


def overlay_cases(n: int, k: int) -> set[int]:
    """``k`` test cases spread evenly over the ``n`` test cases (the first, the last, between)."""
    if k <= 0 or n <= 0:
        return set()
    return {int(round(x)) for x in np.linspace(0, n - 1, min(k, n))}


# --------------------------------------------------------------------------- shared state
@dataclass
class SegState:
    """What the units of one dataset x backbone share (kept in ``ctx.memo``)."""

    backbone: Backbone
    pre: Any
    geometry: Geometry
    skip_blocks: list[int]
    last_block: int
    multi_block: bool = True  # some decoder is fed four blocks (else only the last block is cached)
    items: dict[str, SplitItems] = field(default_factory=dict)

    @property
    def store_blocks(self) -> tuple[int, ...]:
        """Blocks whose patch grids are cached: the skip blocks (when needed) and the last block."""
        return tuple(sorted(set(self.skip_blocks if self.multi_block else []) | {self.last_block}))


def _state(ctx: UnitContext, options: SegmentationOptions) -> SegState:
    key = "segmentation:state"
    if key not in ctx.memo:
        with torch.random.fork_rng():  # a random-weight backbone is the same whatever unit builds it
            torch.manual_seed(0)
            backbone = ctx.backbone()
        backbone = backbone.to(ctx.device).eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        pre = preprocessor_for(backbone, ctx.dataset, ctx.image_size)
        if options.blocks is not None:
            skips = backbone.resolve_blocks(options.blocks)
        else:
            skips = default_blocks(backbone.num_blocks)
        ctx.memo[key] = SegState(backbone, pre, Geometry(pre.image_size, backbone.preprocess.resize), skips,
                                 backbone.num_blocks - 1, any(d in MULTI_BLOCK for d in options.decoders))
    return ctx.memo[key]


def _items(state: SegState, dataset: ImageDataset, split: str, axis: int) -> SplitItems:
    key = f"{split}:{axis}"
    if key not in state.items:
        state.items[key] = build_items(dataset, split, axis)
    return state.items[key]


def _memory_grids(state: SegState, dataset: ImageDataset, items: SplitItems, ctx: UnitContext) -> list[np.ndarray]:
    """Grids of the store blocks for every item, computed with the backbone (float16, in memory)."""
    key = f"grids:{state.store_blocks}"
    if key not in items.cache:
        images = input_images(dataset, items, state.pre)
        seg = FrozenSegmenter(torch.nn.Identity(), (1, 1), state.backbone, state.store_blocks, ctx.precision)
        parts: list[list[np.ndarray]] = [[] for _ in state.store_blocks]
        for pos in np.array_split(np.arange(len(items)), max(1, int(np.ceil(len(items) / ctx.batch_size)))):
            if len(pos) == 0:
                continue
            x = torch.from_numpy(images[pos].astype(np.float32)).to(ctx.device)
            for k, g in enumerate(seg.grids(x)):
                parts[k].append(g.to(torch.float16).cpu().numpy())
        items.cache[key] = [np.concatenate(p) for p in parts]
    return items.cache[key]


def _grid_arrays(state: SegState, ctx: UnitContext, options: SegmentationOptions, split: str,
                 items: SplitItems) -> dict[int, Any]:
    """block index -> (n_items, D, h, w) grids of ``split``: the feature store, or memory when it can't serve."""
    if options.slice_axis == 0 and not options.augment:
        store = ctx.features(FeatureNeeds(last_blocks=1, patch_blocks=state.store_blocks))
        if split not in store.splits:
            raise ConfigError(f"the feature store has no {split!r} split")
        arrays = {b: store.array(split, f"patch.{b}") for b in state.store_blocks}
        n = next(iter(arrays.values())).shape[0]
        if n != len(items):
            raise DataError(f"{ctx.dataset_name}: the feature store holds {n} {split} items but the dataset has "
                            f"{len(items)}; remove the stale cache folder {store.path}")
        return arrays
    return dict(zip(state.store_blocks, _memory_grids(state, ctx.dataset, items, ctx)))


# --------------------------------------------------------------------------- protocol
class Segmentation(Protocol):
    name = "segmentation"
    summary = ("segmentation decoders (linear, unet, upernet, vitdet) on frozen patch grids, U-Net and TransUNet "
               "(pure-ViT variant) from scratch; Dice+CE, per-image/volume Dice, Jaccard and their mean")
    Options = SegmentationOptions

    expands = {"decoders": "decoder", "shots": "shots"}

    def feature_needs(self, options: SegmentationOptions, arch: ArchInfo | None = None) -> FeatureNeeds:
        """The patch grids the frozen decoders read from the store (the blocks of ``SegState.store_blocks``)."""
        frozen = [d for d in options.decoders if d not in SCRATCH_MODELS]
        if arch is None or not frozen or options.slice_axis != 0 or options.augment:
            return FeatureNeeds(1)
        n = arch.num_blocks
        skips = [b + n if b < 0 else b for b in options.blocks] if options.blocks is not None else default_blocks(n)
        multi = any(d in MULTI_BLOCK for d in frozen)
        return FeatureNeeds(1, tuple(sorted(set(skips if multi else []) | {n - 1})))

    def supports(self, dataset: ImageDataset) -> str | None:
        if dataset.task.kind != "segmentation":
            return f"needs a segmentation dataset (masks), {dataset.name} is {dataset.task.kind}"
        return None

    def variant(self, params: dict[str, Any]) -> str:
        out = params["decoder"]
        if params.get("augment"):
            names = params.get("augmentations")
            out += " aug(" + "+".join(names) + ")" if names else " aug"
        if params.get("shots"):
            out += f" {params['shots']}-shot"
        return out

    def units(self, options: SegmentationOptions, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        where = "protocols.segmentation"
        c = dataset.task.num_classes
        if options.class_weights is not None and len(options.class_weights) != c:
            raise ConfigError(f"{where}.class_weights: {len(options.class_weights)} weights for the {c} classes of "
                              f"{dataset.name} ({', '.join(dataset.task.class_names)}), background first")
        for split in ("train", "test"):
            if not len(dataset.indices(split)):
                raise ConfigError(f"{where}: dataset {dataset.name} has no {split!r} split")
        n_train = len(dataset.indices("train"))
        if options.shots and max(options.shots) > n_train:
            raise ConfigError(f"{where}.shots: {max(options.shots)} training "
                              f"{'volumes' if dataset.ndim == 3 else 'images'} asked, {dataset.name} has {n_train}")
        out = []
        for d in options.decoders:
            params = self._params(options, d)
            if options.full_data:
                out += [Unit(self.name, dict(params, shots=None, draw=None), s) for s in seeds]
            out += [Unit(self.name, dict(params, shots=n, draw=r), r) for n in options.shots
                    for r in range(options.draws)]
        return out

    @staticmethod
    def _params(options: SegmentationOptions, decoder: str) -> dict[str, Any]:
        p: dict[str, Any] = {"decoder": decoder, "epochs": options.epochs, "lr": options.lr,
                             "weight_decay": options.weight_decay, "batch_size": options.batch_size,
                             "dice_weight": options.dice_weight, "ce_weight": options.ce_weight,
                             "class_weights": options.class_weights, "select_best": options.select_best,
                             "slice_axis": options.slice_axis, "augment": options.augment}
        if options.augment and tuple(options.augmentations) != DEFAULT_SEG_AUGMENT:
            p["augmentations"] = list(options.augmentations)
        if decoder in ("unet", "upernet", "vitdet"):
            p["width"] = width_identity(decoder, options.width)
        if decoder in MULTI_BLOCK:
            p["blocks"] = options.blocks
        if decoder in SCRATCH_MODELS:
            s = options.scratch
            p["scratch"] = {"unet_width": s.unet_width} if decoder == "unet_scratch" else \
                {"vit_dim": s.vit_dim, "vit_depth": s.vit_depth, "vit_heads": s.vit_heads}
            if s.lr is not None:
                p["lr"] = s.lr
        return p

    # ------------------------------------------------------------------ run
    def run(self, unit: Unit, options: SegmentationOptions, ctx: UnitContext) -> UnitResult:
        t0 = time.perf_counter()
        p = unit.params
        decoder_name = p["decoder"]
        ds = ctx.dataset
        state = _state(ctx, options)
        axis = options.slice_axis if ds.ndim == 3 else 0
        train_items = _items(state, ds, "train", axis)
        has_val = len(ds.indices("val")) > 0
        val_items = _items(state, ds, "val", axis) if has_val else None
        test_items = _items(state, ds, "test", axis)
        num_classes = ds.task.num_classes

        # training cases: all, or a few-shot draw (the same draw for every decoder)
        if p.get("shots"):
            rng = np.random.default_rng([int(p["shots"]), int(p["draw"]), 2024])
            cases = np.sort(rng.choice(len(train_items.records), size=int(p["shots"]), replace=False))
        else:
            cases = np.arange(len(train_items.records))
        train_rows = train_items.rows_of(cases)
        train_masks = input_masks(ds, train_items, state.geometry)
        val_masks = input_masks(ds, val_items, state.geometry) if val_items is not None else None
        size = (state.geometry.size, state.geometry.size)

        scratch = decoder_name in SCRATCH_MODELS
        info: dict[str, Any] = {"decoder": decoder_name, "image_size": state.geometry.size,
                                "train_cases": int(len(cases)), "train_items": int(len(train_rows)),
                                "test_cases": int(len(test_items.records)),
                                "augment": list(options.augmentations) if options.augment else []}
        if p.get("shots"):
            info["train_keys"] = [ds.records[int(train_items.records[c])].key for c in cases]
        if scratch:
            pre = state.pre
            train_src: Any = ImageSource(input_images(ds, train_items, pre), train_masks, train_rows)
            val_src: Any = ImageSource(input_images(ds, val_items, pre), val_masks,
                                       np.arange(len(val_items))) if val_items is not None else None
            test_src: Any = ImageSource(input_images(ds, test_items, pre), None, np.arange(len(test_items)))
            info["input"] = "images"
        else:
            blocks = state.skip_blocks if decoder_name in MULTI_BLOCK else [state.last_block]
            val_grids = _grid_arrays(state, ctx, options, "val", val_items) if val_items is not None else None
            test_grids = _grid_arrays(state, ctx, options, "test", test_items)
            if options.augment:
                train_src = ImageSource(input_images(ds, train_items, state.pre), train_masks, train_rows)
                info["input"] = "augmented images through the frozen backbone (inference mode)"
            else:
                train_grids = _grid_arrays(state, ctx, options, "train", train_items)
                train_src = GridSource([train_grids[b] for b in blocks], train_masks, train_rows)
                info["input"] = "cached patch grids (" + ("feature store" if axis == 0 else "memory") + ")"
            val_src = GridSource([val_grids[b] for b in blocks], val_masks, np.arange(len(val_items))) \
                if val_grids is not None else None
            test_src = GridSource([test_grids[b] for b in blocks], None, np.arange(len(test_items)))
            info["blocks"] = list(blocks)

        torch.manual_seed(unit.seed)  # the same initialisation for a seed, whatever ran before
        if scratch:
            sc = options.scratch
            model: torch.nn.Module = build_scratch(decoder_name, num_classes, unet_width=sc.unet_width,
                                                   vit_dim=sc.vit_dim, vit_depth=sc.vit_depth, vit_heads=sc.vit_heads)
            info["model"] = TRANSUNET_VARIANT if decoder_name == "transunet_scratch" else \
                f"U-Net (Ronneberger et al. 2015, batch norm), base width {sc.unet_width}"
            total_params = count_trainable(model)
        else:
            dims = [int(test_grids[b].shape[1]) for b in blocks]
            width = resolve_width(decoder_name, options.width, dims)
            decoder = build_decoder(decoder_name, dims, num_classes, width)
            if decoder_name != "linear":
                info["width"] = width
            model = FrozenSegmenter(decoder, size, state.backbone, blocks, ctx.precision)
            total_params = count_trainable(decoder) + sum(q.numel() for q in state.backbone.parameters())
        trainable = count_trainable(model)
        if options.activation_checkpointing:
            info["activation_checkpointing"] = _checkpointing(model)
        info.update(grad_accum=options.grad_accum, effective_batch=options.batch_size * options.grad_accum,
                    processes=world_size())
        loss_fn = DiceCELoss(num_classes, dice_weight=options.dice_weight, ce_weight=options.ce_weight,
                             class_weights=options.class_weights).to(ctx.device)
        result = fit(model, train_src, val_src, loss_fn, epochs=options.epochs, lr=float(p["lr"]),
                     weight_decay=options.weight_decay, batch_size=options.batch_size, seed=unit.seed,
                     device=ctx.device, augment=tuple(options.augmentations) if options.augment else (),
                     select_best=options.select_best,
                     grad_accum=options.grad_accum)
        info.update(best_epoch=result.best_epoch, selected_on=result.selected_on, train_s=round(result.seconds, 3),
                    history=[{k: round(v, 5) for k, v in h.items()} for h in result.history],
                    trainable_params=trainable, total_params=int(total_params),
                    backbone_calls_in_training=getattr(model, "backbone_calls", 0))

        t1 = time.perf_counter()
        per_case, pictures, written = self._evaluate(model, test_src, test_items, options, ctx, state,
                                                     overlay=not p.get("shots") and is_main_process())
        info["predict_s"] = round(time.perf_counter() - t1, 3)
        metrics = aggregate(per_case, bootstrap=ctx.bootstrap, seed=unit.seed)
        predictions = case_predictions(ds, test_items.records, per_case)
        metrics.append(MetricValue(metric="trainable_params", value=float(trainable), cls=None, ci_low=None,
                                   ci_high=None, note=None))
        if written:
            info["nifti"] = [str(w) for w in written]
        if pictures:
            plots = ctx.plots_dir or ctx.work_dir / "plots"
            folder = plots / ".segmentation" / slug(f"{ctx.dataset_name}__{ctx.backbone_name}")
            overlays.save_cases(folder, self.variant(p), unit.seed, pictures)
            pngs = overlays.draw(folder, plots, f"{ctx.dataset_name}_{ctx.backbone_name}",
                                 ds.task.class_names, order=options.decoders)
            info["overlays"] = [str(x) for x in pngs]
        info["wall_s"] = round(time.perf_counter() - t0, 3)
        return UnitResult(metrics, info, predictions=predictions)

    def _evaluate(self, model: torch.nn.Module, source: Any, items: SplitItems, options: SegmentationOptions,
                  ctx: UnitContext, state: SegState, overlay: bool
                  ) -> tuple[list[list[MetricValue]], list[overlays.CasePicture], list[Path]]:
        """Predict the test items in batches, reassemble them into cases, score each case."""
        per_case: list[list[MetricValue]] = []
        pictures: list[overlays.CasePicture] = []
        written: list[Path] = []

        def item_labels() -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
            for pos, logits in predict(model, source, ctx.batch_size, ctx.device):
                labels = []
                for k, row in enumerate(pos):
                    native = state.geometry.logits_to_native(logits[k:k + 1], items.item_shape(int(items.owner[row])))
                    labels.append(native[0].argmax(dim=0).to(torch.int16).cpu().numpy())
                yield pos, labels

        for case, parts in iter_cases(items.owner, item_labels()):
            if case != len(per_case):
                raise RuntimeError(f"test items out of case order: case {case} after {len(per_case)} cases")
            per_case.append(self._score_case(case, parts, items, options, ctx, overlay, pictures, written))
        if len(per_case) != len(items.records):
            raise RuntimeError(f"reassembled {len(per_case)} of {len(items.records)} test cases")
        return per_case, pictures, written

    def _score_case(self, case: int, parts: list[np.ndarray], items: SplitItems, options: SegmentationOptions,
                    ctx: UnitContext, overlay: bool, pictures: list[overlays.CasePicture], written: list[Path]
                    ) -> list[MetricValue]:
        ds = ctx.dataset
        index = int(items.records[case])
        image, mask = load_case(ds, index)
        volumetric = ds.ndim == 3
        pred = from_slices(parts, items.slice_axis) if volumetric else parts[0]
        spacing = None
        if volumetric and hasattr(ds, "affine"):
            spacing = voxel_spacing(ds.affine(index))
        values = segmentation_metrics(pred, mask, ds.task.num_classes, ds.task.class_names,
                                      include_background=options.include_background, hd95=options.hd95,
                                      spacing=spacing, surface=SURFACE_METRICS if options.surface else (),
                                      tolerance_mm=options.tolerance_mm, empty=options.empty)
        key = ds.records[index].key
        if volumetric and options.write_nifti and is_main_process():  # under torchrun, rank 0 alone writes
            target = ctx.work_dir / "predictions" / f"{slug(key)}.nii.gz"
            if callable(getattr(ds, "geometry", None)) and getattr(ds, "orientation", "canonical") == "canonical":
                geom = ds.geometry(index)  # back to the file's own grid and axis order
                written.append(write_nifti(target, to_source(pred, geom), geom.source_affine))
            else:
                affine = ds.affine(index) if hasattr(ds, "affine") else np.eye(4)
                written.append(write_nifti(target, pred, affine,
                                           getattr(ds, "slice_axis", None) if hasattr(ds, "affine") else None))
        if overlay and case in overlay_cases(len(items.records), options.overlays):
            img = image if image.ndim == 2 else (image.mean(axis=-1) if not volumetric else image)
            if volumetric:
                z = foreground_slice(mask, items.slice_axis)
                img, truth, pr = (to_slices(a, items.slice_axis)[z] for a in (image, mask, pred))
                key = f"{key} slice {z}"
            else:
                truth, pr = mask, pred
            pictures.append(overlays.CasePicture(key, np.asarray(img, np.float32), np.asarray(truth), np.asarray(pr)))
        return values


def case_predictions(dataset: ImageDataset, indices: Any, per_case: list[list[MetricValue]]) -> Predictions:
    """Per-case metrics of the test split as stored predictions: one column per metric (``dice`` for the
    class mean, ``dice.<class>`` per class), a row per image or volume in ``indices`` order."""
    records = [dataset.records[int(i)] for i in indices]
    names = list(dict.fromkeys(m.metric if m.cls is None else f"{m.metric}.{m.cls}" for case in per_case
                               for m in case))
    columns = {n: np.full(len(records), np.nan) for n in names}
    for row, case in enumerate(per_case):
        for m in case:
            value = m.value if m.value is not None else np.nan
            columns[m.metric if m.cls is None else f"{m.metric}.{m.cls}"][row] = value
    out = Predictions("segmentation", "segmentation", tuple(dataset.task.class_names))
    out.splits["test"] = SplitPredictions([r.key for r in records], [r.patient_id for r in records], columns,
                                          record_metadata(records))
    return out
