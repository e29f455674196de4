"""The experiment file: datasets × backbones × protocols, seeds and run settings.

Everything is validated before any work starts; each error names the key and what is
allowed. Paths are relative to the current folder.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medprobe.backbones.ref import BackboneRef
from medprobe.backbones.registry import ResizePolicy
from medprobe.errors import ConfigError
from medprobe.options import coerce, parse, require


@dataclass
class DatasetConfig:
    """One ``datasets:`` entry; keys other than these are adapter options.

    ``test_on``: names of other ``datasets:`` entries the frozen probes trained on this one are also
    tested on (see :mod:`medprobe.experiment.cross`); it decides which units exist, not how this
    dataset is read, so it is not part of :meth:`settings`.
    """

    adapter: str
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    headline_metric: str | None = None  # overrides medprobe.data.headline.headline_metric's default
    test_on: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "root": self.root, **self.options}

    def settings(self) -> dict[str, Any]:
        """The options that shape the data besides its files (the root is covered by the content fingerprint)."""
        return {"adapter": self.adapter, **self.options}


@dataclass
class ExperimentConfig:
    name: str
    output_dir: str
    datasets: dict[str, Any]
    backbones: dict[str, Any]
    protocols: dict[str, Any]
    seeds: list[int] = field(default_factory=lambda: [0])
    image_size: int | None = None
    resize: ResizePolicy | None = None  # every backbone's resize policy (a backbone's own `resize:` wins)
    precision: str = "auto"
    batch_size: int = 64
    bootstrap: int = 1000
    cache_dir: str | None = None
    # where a preset came from and the numbers its paper published (carried to experiment.json for the
    # report; they decide no result, so they are not part of any unit's key); see medprobe.presets
    source: dict[str, Any] | None = None
    published: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        require(len(self.seeds) > 0, "seeds: give at least one seed")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require(self.bootstrap >= 0, f"bootstrap: must be >= 0, got {self.bootstrap}")
        require(self.image_size is None or self.image_size >= 8, f"image_size: must be >= 8, got {self.image_size}")
        require(self.precision in ("auto", "bf16", "fp32"), f"precision: {self.precision!r} is not one of auto, bf16, fp32")
        require(bool(self.datasets), "datasets: give at least one dataset")
        require(bool(self.backbones), "backbones: give at least one backbone")
        require(bool(self.protocols), "protocols: give at least one protocol (see `medprobe list protocols`)")
        self.dataset_configs: dict[str, DatasetConfig] = {}
        for name, raw in self.datasets.items():
            if not isinstance(raw, dict) or "adapter" not in raw:
                raise ConfigError(f"datasets.{name}: expected a mapping with an 'adapter' key, got {raw!r}")
            raw = dict(raw)
            adapter = coerce(raw.pop("adapter"), str, f"datasets.{name}.adapter")
            root = coerce(raw.pop("root", None), str | None, f"datasets.{name}.root")
            headline = coerce(raw.pop("headline_metric", None), str | None, f"datasets.{name}.headline_metric")
            test_on = coerce(raw.pop("test_on", None), list[str] | None, f"datasets.{name}.test_on") or []
            self.dataset_configs[name] = DatasetConfig(adapter, root, raw, headline, test_on)
        for name, dc in self.dataset_configs.items():
            for other in dc.test_on:
                require(other in self.dataset_configs and other != name,
                        f"datasets.{name}.test_on: {other!r} is not another entry of datasets "
                        f"(entries: {', '.join(k for k in self.dataset_configs if k != name) or 'none'})")
            require(len(set(dc.test_on)) == len(dc.test_on), f"datasets.{name}.test_on: {dc.test_on} names a "
                                                               "dataset twice")
        self.backbone_configs: dict[str, BackboneRef] = {
            name: parse(BackboneRef, raw, f"backbones.{name}") for name, raw in self.backbones.items()}
        for ref in self.backbone_configs.values():
            if ref.resize is None:
                ref.resize = self.resize

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.output_path / "features"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set a.b.c=value`` overrides (values parsed as YAML) to a raw mapping."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. protocols.linear.epochs=5), got {item!r}")
        path, value = item.split("=", 1)
        node = raw
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"--set: empty key in {item!r}")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {path}: {k!r} is not a mapping")
        try:
            node[keys[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {path}: value {value!r} is not valid YAML: {e}") from None
    return raw


def read_yaml_mapping(path: str | Path, what: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML file whose top level is a mapping and apply ``--set`` overrides to it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return apply_overrides(raw, overrides or [])


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML file (structure only; ``runner.plan_experiment`` checks the rest)."""
    raw = read_yaml_mapping(path, "experiment file", overrides)
    return parse(ExperimentConfig, raw, Path(path).name)
