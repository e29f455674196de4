"""The pretraining configuration: a YAML file parsed into typed dataclasses.

Every key is checked (unknown keys, wrong types, out-of-range values) before any model is
built; errors are :class:`~medprobe.errors.ConfigError` naming the key and what is allowed.

Defaults follow DINOv2 (Oquab et al. 2023) with the RAD-DINO changes for radiographs
(Perez-Garcia et al. 2025): larger crops for global and local views, milder blur, no
solarisation and no hue jitter on grayscale images.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from medprobe.backbones.ref import BackboneRef
from medprobe.experiment.config import read_yaml_mapping
from medprobe.options import parse, require

Centering = Literal["sinkhorn_knopp", "softmax"]
Precision = Literal["auto", "bf16", "fp32"]
Interpolation = Literal["bilinear", "bicubic"]


def _pair(where: str, value: list[float], lo: float | None = None, hi: float | None = None,
          increasing: bool = True) -> tuple[float, float]:
    require(len(value) == 2, f"{where}: expected two numbers [start, end], got {value}")
    a, b = float(value[0]), float(value[1])
    if lo is not None:
        require(a >= lo and b >= lo, f"{where}: values must be >= {lo}, got {value}")
    if hi is not None:
        require(a <= hi and b <= hi, f"{where}: values must be <= {hi}, got {value}")
    if increasing:
        require(a <= b, f"{where}: expected [low, high] with low <= high, got {value}")
    return a, b


def _check_source(where: str, adapter: str | None, folder: str | None, root: str | None,
                  options: dict[str, Any], value_range: list[float] | None) -> None:
    require((adapter is None) != (folder is None),
            f"{where}: give exactly one of 'adapter' (with root/options) or 'folder' (a folder of images)")
    if folder is not None:
        require(root is None and not options, f"{where}: 'root' and 'options' belong to 'adapter', not 'folder'")
    if value_range is not None:
        lo, hi = _pair(f"{where}.value_range", value_range)
        require(hi > lo, f"{where}.value_range: expected [low, high] with low < high, got {value_range}")


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources``): an adapter or a folder, and its sampling ``weight``.

    Each batch position draws its source with probability weight / sum(weights); within a
    source, images are taken in a fresh random order each pass (without replacement).
    """

    adapter: str | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    folder: str | None = None
    value_range: list[float] | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_source("data.sources[]", self.adapter, self.folder, self.root, self.options, self.value_range)
        require(self.weight > 0, f"data.sources[].weight must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    """Unlabelled images: a dataset adapter (labels ignored) or a folder of image files, or a
    weighted mixture of several (``sources: [{adapter or folder, ..., weight}, ...]``).

    ``split``: records of this split only (``all`` = every record). ``image_size``: images
    are centre-cropped to a square and, when larger, downscaled to this size before the
    crops are taken (default: ``crops.global_size``). ``value_range``: native intensity
    range mapped to [0, 1] (default: the dataset's, else per-image 0.5-99.5 percentiles).
    """

    adapter: str | None = None
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    split: str = "train"
    folder: str | None = None
    image_size: int | None = None
    value_range: list[float] | None = None
    sources: list[SourceConfig] | None = None

    def __post_init__(self) -> None:
        if self.sources is not None:
            require(len(self.sources) >= 1, "data.sources: give at least one source")
            require(self.adapter is None and self.folder is None and self.root is None and not self.options
                    and self.value_range is None and self.split == "train",
                    "data: with 'sources', give adapter/folder/root/options/split/value_range inside each source")
        else:
            _check_source("data", self.adapter, self.folder, self.root, self.options, self.value_range)
        if self.image_size is not None:
            require(self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}")

    def source_list(self) -> list[SourceConfig]:
        """The sources of the run (one for the single-source form)."""
        if self.sources is not None:
            return list(self.sources)
        return [SourceConfig(self.adapter, self.root, dict(self.options), self.split, self.folder,
                             self.value_range, 1.0)]


CropMode = Literal["area", "side"]


@dataclass
class CropsConfig:
    """Multi-crop: 2 global views and ``n_local`` local views.

    ``mode: area`` (default): random resized crops as torchvision's RandomResizedCrop, scales
    are fractions of the image area, aspect ratios in ``ratio``; the defaults are larger than
    DINOv2's (0.32-1.0 / 0.05-0.32), as RAD-DINO recommends. ``mode: side`` (RAD-DINO,
    appendix E.1): square crops whose side is drawn uniformly from ``global_side`` /
    ``local_side`` pixels (default U(259, 518) and U(104, 259)), stated for a global size of
    ``side_reference`` (518) and scaled by ``global_size / side_reference`` otherwise, capped by
    the image side; each crop is resized to ``global_size`` / ``local_size``.
    """

    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    mode: CropMode = "area"
    global_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.2, 0.5])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    global_side: list[float] = field(default_factory=lambda: [259.0, 518.0])
    local_side: list[float] = field(default_factory=lambda: [104.0, 259.0])
    side_reference: int = 518

    def __post_init__(self) -> None:
        require(self.global_size >= 1, f"crops.global_size must be >= 1, got {self.global_size}")
        require(self.local_size >= 1, f"crops.local_size must be >= 1, got {self.local_size}")
        require(self.n_local >= 0, f"crops.n_local must be >= 0, got {self.n_local}")
        _pair("crops.global_scale", self.global_scale, 1e-4, 1.0)
        _pair("crops.local_scale", self.local_scale, 1e-4, 1.0)
        _pair("crops.ratio", self.ratio, 1e-2)
        require(self.side_reference >= 1, f"crops.side_reference must be >= 1, got {self.side_reference}")
        _pair("crops.global_side", self.global_side, 1.0)
        _pair("crops.local_side", self.local_side, 1.0)

    def side_range(self, which: Literal["global", "local"]) -> tuple[float, float]:
        """The crop-side range in pixels of this run's images (``mode: side``)."""
        lo, hi = self.global_side if which == "global" else self.local_side
        f = self.global_size / self.side_reference
        return float(lo) * f, float(hi) * f


@dataclass
class AugmentConfig:
    """Photometric augmentations (DINOv2's, tuned for radiographs).

    Colour jitter (probability ``jitter_p``) applies brightness and contrast to every image;
    saturation, hue and random grayscale apply to RGB images only. Gaussian blur
    probabilities are for (global view 1, global view 2, local views), sigma in output
    pixels. Solarisation applies to the second global view.
    """

    hflip: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.0
    grayscale_p: float = 0.2
    blur_p: list[float] = field(default_factory=lambda: [0.5, 0.1, 0.2])
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.0])
    solarize_p: float = 0.0
    interpolation: Interpolation = "bicubic"

    def __post_init__(self) -> None:
        for name in ("hflip", "jitter_p", "grayscale_p", "solarize_p"):
            v = getattr(self, name)
            require(0.0 <= v <= 1.0, f"augment.{name} is a probability in [0, 1], got {v}")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            require(0.0 <= v < 1.0, f"augment.{name} must be in [0, 1), got {v}")
        require(0.0 <= self.hue <= 0.5, f"augment.hue must be in [0, 0.5], got {self.hue}")
        require(len(self.blur_p) == 3 and all(0.0 <= p <= 1.0 for p in self.blur_p),
                f"augment.blur_p: expected three probabilities [global1, global2, local], got {self.blur_p}")
        _pair("augment.blur_sigma", self.blur_sigma, 1e-3)


