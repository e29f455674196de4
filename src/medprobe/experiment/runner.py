"""Run an experiment: validate it all, then every unit once, writing results as they finish.

Order of work: datasets are built and checked (leakage guard), every protocol's options
parsed and every unit's key computed before anything heavy starts. Then, per dataset ×
backbone, features are extracted at most once (with the largest needs of all frozen
protocols) and each pending unit runs; ``done`` units of an earlier attempt are skipped.
"""
from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medprobe.backbones import create_backbone, get_spec
from medprobe.backbones.weights import parse_weights
from medprobe.data.base import ImageDataset
from medprobe.errors import ConfigError, MedprobeError
from medprobe.experiment.config import BackboneConfig, ExperimentConfig
from medprobe.features import extract_features
from medprobe.protocols.base import FeatureNeeds, Protocol, Unit, UnitContext, get_protocol
from medprobe.results.store import ResultsStore, run_key
from medprobe.runtime import default_device, resolve_precision, seed_everything


@dataclass
class PlannedUnit:
    key: str
    dataset: str
    backbone: str
    protocol: Protocol
    options: Any
    unit: Unit
    variant: str


@dataclass
class Plan:
    config: ExperimentConfig
    datasets: dict[str, ImageDataset]
    protocol_options: dict[str, tuple[Protocol, Any]]
    units: list[PlannedUnit]
    skipped: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    done: int = 0
    skipped_done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    wall_s: float = 0.0


def build_datasets(config: ExperimentConfig) -> dict[str, ImageDataset]:
    from medprobe.data.adapters import build_dataset
    from medprobe.data.splits import check_no_leakage
    out = {}
    for name, dc in config.dataset_configs.items():
        try:
            ds = build_dataset(dc.adapter, dc.root, **dc.options)
        except MedprobeError as e:  # missing file, unknown option...: name the experiment key
            raise ConfigError(f"datasets.{name}: {e}") from None
        check_no_leakage(ds)
        out[name] = ds
    return out


def plan_experiment(config: ExperimentConfig) -> Plan:
    """Validate the whole experiment and list its units (no model is built)."""
    for name, bc in config.backbone_configs.items():
        try:
            get_spec(bc.name)
            parse_weights(bc.weights)
        except MedprobeError as e:
            raise ConfigError(f"backbones.{name}: {e}") from None
    protocol_options = {}
    for pname, raw in config.protocols.items():
        proto = get_protocol(pname)
        protocol_options[pname] = (proto, proto.parse_options(raw, f"protocols.{pname}"))
    datasets = build_datasets(config)
    plan = Plan(config, datasets, protocol_options, [])
    for dname, ds in datasets.items():
        for bname, bc in config.backbone_configs.items():
            for pname, (proto, options) in protocol_options.items():
                reason = proto.supports(ds)
                if reason:
                    plan.skipped.append(f"{pname} on {dname}: {reason}")
                    continue
                for unit in proto.units(options, list(config.seeds), ds):
                    key = run_key(config.dataset_configs[dname].describe(), _backbone_identity(bc, config), pname,
                                  unit.params, unit.seed)
                    plan.units.append(PlannedUnit(key, dname, bname, proto, options, unit, proto.variant(unit.params)))
    return plan


def _backbone_identity(bc: BackboneConfig, config: ExperimentConfig) -> dict[str, Any]:
    ident = bc.describe()
    ident["image_size"] = bc.image_size or config.image_size
    return ident


class _Features:
    """Extracts a dataset × backbone store on first use, with the needs of all its frozen units."""

    def __init__(self, config: ExperimentConfig, dataset: ImageDataset, bc: BackboneConfig, needs: FeatureNeeds,
                 backbone_fn: Callable[[], Any], progress: bool) -> None:
        self.config, self.dataset, self.bc, self.needs = config, dataset, bc, needs
        self.backbone_fn, self.progress = backbone_fn, progress
        self.store = None

    def __call__(self, needs: FeatureNeeds) -> Any:
        if needs.last_blocks > self.needs.last_blocks or not set(needs.patch_blocks) <= set(self.needs.patch_blocks):
            self.needs = FeatureNeeds(max(needs.last_blocks, self.needs.last_blocks),
                                      tuple(sorted(set(needs.patch_blocks) | set(self.needs.patch_blocks))))
            self.store = None
        if self.store is None:
            result = extract_features(self.backbone_fn(), self.dataset, self.config.cache_path,
                                      image_size=self.bc.image_size or self.config.image_size,
                                      last_blocks=self.needs.last_blocks, patch_blocks=self.needs.patch_blocks,
                                      precision=self.config.precision, batch_size=self.config.batch_size,
                                      progress=self.progress)
            self.store = result.store
        return self.store


