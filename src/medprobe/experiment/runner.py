"""Run an experiment: validate it all, then every unit once, writing results as they finish.

Order of work: datasets are built and checked (leakage guard, splits the protocols need),
backbones resolved (weights by content digest), every protocol's options parsed and every
unit's key derived before anything heavy starts. Then, per dataset × backbone, features are
extracted at most once, with the union of the needs of *all* its units (done ones too, so a
resume reuses the store), and each pending unit runs; ``done`` units are skipped.

A unit's key (:func:`unit_identity`) is derived from everything that decides its numbers:
the protocol and its implementation version, the unit's complete resolved options, its
params and seed, the dataset's settings and content fingerprint, the backbone's identity
(weights by content), the image size, the resolved precision, the batch size and the number
of bootstrap resamples.
"""
from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medprobe.backbones.ref import BackboneRef
from medprobe.data.base import ImageDataset
from medprobe.data.check import split_warnings
from medprobe.data.headline import headline_metric
from medprobe.distributed import is_main_process, launched_distributed
from medprobe.errors import ConfigError, MedprobeError
from medprobe.experiment.config import ExperimentConfig
from medprobe.experiment.cross import CrossFeatures, add_cross_units
from medprobe.experiment.lock import OutputLock
from medprobe.features import extract_features
from medprobe.fsutil import atomic_write
from medprobe.identity import digest
from medprobe.predictions import write_predictions
from medprobe.protocols.base import ArchInfo, FeatureNeeds, Protocol, Unit, UnitContext, get_protocol
from medprobe.results.store import ResultsStore, RunRecord, connect_readonly, done_keys, merge_shards, shard_paths
from medprobe.runtime import default_device, environment, resolve_precision, seed_everything


@dataclass
class PlannedUnit:
    key: str
    dataset: str
    backbone: str
    protocol: Protocol
    options: Any
    unit: Unit
    variant: str
    record: RunRecord
    test_on: str | None = None  # a cross-dataset unit: scored on this dataset entry (medprobe.experiment.cross)


@dataclass
class Plan:
    config: ExperimentConfig
    datasets: dict[str, ImageDataset]
    protocol_options: dict[str, tuple[Protocol, Any]]
    units: list[PlannedUnit]
    needs: dict[tuple[str, str], FeatureNeeds] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    precision: str = "fp32"
    warnings: dict[str, list[str]] = field(default_factory=dict)  # dataset name -> degenerate splits
    headline: dict[str, str] = field(default_factory=dict)  # dataset name -> its headline metric


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


def arch_info(ref: BackboneRef) -> ArchInfo:
    """Blocks and patch size of a backbone, read from a weight-less build on the meta device."""
    import torch
    try:
        with torch.device("meta"):
            bb = ref.build(weights="random")
    except MedprobeError:
        raise
    except Exception:  # a family that cannot be built on the meta device
        bb = ref.build(weights="random")
    return ArchInfo(bb.num_blocks, bb.patch_size, bb.default_image_size)


def union(a: FeatureNeeds, b: FeatureNeeds) -> FeatureNeeds:
    return FeatureNeeds(max(a.last_blocks, b.last_blocks), tuple(sorted(set(a.patch_blocks) | set(b.patch_blocks))))


def evaluation_settings(config: ExperimentConfig, ref: BackboneRef, precision: str) -> dict[str, Any]:
    """The run-level settings that decide a unit's numbers."""
    return {"image_size": ref.image_size or config.image_size, "precision": precision,
            "batch_size": config.batch_size, "bootstrap": config.bootstrap}