@dataclass
class TrainConfig:
    """Optimisation: AdamW with cosine schedules, EMA teacher, clipping, checkpoints.

    ``batch_size`` is the total over all processes. ``lr`` is the peak learning rate after
    ``warmup_steps`` of linear warm-up, then cosine to ``min_lr``. ``weight_decay``,
    ``momentum`` (teacher EMA) follow cosine schedules from start to end; ``teacher_temp``
    warms up linearly over ``teacher_temp_warmup_steps``, then stays at its end value.
    ``layer_decay`` scales the lr of block i by decay**(depth + 1 - i) (1 = off);
    ``freeze_last_layer_steps`` keeps the prototypes fixed at the start. ``max_minutes``
    stops this invocation early (checkpoint and teacher written) when the time is up; running
    again continues the same schedules. ``workers``: processes
    building the augmented batches (0 = in the training process; results are identical).
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: list[float] = field(default_factory=lambda: [0.04, 0.2])
    momentum: list[float] = field(default_factory=lambda: [0.992, 1.0])
    teacher_temp: list[float] = field(default_factory=lambda: [0.04, 0.07])
    teacher_temp_warmup_steps: int = 300
    student_temp: float = 0.1
    clip_grad: float = 3.0
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_steps: int = 0
    drop_path: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    precision: Precision = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    max_minutes: float | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        require(self.workers >= 0, f"train.workers must be >= 0 (0 = build batches in the training process), "
                                   f"got {self.workers}")
        require(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, lr], got {self.min_lr}")
        require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _pair("train.weight_decay", self.weight_decay, 0.0, increasing=False)
        _pair("train.momentum", self.momentum, 0.0, 1.0, increasing=False)
        _pair("train.teacher_temp", self.teacher_temp, 1e-4, increasing=False)
        require(self.teacher_temp_warmup_steps >= 0,
                f"train.teacher_temp_warmup_steps must be >= 0, got {self.teacher_temp_warmup_steps}")
        require(self.student_temp > 0, f"train.student_temp must be > 0, got {self.student_temp}")
        require(self.clip_grad >= 0, f"train.clip_grad must be >= 0 (0 = no clipping), got {self.clip_grad}")
        require(0 < self.layer_decay <= 1, f"train.layer_decay must be in (0, 1], got {self.layer_decay}")
        require(self.patch_embed_lr_mult > 0, f"train.patch_embed_lr_mult must be > 0, got {self.patch_embed_lr_mult}")
        require(self.freeze_last_layer_steps >= 0,
                f"train.freeze_last_layer_steps must be >= 0, got {self.freeze_last_layer_steps}")
        require(0 <= self.drop_path < 1, f"train.drop_path must be in [0, 1), got {self.drop_path}")
        _pair("train.betas", self.betas, 0.0, 0.999999, increasing=False)
        require(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        require(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        require(self.keep_checkpoints >= 0,
                f"train.keep_checkpoints must be >= 0 (0 = keep all), got {self.keep_checkpoints}")
        if self.max_minutes is not None:
            require(self.max_minutes > 0, f"train.max_minutes must be > 0, got {self.max_minutes}")


@dataclass
class LossConfig:
    """Heads and losses: DINO (image level), iBOT (masked patches), KoLeo; centring of the teacher."""

    prototypes: int = 4096
    ibot_prototypes: int = 4096
    separate_ibot_head: bool = True
    head_hidden: int = 2048
    bottleneck: int = 256
    head_layers: int = 3
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])
    mask_probability: float = 0.5
    centering: Centering = "sinkhorn_knopp"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3

    def __post_init__(self) -> None:
        for name in ("prototypes", "ibot_prototypes", "head_hidden", "bottleneck"):
            require(getattr(self, name) >= 2, f"loss.{name} must be >= 2, got {getattr(self, name)}")
        require(self.head_layers >= 1, f"loss.head_layers must be >= 1, got {self.head_layers}")
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            require(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        require(self.dino_weight > 0 or self.ibot_weight > 0, "loss: dino_weight and ibot_weight cannot both be 0")
        _pair("loss.mask_ratio", self.mask_ratio, 0.0, 1.0)
        require(0 <= self.mask_probability <= 1,
                f"loss.mask_probability is a probability in [0, 1], got {self.mask_probability}")
        require(0 <= self.center_momentum < 1, f"loss.center_momentum must be in [0, 1), got {self.center_momentum}")
        require(self.sinkhorn_iterations >= 1, f"loss.sinkhorn_iterations must be >= 1, got {self.sinkhorn_iterations}")


@dataclass
class HeadsConfig:
    """Initial DINO/iBOT head weights: ``weights`` is a DINOv2 training checkpoint (``teacher_checkpoint.pth``:
    ``{"teacher": {"dino_head.*", "ibot_head.*", ...}}``, a full ``{"model": {"teacher.*", "student.*"}}``
    checkpoint, or a bare ``dino_head.*``/``ibot_head.*`` state dict); ``which`` picks the teacher's or the
    student's heads of a full checkpoint. Every head tensor must fit ``loss`` (prototypes, widths, layers)."""

    weights: str | None = None
    which: Literal["teacher", "student"] = "teacher"


