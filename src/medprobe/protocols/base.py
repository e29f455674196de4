"""What a protocol is to the experiment runner.

A protocol parses its options from the experiment file, expands them into run *units*
(one unit = one row of the ``runs`` table: protocol + params + seed) and runs one unit at a
time, returning metric values and a small ``info`` record. Frozen protocols ask for a
feature store through :meth:`UnitContext.features`; trainable ones build a fresh backbone
with :meth:`UnitContext.backbone`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from medprobe.backbones.base import Backbone
from medprobe.data.base import ImageDataset
from medprobe.errors import suggest, ConfigError
from medprobe.identity import canonical
from medprobe.options import parse
from medprobe.metrics import MetricValue
from medprobe.predictions import Predictions


@dataclass(frozen=True)
class FeatureNeeds:
    """What a frozen protocol needs from the feature store."""

    last_blocks: int = 1
    patch_blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class ArchInfo:
    """What planning knows of a backbone's architecture without loading weights."""

    num_blocks: int
    patch_size: int | None
    default_image_size: int


@dataclass
class Unit:
    """One row of ``runs``: ``params`` are the values this unit takes of the options that expand
    into several units (``Protocol.expands``) and any value derived from the dataset."""

    protocol: str
    params: dict[str, Any]
    seed: int


@dataclass
class UnitResult:
    """What a unit returns: its metrics (on ``split``), a small ``info`` record and the per-sample
    predictions the metrics were computed from (stored beside ``results.db``)."""

    metrics: list[MetricValue]
    info: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    predictions: Predictions | None = None


@dataclass
class UnitContext:
    """Everything a unit may use; expensive things (features, backbones) are built lazily."""

    dataset_name: str
    dataset: ImageDataset
    backbone_name: str
    backbone_config: Any  # medprobe.backbones.ref.BackboneRef
    image_size: int | None
    precision: str
    batch_size: int
    bootstrap: int
    device: torch.device
    work_dir: Path
    features_fn: Callable[[FeatureNeeds], Any]
    backbone_fn: Callable[[], Backbone]
    memo: dict[str, Any] = field(default_factory=dict)
    #: the experiment's folder for pictures shared across units (OUTPUT_DIR/plots); None: work_dir/plots
    plots_dir: Path | None = None

    def features(self, needs: FeatureNeeds = FeatureNeeds()):
        """The feature store of this dataset × backbone (extracted once, then reused)."""
        return self.features_fn(needs)

    def backbone(self) -> Backbone:
        """A freshly built backbone (with its configured weights) for training protocols."""
        return self.backbone_fn()


class Protocol:
    """Base class; subclasses set ``name``, ``Options`` and implement ``units`` and ``run``.

    A unit's identity is derived, never hand-picked: :meth:`unit_options` is the protocol's
    complete resolved options (every field, nested, defaults filled in) with each option that
    expands into several units (``expands``: option field -> unit param) narrowed to this
    unit's value; the runner hashes it with the unit's params, seed, dataset content, weights
    content, evaluation settings and ``version``. Bump ``version`` when a change to the
    implementation changes the numbers.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type]
    version: ClassVar[int] = 1
    expands: ClassVar[dict[str, str]] = {}
    uses_store: ClassVar[bool] = True  # reads the feature store (parallel runs extract it once, up front)

    def parse_options(self, raw: Any, where: str) -> Any:
        return parse(self.Options, raw, where)

    def feature_needs(self, options: Any, arch: ArchInfo | None = None) -> FeatureNeeds:
        """The feature-store blocks every unit of these options may read (known before running)."""
        return FeatureNeeds()

    def variant(self, params: dict[str, Any]) -> str:
        """Short label of a unit's expanded values (tables derive fuller labels from the options)."""
        shown = ", ".join(f"{k}={v}" for k, v in params.items() if v is not None and not isinstance(v, (list, dict)))
        return f"{self.name} {shown}".strip() if shown else self.name

    def supports(self, dataset: ImageDataset) -> str | None:
        """None when the protocol applies to ``dataset``, else the reason it is skipped."""
        return None

    def units(self, options: Any, seeds: list[int], dataset: ImageDataset) -> list[Unit]:
        raise NotImplementedError

    def unit_options(self, options: Any, unit: Unit) -> dict[str, Any]:
        """``options`` in canonical form, with every ``expands`` field narrowed to ``unit``'s value."""
        resolved = canonical(options)
        for option, param in self.expands.items():
            if option not in resolved:
                raise TypeError(f"{type(self).__name__}.expands names {option!r}, not a field of {self.Options.__name__}")
            value = unit.params.get(param)
            resolved[option] = [] if value is None else [canonical(value)]
        return resolved

    def run(self, unit: Unit, options: Any, ctx: UnitContext) -> UnitResult:
        raise NotImplementedError


_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(cls: type[Protocol]) -> type[Protocol]:
    if cls.name in _PROTOCOLS:
        raise ValueError(f"protocol {cls.name!r} registered twice")
    _PROTOCOLS[cls.name] = cls()
    return cls


def get_protocol(name: str) -> Protocol:
    from medprobe.protocols import load_builtin
    load_builtin()  # registers the built-in protocols
    try:
        return _PROTOCOLS[name]
    except KeyError:
        raise ConfigError(f"protocols: {suggest(name, _PROTOCOLS, 'protocol')}") from None


def all_protocols() -> dict[str, Protocol]:
    from medprobe.protocols import load_builtin
    load_builtin()
    return dict(_PROTOCOLS)
