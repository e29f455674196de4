"""Adapting the backbone: fine-tuning, LoRA, BitFit, appended DeiT, block freezing, decapitation, scratch.

Importing this package registers the protocols ``finetune``, ``lora``, ``bitfit``,
``deit_head``, ``freeze_blocks``, ``first_blocks``, ``scratch`` and ``volume_probe``.
All of them train through the one loop in :mod:`medprobe.protocols.adapt.training`.
"""
from __future__ import annotations

from medprobe.protocols.adapt import protocols  # noqa: F401  (registers the protocols)
from medprobe.protocols.adapt.protocols import TrainOptions, train_and_score  # noqa: F401