ProbeMetric = Literal["auroc", "auprc", "accuracy", "loss"]


@dataclass
class ProbeConfig:
    """A linear probe evaluated every ``every`` steps on the frozen EMA teacher (model selection, early stopping).

    The labelled dataset (``adapter``, ``root``, ``options``) is read once: ``train_split``
    images fit an L-BFGS logistic regression (scikit-learn, ``C``) on the teacher's CLS
    features (``features: cls_mean`` appends the mean patch token), scored on ``eval_split``
    with ``metric`` (``loss`` = the log-loss, lower is better). ``patience`` > 0 stops the
    run after that many evaluations without an improvement of more than ``min_delta``; the
    best teacher is kept as ``teacher_best.pth``. ``max_images`` caps each split (first N).
    """

    adapter: str
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "val"
    every: int = 100
    metric: ProbeMetric = "auroc"
    patience: int = 0
    min_delta: float = 0.0
    features: Literal["cls", "cls_mean"] = "cls"
    image_size: int | None = None
    batch_size: int = 64
    C: float = 1.0
    max_iter: int = 1000
    max_images: int | None = None

    def __post_init__(self) -> None:
        require(self.every >= 1, f"probe.every must be >= 1, got {self.every}")
        require(self.patience >= 0, f"probe.patience must be >= 0 (0 = no early stopping), got {self.patience}")
        require(self.min_delta >= 0, f"probe.min_delta must be >= 0, got {self.min_delta}")
        require(self.batch_size >= 1, f"probe.batch_size must be >= 1, got {self.batch_size}")
        require(self.C > 0, f"probe.C must be > 0, got {self.C}")
        require(self.max_iter >= 1, f"probe.max_iter must be >= 1, got {self.max_iter}")
        if self.image_size is not None:
            require(self.image_size >= 8, f"probe.image_size must be >= 8, got {self.image_size}")
        if self.max_images is not None:
            require(self.max_images >= 2, f"probe.max_images must be >= 2, got {self.max_images}")


@dataclass
class PretrainConfig:
    """A whole pretraining run (see ``docs`` in :mod:`medprobe.pretrain`)."""

    backbone: BackboneRef
    data: DataConfig
    name: str = "pretrain"
    output_dir: str = "runs/pretrain"
    crops: CropsConfig = field(default_factory=CropsConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    probe: ProbeConfig | None = None

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint_dict(self) -> dict[str, Any]:
        """What must match for a run to be resumed (run length and bookkeeping may change)."""
        d = copy.deepcopy(self.to_dict())
        d.pop("name", None)
        d.pop("output_dir", None)
        for k in ("checkpoint_every", "keep_checkpoints", "max_minutes", "device", "workers"):
            d["train"].pop(k, None)
        return json.loads(json.dumps(d))


def parse_pretrain_config(raw: Any, where: str = "pretrain") -> PretrainConfig:
    """Validate a mapping (as read from YAML) into a :class:`PretrainConfig`."""
    return parse(PretrainConfig, raw, where)


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read and validate a pretraining YAML file; relative paths stay relative to the working directory."""
    return parse_pretrain_config(read_yaml_mapping(path, "pretraining file", overrides), Path(path).name)
