"""The ``volume_probe`` protocol: a frozen 3D probe trained on cached slice embeddings.

A frozen protocol: the backbone runs once, at feature extraction (one CLS embedding per slice
of every volume, in the feature store); the probe never calls it. Each volume's slice
embeddings are pooled into one vector and a linear head predicts the volume's label. Pooling
(one unit each, ``pooling: [mean, max, attention]``):

* ``mean`` / ``max`` over the volume's slices (no parameters);
* ``attention``: slice attention learned with the head on the cached embeddings, gated
  attention-based MIL pooling (Ilse et al. 2018): a weight per slice from
  ``w^T (tanh(V x) * sigmoid(U x))``, softmax-normalised over the slices of each volume,
  so the probe learns which slices carry the finding.

Training, model selection on val and the test scores are the adaptation loop's
(:func:`medprobe.protocols.adapt.protocols.train_and_score`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from medprobe.data.base import ImageDataset, record_metadata
from medprobe.errors import ConfigError
from medprobe.options import require
from medprobe.protocols.adapt.data import EmbeddingSource, Source
from medprobe.protocols.adapt.models import Classifier, count_params
from medprobe.protocols.adapt.protocols import TrainOptions, _class_count, _classification_only, train_and_score
from medprobe.protocols.base import FeatureNeeds, Protocol, Unit, UnitContext, UnitResult, register_protocol

@dataclass
class VolumeProbeOptions:
    pooling: list[Literal["mean", "max", "attention"]] = field(default_factory=lambda: ["mean", "max", "attention"])
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    patience: int | None = 10
    select_metric: Literal["auroc", "accuracy", "loss"] = "auroc"

    def __post_init__(self) -> None:
        require(len(self.pooling) > 0, "pooling: give at least one of mean, max, attention")
        require(self.epochs >= 1, f"epochs: must be >= 1, got {self.epochs}")
        require(self.lr > 0, f"lr: the learning rate must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require(self.patience is None or self.patience >= 1, f"patience: must be >= 1 or null, got {self.patience}")

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("pooling")
        return d


def backbone_param_count(ctx: UnitContext) -> int:
    """Parameters of the configured backbone, counted on the meta device (no weights loaded)."""
    bc = ctx.backbone_config
    try:
        with torch.device("meta"):
            bb = bc.build(weights="random")
        return count_params(bb)[1]
    except Exception:  # a family that cannot be built on the meta device: count for real
        return count_params(ctx.backbone())[1]


@register_protocol
class VolumeProbe(Protocol):
    name = "volume_probe"
    summary = "frozen 3D probe: cached slice embeddings pooled per volume (mean, max or trained attention) + linear head"
    Options = VolumeProbeOptions
    expands = {"pooling": "pooling"}

    def supports(self, dataset: ImageDataset) -> str | None:
        if dataset.ndim != 3:
            return f"needs a 3D dataset, {dataset.name} is 2D"
        return _classification_only(dataset)

    def variant(self, params: dict[str, Any]) -> str:
        return f"volume_probe {params['pooling']}"

    def units(self, options: VolumeProbeOptions, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        base = options.describe()
        return [Unit(self.name, {**base, "pooling": p}, s) for p in dict.fromkeys(options.pooling) for s in seeds]

    def run(self, unit: Unit, options: VolumeProbeOptions, ctx: UnitContext) -> UnitResult:
        torch.manual_seed(unit.seed)
        store = ctx.features(FeatureNeeds(1))
        block = store.block_index(1)[-1]
        task = store.meta["task"]
        sources: dict[str, Source] = {}
        for split in ("train", "val", "test"):
            if split in store.splits:
                src = EmbeddingSource(store.tokens(split, "cls", block), store.array(split, "item_owner"),
                                      store.labels(split), task)
                keys = store.keys(split)
                if len(keys) == len(src):  # one key per volume: predictions are stored by them
                    by_key = {r.key: r for r in ctx.dataset.records}
                    src.sample_keys, src.patient_ids = list(keys), list(store.patient_ids(split))
                    if all(k in by_key for k in keys):
                        src.metadata = record_metadata([by_key[k] for k in keys])
                sources[split] = src
        for split in ("train", "test"):
            if split not in sources:
                raise ConfigError(f"the feature store has no {split!r} split (it has {', '.join(store.splits)})")
        dim = sources["train"].x.shape[1]
        model = Classifier(None, dim, _class_count(ctx.dataset), pooling=unit.params["pooling"])
        opts = TrainOptions(epochs=options.epochs, lr=options.lr, weight_decay=options.weight_decay, warmup_epochs=0,
                            batch_size=options.batch_size, patience=options.patience,
                            select_metric=options.select_metric, augment=[], grad_clip=None)
        info = {"block": block, "pooling": unit.params["pooling"], "slices_train": int(len(sources["train"].x))}
        return train_and_score(model, sources, opts, ctx, unit, augment=False, batch_size=options.batch_size,
                               backbone_lr=None, extra_total=backbone_param_count(ctx), info=info)