def unit_identity(protocol: Protocol, options: Any, unit: Unit, dataset_identity: dict[str, Any],
                  backbone_identity: dict[str, Any], settings: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``(run key, config key, resolved unit options)``; the config key leaves out seed and backbone."""
    resolved = protocol.unit_options(options, unit)
    config = {"protocol": protocol.name, "version": protocol.version, "options": resolved,
              "params": unit.params, "dataset": dataset_identity, "settings": settings}
    key = digest({"config": config, "backbone": backbone_identity, "seed": unit.seed})
    return key, digest(config), resolved


def _check_image_size(config: ExperimentConfig, bname: str, ref: BackboneRef, arch: ArchInfo) -> None:
    size = ref.image_size or config.image_size or arch.default_image_size
    if arch.patch_size and size % arch.patch_size:
        where = f"backbones.{bname}.image_size" if ref.image_size else "image_size"
        lower = size - size % arch.patch_size or arch.patch_size
        raise ConfigError(f"{where}: {size} is not a multiple of {ref.name}'s patch size {arch.patch_size}; "
                          f"use {lower} or {lower + arch.patch_size}")


def _check_splits(dname: str, ds: ImageDataset, pname: str) -> None:
    present = ds.splits()
    for s in ("train", "test"):
        if s not in present or not len(ds.indices(s)):
            raise ConfigError(f"datasets.{dname}: protocol {pname!r} needs a {s!r} split but {ds.name} has "
                              f"{', '.join(present) or 'none'}; give the adapter a split option or a split column")


def plan_experiment(config: ExperimentConfig) -> Plan:
    """Validate the whole experiment and list its units with their derived keys (no model is loaded)."""
    protocol_options = {}
    for pname, raw in config.protocols.items():
        proto = get_protocol(pname)
        protocol_options[pname] = (proto, proto.parse_options(raw, f"protocols.{pname}"))
    archs: dict[str, ArchInfo] = {}
    identities: dict[str, dict[str, Any]] = {}
    for name, ref in config.backbone_configs.items():
        try:
            ref.validate()
            archs[name] = arch_info(ref)
            identities[name] = ref.identity()
        except MedprobeError as e:
            raise ConfigError(f"backbones.{name}: {e}") from None
        _check_image_size(config, name, ref, archs[name])
    datasets = build_datasets(config)
    precision = resolve_precision(config.precision, default_device())
    plan = Plan(config, datasets, protocol_options, [], precision=precision)
    env = environment(default_device(), precision)
    for dname, ds in datasets.items():
        plan.warnings[dname] = [f"{dname}: {w}" for w in split_warnings(ds)]
        dc = config.dataset_configs[dname]
        plan.headline[dname] = headline_metric(dc.adapter, ds.task.kind, dc.headline_metric)
        dataset_identity = {"settings": dc.settings(), "fingerprint": ds.fingerprint()}
        dataset_key = digest(dataset_identity)
        for bname, ref in config.backbone_configs.items():
            settings = evaluation_settings(config, ref, precision)
            needs = FeatureNeeds(1)
            for pname, (proto, options) in protocol_options.items():
                reason = proto.supports(ds)
                if reason:
                    if bname == next(iter(config.backbone_configs)):
                        plan.skipped.append(f"{pname} on {dname}: {reason}")
                    continue
                _check_splits(dname, ds, pname)
                needs = union(needs, proto.feature_needs(options, archs[bname]))
                for unit in proto.units(options, list(config.seeds), ds):
                    key, config_key, resolved = unit_identity(proto, options, unit, dataset_identity,
                                                              identities[bname], settings)
                    variant = proto.variant(unit.params)
                    record = RunRecord(key=key, experiment=config.name, dataset=dname, backbone=bname,
                                       weights=ref.weights_label(), protocol=pname, variant=variant,
                                       params=unit.params, seed=unit.seed, config_key=config_key,
                                       options=resolved, backbone_key=digest(identities[bname]),
                                       backbone_identity=identities[bname], dataset_key=dataset_key, env=env,
                                       settings=settings)
                    plan.units.append(PlannedUnit(key, dname, bname, proto, options, unit, variant, record))
            plan.needs[(dname, bname)] = needs
    add_cross_units(plan, protocol_options, archs, identities, env)
    keys = [u.key for u in plan.units]
    if len(set(keys)) != len(keys):  # two units that would compute the same thing: a protocol bug
        raise ConfigError("two units of this experiment derive the same key; report this as a medprobe bug")
    return plan


class _Features:
    """Extracts a dataset × backbone store on first use, with the needs planned for all its units."""

    def __init__(self, config: ExperimentConfig, dataset: ImageDataset, ref: BackboneRef, needs: FeatureNeeds,
                 backbone_fn: Callable[[], Any], progress: bool) -> None:
        self.config, self.dataset, self.ref, self.needs = config, dataset, ref, needs
        self.backbone_fn, self.progress = backbone_fn, progress
        self.store = None

    def __call__(self, needs: FeatureNeeds) -> Any:
        if needs.last_blocks > self.needs.last_blocks or not set(needs.patch_blocks) <= set(self.needs.patch_blocks):
            self.needs = union(self.needs, needs)  # a unit asked for more than planned: extract once more
            self.store = None
        if self.store is None:
            result = extract_features(self.backbone_fn(), self.dataset, self.config.cache_path,
                                      image_size=self.ref.image_size or self.config.image_size,
                                      last_blocks=self.needs.last_blocks, patch_blocks=self.needs.patch_blocks,
                                      precision=self.config.precision, batch_size=self.config.batch_size,
                                      progress=self.progress)
            self.store = result.store
        return self.store


def pending_units(plan: Plan) -> tuple[list[PlannedUnit], int]:
    """Units not yet done in ``OUTPUT_DIR/results.db`` (read-only look; nothing is written)."""
    db = plan.config.output_path / "results.db"
    if not db.exists() or (db.is_file() and db.stat().st_size == 0):  # an empty file holds no results
        return list(plan.units), 0
    conn = connect_readonly(db)
    try:
        done = done_keys(conn)
    finally:
        conn.close()
    pending = [u for u in plan.units if u.key not in done]
    return pending, len(plan.units) - len(pending)


def _prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output_dir {out}: {e.strerror or e}; choose a writable folder") from None


def run_experiment(config: ExperimentConfig, *, progress: bool = True, log: Callable[[str], None] = print,
                   plan: Plan | None = None, workers: int = 1, launcher: str = "processes",
                   cluster: Any = None) -> RunSummary:
    """Run every unit not yet ``done`` in ``OUTPUT_DIR/results.db`` (nothing is written when none is left).

    ``workers > 1`` (or a cluster ``launcher``) runs the pending units in that many workers
    (:mod:`medprobe.experiment.parallel`) after extracting their feature stores here, once.
    """
    if workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {workers}")
    if launched_distributed():  # under torchrun: every process runs the units together, rank 0 writes
        from medprobe.experiment.ranks import run_ranked
        return run_ranked(config, plan, progress, log, workers, launcher)
    t0 = time.perf_counter()
    plan = plan or plan_experiment(config)
    summary = RunSummary()
    pending, summary.skipped_done = pending_units(plan)
    out = config.output_path
    if not pending and not shard_paths(out):
        summary.wall_s = time.perf_counter() - t0
        return summary
    _prepare_output(out)
    with OutputLock(out, f"medprobe run {config.name}"):
        results = ResultsStore(out / "results.db")
        try:
            _write_experiment_json(out, config)
            merge_shards(results)  # units finished by workers of an interrupted run
            done = results.done_keys()  # again, under the lock
            summary.skipped_done = sum(u.key in done for u in plan.units)
            todo = [u for u in pending if u.key not in done]
            if todo and (workers > 1 or launcher != "processes"):
                from medprobe.experiment.parallel import run_workers
                _extract_stores(plan, todo, progress)
                for r in run_workers(config, [u.key for u in todo], out, workers, launcher, cluster, log):
                    summary.done += r["done"]
                    summary.failed += [tuple(f) for f in r["failed"]]
                merge_shards(results)
            elif todo:
                run_units(plan, todo, results, summary, progress, log)
        finally:
            results.close()
    summary.wall_s = time.perf_counter() - t0
    return summary


def _extract_stores(plan: Plan, units: list[PlannedUnit], progress: bool) -> None:
    """Extract, here and once, every feature store that ``units`` read (workers then reuse them)."""
    for dname, ds in plan.datasets.items():
        for bname, ref in plan.config.backbone_configs.items():
            if any(dname in (u.dataset, u.test_on) and u.backbone == bname and u.protocol.uses_store for u in units):
                needs = plan.needs[(dname, bname)]
                _Features(plan.config, ds, ref, needs, ref.build, progress)(needs)


def _write_experiment_json(out: Path, config: ExperimentConfig) -> None:
    text = json.dumps({k: v for k, v in vars(config).items() if not k.endswith("_configs")}, indent=1, default=str)
    path = out / "experiment.json"
    try:
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, text)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


def run_units(plan: Plan, pending: list[PlannedUnit], results: ResultsStore, summary: RunSummary,
              progress: bool, log: Callable[[str], None], device: Any = None) -> None:
    """Run ``pending`` (units of ``plan``) one after another on ``device``, writing to ``results``."""
    config = plan.config
    device = device or default_device()
    for dname, ds in plan.datasets.items():
        for bname, ref in config.backbone_configs.items():
            todo = [u for u in pending if u.dataset == dname and u.backbone == bname]
            if not todo:
                continue
            cached: dict[str, Any] = {}

            def frozen_backbone(ref: BackboneRef = ref) -> Any:
                if "bb" not in cached:
                    cached["bb"] = ref.build()
                return cached["bb"]

            features = _Features(config, ds, ref, plan.needs[(dname, bname)], frozen_backbone, progress)
            memo: dict[str, Any] = {}
            cross = CrossFeatures(plan, bname, features, frozen_backbone, progress)
            for u in todo:
                features_fn, unit_memo = cross.for_unit(u) if u.test_on else (features, memo)
                ctx = UnitContext(dataset_name=u.record.dataset, dataset=ds, backbone_name=bname, backbone_config=ref,
                                  image_size=ref.image_size or config.image_size, precision=plan.precision,
                                  batch_size=config.batch_size, bootstrap=config.bootstrap, device=device,
                                  work_dir=config.output_path / "units" / u.key, features_fn=features_fn,
                                  backbone_fn=ref.build, memo=unit_memo, plots_dir=config.output_path / "plots")
                _run_unit(results, config, u, ctx, summary, log, plan.warnings, plan.headline)
            cached.clear()


def predictions_path(output_dir: Path, key: str) -> Path:
    return output_dir / "predictions" / f"{key}.npz"


def _run_unit(results: ResultsStore, config: ExperimentConfig, u: PlannedUnit, ctx: UnitContext,
              summary: RunSummary, log: Callable[[str], None], warnings: dict[str, list[str]],
              headline: dict[str, str]) -> None:
    if not results.start(u.record):
        summary.skipped_done += 1
        return
    t = time.perf_counter()
    seed_everything(u.unit.seed)
    try:
        res = u.protocol.run(u.unit, u.options, ctx)
        stored = None
        if res.predictions is not None and is_main_process():  # under torchrun, rank 0 alone writes
            path = predictions_path(config.output_path, u.key)
            sha = write_predictions(res.predictions, path)
            stored = (str(path.relative_to(config.output_path)), sha)
    except Exception as e:  # a failed unit is recorded and the experiment goes on
        msg = str(e) if isinstance(e, MedprobeError) else "".join(traceback.format_exception(e))[-4000:]
        results.fail(u.key, msg, time.perf_counter() - t)
        summary.failed.append((f"{u.record.dataset}/{u.backbone}/{u.variant} seed {u.unit.seed}", str(e)))
        log(f"FAILED {u.record.dataset} / {u.backbone} / {u.variant} seed {u.unit.seed}: {e}")
        return
    wall = time.perf_counter() - t
    res.info.setdefault("wall_s", wall)
    if warnings.get(u.dataset):
        res.info.setdefault("warnings", warnings[u.dataset])  # shown as notes by the report
    if headline.get(u.dataset):
        res.info.setdefault("headline_metric", headline[u.dataset])  # what tables and rankings lead with
    results.finish(u.key, res.metrics, res.split, res.info, wall, predictions=stored)
    summary.done += 1


def dry_run_lines(plan: Plan) -> list[str]:
    lines = [f"experiment {plan.config.name!r}: {len(plan.units)} units -> {Path(plan.config.output_dir) / 'results.db'}"]
    counts: dict[tuple[str, str, str], int] = {}
    for u in plan.units:
        d = u.record.dataset  # "A->B" for a cross-dataset unit
        counts[(d, u.backbone, u.protocol.name)] = counts.get((d, u.backbone, u.protocol.name), 0) + 1
    for (d, b, p), n in counts.items():
        lines.append(f"  {d} x {b} x {p}: {n} units")
    for (d, b), needs in plan.needs.items():
        grids = f", patch grids of blocks {list(needs.patch_blocks)}" if needs.patch_blocks else ""
        lines.append(f"  features {d} x {b}: last {needs.last_blocks} block(s){grids}")
    lines += [f"  skipped: {s}" for s in plan.skipped]
    lines += [f"  warning: {w}" for ws in plan.warnings.values() for w in ws]
    return lines
