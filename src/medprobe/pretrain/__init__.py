"""Continual self-supervised pretraining of ViT backbones (the DINOv2 recipe as used by RAD-DINO).

>>> from medprobe.pretrain import load_pretrain_config, pretrain
>>> cfg = load_pretrain_config("ssl.yaml", overrides=["train.steps=500"])
>>> teacher = pretrain(cfg)            # output_dir/teacher_backbone.pth (DINOv2 original layout)
>>> bb = create_backbone(cfg.backbone.name, weights=teacher)

Command line: ``medprobe pretrain FILE.yaml [--set key=value ...] [--no-resume]``; several
processes: ``torchrun --nproc_per_node K -m medprobe pretrain FILE.yaml``.

Outputs under ``output_dir``: ``checkpoints/step_NNNNNNN.pt`` (full training state, written
atomically every ``train.checkpoint_every`` steps; a rerun resumes from the newest),
``teacher_backbone.pth`` (the EMA teacher's backbone, loadable as ``weights: PATH``),
``pretrain_info.json`` (how to load it), ``losses.csv`` and ``losses.png``; with a ``probe``,
``probe.csv`` (one row per evaluation) and ``teacher_best.pth`` (the teacher of the best one).

Backbones: timm ViTs (teacher written in the DINOv2 original layout) and the transformers
DINOv2 family, e.g. ``backbone: {name: rad_dino, weights: PATH}`` to continue from the Hugging
Face RAD-DINO checkpoint (teacher written as a ``Dinov2Model`` state dict, loadable the same
way). ``heads: {weights: PATH}`` starts the DINO/iBOT heads from a DINOv2 training checkpoint;
``data: {sources: [...]}`` mixes sources by weight; ``crops: {mode: side}`` is RAD-DINO's cropping.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from medprobe.backbones.ref import BackboneRef
from medprobe.pretrain.config import (AugmentConfig, CropsConfig, DataConfig, HeadsConfig, LossConfig,
                                      PretrainConfig, ProbeConfig, SourceConfig, TrainConfig, load_pretrain_config,
                                      parse_pretrain_config)

if TYPE_CHECKING:
    from medprobe.pretrain.trainer import StepCallback

__all__ = ["AugmentConfig", "BackboneRef", "CropsConfig", "DataConfig", "HeadsConfig", "LossConfig", "PretrainConfig",
           "ProbeConfig", "SourceConfig", "TrainConfig", "load_pretrain_config", "parse_pretrain_config", "pretrain",
           "pretrain_distributed", "read_losses"]


def pretrain(config: PretrainConfig | dict[str, Any], resume: bool = True, progress: bool = True,
             on_step: "StepCallback | None" = None) -> Path:
    """Pretrain (or resume) in this process and return the path of ``teacher_backbone.pth``.

    ``config`` is a :class:`PretrainConfig` or a mapping with the YAML schema. Under
    ``torchrun`` every process calls this; they join one process group (gloo on CPU, NCCL on
    GPU). ``resume=False`` deletes earlier checkpoints in ``output_dir`` and starts over.
    ``on_step(step, row)`` is called after every step with the logged values.
    """
    from medprobe.pretrain.trainer import pretrain_in_process
    if not isinstance(config, PretrainConfig):
        config = parse_pretrain_config(config)
    return pretrain_in_process(config, resume=resume, progress=progress, on_step=on_step)


def pretrain_distributed(config: PretrainConfig | dict[str, Any], nprocs: int, resume: bool = True,
                         progress: bool = False) -> Path:
    """Pretrain with ``nprocs`` local CPU processes (gloo), as ``torchrun --nproc_per_node`` would."""
    from medprobe.pretrain.distributed import spawn_local
    if not isinstance(config, PretrainConfig):
        config = parse_pretrain_config(config)
    return spawn_local(config, nprocs, resume=resume, progress=progress)


def read_losses(path: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``losses.csv``."""
    from medprobe.pretrain.history import read_losses as _read
    return _read(path)
