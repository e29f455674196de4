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


@dataclass
class DataConfig:
    """Unlabelled images: a dataset adapter (labels ignored) or a folder of image files.

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

    def __post_init__(self) -> None:
        require((self.adapter is None) != (self.folder is None),
                "data: give exactly one of 'adapter' (with root/options) or 'folder' (a folder of images)")
        if self.folder is not None:
            require(self.root is None and not self.options, "data: 'root' and 'options' belong to 'adapter', "
                    "not 'folder'")
        if self.image_size is not None:
            require(self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}")
        if self.value_range is not None:
            lo, hi = _pair("data.value_range", self.value_range)
            require(hi > lo, f"data.value_range: expected [low, high] with low < high, got {self.value_range}")


@dataclass
class CropsConfig:
    """Multi-crop: 2 global views and ``n_local`` local views.

    Scales are fractions of the image area (as torchvision's RandomResizedCrop). RAD-DINO
    samples crop sides of U(259, 518) and U(104, 259) px from 518 px images; the defaults
    here are larger than DINOv2's (0.32-1.0 / 0.05-0.32), as RAD-DINO recommends.
    """

    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.2, 0.5])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])

    def __post_init__(self) -> None:
        require(self.global_size >= 1, f"crops.global_size must be >= 1, got {self.global_size}")
        require(self.local_size >= 1, f"crops.local_size must be >= 1, got {self.local_size}")
        require(self.n_local >= 0, f"crops.n_local must be >= 0, got {self.n_local}")
        _pair("crops.global_scale", self.global_scale, 1e-4, 1.0)
        _pair("crops.local_scale", self.local_scale, 1e-4, 1.0)
        _pair("crops.ratio", self.ratio, 1e-2)


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
