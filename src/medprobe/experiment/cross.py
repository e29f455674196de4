"""Cross-dataset units (``test_on:`` in a dataset entry): train on one dataset, test on others.

For a dataset entry ``A`` with ``test_on: [B, ...]``, every unit of a protocol that supports
it is planned once more per ``B``, labelled ``A->B`` in the results (the report shows it as a
dataset of its own). Supported: the frozen protocols on cached features that set
``cross_dataset = True`` (knn, linear, fewshot); the others are listed as skipped. Such a unit
trains (and selects on validation) exactly as the unit on ``A`` does -- on ``A``'s train and
val features -- and is scored on ``B``'s evaluation rows: ``B``'s test split, or all of ``B``
when it has no test split (:func:`medprobe.features.cross.evaluation_splits`). ``B``'s
features come from its own store, extracted with the same backbone and settings (once, shared
with ``B``'s own units). Labels are put onto ``A``'s classes by name; a class ``B`` lacks, or
``A``'s training set never labels, is missing in the test targets and masked out of the
metrics (:func:`medprobe.features.cross.align_labels`). Chest X-ray adapters share one
vocabulary with ``labels: harmonised`` (:mod:`medprobe.data.harmonise`).

Identity: the unit key is derived as for any unit, with the dataset identity
``{"train": A's settings and content fingerprint, "test": B's, "test_splits": [...]}``, so a
change to either dataset (or to which rows of ``B`` are scored) makes a new unit.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from medprobe.errors import ConfigError
from medprobe.features.cross import CrossStore, check_compatible, evaluation_splits
from medprobe.identity import digest
from medprobe.protocols.base import FeatureNeeds, Protocol

if TYPE_CHECKING:
    from medprobe.experiment.runner import Plan, PlannedUnit

SEPARATOR = "->"


def cross_label(train: str, test: str) -> str:
    """The results' dataset label of a cross-dataset unit: ``train->test``."""
    return f"{train}{SEPARATOR}{test}"


def supports_cross(protocol: Protocol) -> bool:
    """Whether ``protocol`` scores through its feature store's test split (so it can be tested elsewhere)."""
    return bool(getattr(protocol, "cross_dataset", False))


def dataset_identity(plan: "Plan", name: str) -> dict[str, Any]:
    """What identifies dataset entry ``name`` in a unit key (as the runner derives it)."""
    dc = plan.config.dataset_configs[name]
    return {"settings": dc.settings(), "fingerprint": plan.datasets[name].fingerprint()}


def add_cross_units(plan: "Plan", protocol_options: dict[str, tuple[Protocol, Any]], archs: dict[str, Any],
                    identities: dict[str, dict[str, Any]], env: dict[str, Any]) -> None:
    """Append the ``A->B`` units of every ``test_on`` to ``plan`` (and the feature needs of ``A`` and ``B``)."""
    from medprobe.experiment.runner import PlannedUnit, evaluation_settings, union
    from medprobe.results.store import RunRecord
    config = plan.config
    first_backbone = next(iter(config.backbone_configs))
    for dname, dc in config.dataset_configs.items():
        ds = plan.datasets[dname]
        for target in dc.test_on:
            other = plan.datasets[target]
            where = f"datasets.{dname}.test_on {target!r}"
            check_compatible(ds.task, other.task, where)
            if ds.ndim != other.ndim:
                raise ConfigError(f"{where}: {dname} is {ds.ndim}D but {target} is {other.ndim}D")
            label = cross_label(dname, target)
            identity = {"train": dataset_identity(plan, dname), "test": dataset_identity(plan, target),
                        "test_splits": evaluation_splits(other)}
            for bname, ref in config.backbone_configs.items():
                settings = evaluation_settings(config, ref, plan.precision)
                for pname, (proto, options) in protocol_options.items():
                    if proto.supports(ds):
                        continue  # skipped on the training dataset already (and listed there)
                    if not supports_cross(proto):
                        if bname == first_backbone:
                            plan.skipped.append(f"{pname} on {label}: test_on applies to the frozen protocols on "
                                                "cached features (knn, linear, fewshot)")
                        continue
                    needs = proto.feature_needs(options, archs[bname])
                    for d in (dname, target):
                        plan.needs[(d, bname)] = union(plan.needs.get((d, bname), FeatureNeeds(1)), needs)
                    for unit in proto.units(options, list(config.seeds), ds):
                        key, config_key, resolved = _identity(proto, options, unit, identity, identities[bname],
                                                              settings)
                        record = RunRecord(key=key, experiment=config.name, dataset=label, backbone=bname,
                                           weights=ref.weights_label(), protocol=pname,
                                           variant=proto.variant(unit.params), params=unit.params, seed=unit.seed,
                                           config_key=config_key, options=resolved,
                                           backbone_key=digest(identities[bname]),
                                           backbone_identity=identities[bname], dataset_key=digest(identity),
                                           env=env, settings=settings)
                        plan.units.append(PlannedUnit(key, dname, bname, proto, options, unit, record.variant, record,
                                                      test_on=target))


def _identity(*args: Any) -> tuple[str, str, dict[str, Any]]:
    from medprobe.experiment.runner import unit_identity
    return unit_identity(*args)


class CrossFeatures:
    """The features and memo of each ``test_on`` target for one dataset × backbone group of the runner."""

    def __init__(self, plan: "Plan", bname: str, train_features: Callable[[FeatureNeeds], Any],
                 backbone_fn: Callable[[], Any], progress: bool) -> None:
        self.plan, self.bname, self.train_features = plan, bname, train_features
        self.backbone_fn, self.progress = backbone_fn, progress
        self._features: dict[str, Any] = {}
        self._memos: dict[str, dict[str, Any]] = {}

    def for_unit(self, u: "PlannedUnit") -> tuple[Callable[[FeatureNeeds], Any], dict[str, Any]]:
        """``(features_fn, memo)`` of cross unit ``u``: a :class:`CrossStore` over the two stores, its own memo."""
        from medprobe.experiment.runner import _Features
        target, plan = u.test_on, self.plan
        assert target is not None
        if target not in self._features:
            ref = plan.config.backbone_configs[self.bname]
            self._features[target] = _Features(plan.config, plan.datasets[target], ref,
                                               plan.needs[(target, self.bname)], self.backbone_fn, self.progress)
        memo = self._memos.setdefault(target, {})
        splits = evaluation_splits(plan.datasets[target])

        def features(needs: FeatureNeeds = FeatureNeeds()) -> CrossStore:
            train, test = self.train_features(needs), self._features[target](needs)
            held = memo.get("cross:stores")
            if held is None or held[0] is not train or held[1] is not test:
                memo.clear()  # a (re-)extracted store: nothing computed from another one is kept
                memo["cross:stores"] = (train, test)
                memo["cross:store"] = CrossStore(train, test, splits)
            return memo["cross:store"]

        return features, memo