def run_experiment(config: ExperimentConfig, *, progress: bool = True, log: Callable[[str], None] = print,
                   plan: Plan | None = None) -> RunSummary:
    """Run every unit not yet ``done`` in ``OUTPUT_DIR/results.db``."""
    t0 = time.perf_counter()
    plan = plan or plan_experiment(config)
    out = config.output_path
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(
        {k: v for k, v in vars(config).items() if not k.endswith("_configs")}, indent=1, default=str))
    results = ResultsStore(out / "results.db")
    summary = RunSummary()
    device = default_device()
    precision = resolve_precision(config.precision, device)
    done = results.done_keys()
    try:
        for dname, ds in plan.datasets.items():
            for bname, bc in config.backbone_configs.items():
                pending = [u for u in plan.units if u.dataset == dname and u.backbone == bname]
                summary.skipped_done += sum(u.key in done for u in pending)
                pending = [u for u in pending if u.key not in done]
                if not pending:
                    continue
                cached: dict[str, Any] = {}

                def backbone_fn(bc: BackboneConfig = bc) -> Any:
                    return create_backbone(bc.name, bc.weights, tiny=bc.tiny, overrides=bc.overrides)

                def frozen_backbone(bc: BackboneConfig = bc) -> Any:
                    if "bb" not in cached:
                        cached["bb"] = backbone_fn(bc)
                    return cached["bb"]

                needs = FeatureNeeds(1)
                for u in pending:
                    n = u.protocol.feature_needs(u.options)
                    needs = FeatureNeeds(max(needs.last_blocks, n.last_blocks),
                                         tuple(sorted(set(needs.patch_blocks) | set(n.patch_blocks))))
                features = _Features(config, ds, bc, needs, frozen_backbone, progress)
                memo: dict[str, Any] = {}
                for u in pending:
                    ctx = UnitContext(dataset_name=dname, dataset=ds, backbone_name=bname, backbone_config=bc,
                                      image_size=bc.image_size or config.image_size, precision=precision,
                                      batch_size=config.batch_size, bootstrap=config.bootstrap, device=device,
                                      work_dir=out / "units" / u.key, features_fn=features, backbone_fn=backbone_fn,
                                      memo=memo)
                    _run_unit(results, config, u, ctx, summary, log)
                cached.clear()
    finally:
        results.close()
    summary.wall_s = time.perf_counter() - t0
    return summary


def _run_unit(results: ResultsStore, config: ExperimentConfig, u: PlannedUnit, ctx: UnitContext,
              summary: RunSummary, log: Callable[[str], None]) -> None:
    weights = parse_weights(ctx.backbone_config.weights).kind
    results.start(u.key, experiment=config.name, dataset=u.dataset, backbone=u.backbone,
                  weights=ctx.backbone_config.weights if weights != "random" else "random",
                  protocol=u.protocol.name, variant=u.variant, params=u.unit.params, seed=u.unit.seed)
    t = time.perf_counter()
    seed_everything(u.unit.seed)
    try:
        res = u.protocol.run(u.unit, u.options, ctx)
    except Exception as e:  # a failed unit is recorded and the experiment goes on
        msg = str(e) if isinstance(e, MedprobeError) else "".join(traceback.format_exception(e))[-4000:]
        results.fail(u.key, msg, time.perf_counter() - t)
        summary.failed.append((f"{u.dataset}/{u.backbone}/{u.variant} seed {u.unit.seed}", str(e)))
        log(f"FAILED {u.dataset} / {u.backbone} / {u.variant} seed {u.unit.seed}: {e}")
        return
    wall = time.perf_counter() - t
    res.info.setdefault("wall_s", wall)
    results.finish(u.key, res.metrics, res.split, res.info, wall)
    summary.done += 1


def dry_run_lines(plan: Plan) -> list[str]:
    lines = [f"experiment {plan.config.name!r}: {len(plan.units)} units -> {Path(plan.config.output_dir) / 'results.db'}"]
    counts: dict[tuple[str, str, str], int] = {}
    for u in plan.units:
        counts[(u.dataset, u.backbone, u.protocol.name)] = counts.get((u.dataset, u.backbone, u.protocol.name), 0) + 1
    for (d, b, p), n in counts.items():
        lines.append(f"  {d} x {b} x {p}: {n} units")
    lines += [f"  skipped: {s}" for s in plan.skipped]
    return lines
