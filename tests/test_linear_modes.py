"""Linear evaluation modes besides the default SGD sweep: scikit-learn L-BFGS over C, patient k-fold CV and
fixed training-subset sizes (on cached features of a tiny backbone over a phantom)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medprobe.backbones import create_backbone
from medprobe.backbones.ref import BackboneRef
from medprobe.data.adapters import build_dataset
from medprobe.errors import ConfigError
from medprobe.features.extract import extract_features
from medprobe.protocols.base import UnitContext, get_protocol
from medprobe.protocols.logreg import logreg_sweep

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = {"inputs": ["cls"], "blocks": [1]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ds = build_dataset("phantom", None, n=60, size=32, seed=0)
    cache = tmp_path_factory.mktemp("cache")
    store = extract_features(create_backbone("dinov2_vits14", "random", tiny=True), ds, cache, image_size=28,
                             last_blocks=1, precision="fp32", batch_size=32, progress=False).store
    return ds, store


def _ctx(setup, tmp_path) -> UnitContext:
    ds, store = setup
    return UnitContext(dataset_name="d", dataset=ds, backbone_name="b",
                       backbone_config=BackboneRef("dinov2_vits14", tiny=True), image_size=28, precision="fp32",
                       batch_size=16, bootstrap=0, device=torch.device("cpu"), work_dir=tmp_path,
                       features_fn=lambda needs: store, backbone_fn=None, memo={})


def _run(raw: dict, ctx: UnitContext, protocol: str = "linear"):
    proto = get_protocol(protocol)
    options = proto.parse_options({**BASE, **raw} if protocol == "linear" else raw, protocol)
    units = proto.units(options, [0, 1], ctx.dataset)
    return units, [proto.run(u, options, ctx) for u in units]


def _aggregate(result) -> dict[str, float]:
    return {m.metric: m.value for m in result.metrics if m.cls is None}


def test_default_is_still_the_sgd_sweep(setup, tmp_path):
    units, (res, _) = _run({"lrs": [1e-2], "epochs": 2}, _ctx(setup, tmp_path))
    assert [u.params for u in units] == [{}, {}]
    assert res.info["solver"] == "sweep" and "best_lr" in res.info


def test_sklearn_lbfgs_equals_a_logistic_regression_with_the_chosen_c(setup, tmp_path):
    ds, store = setup
    cs = [1e-3, 1e-1, 10.0]
    _, (res, _) = _run({"solver": "sklearn_lbfgs", "Cs": cs}, _ctx(setup, tmp_path))
    assert res.info["solver"] == "sklearn_lbfgs" and res.info["best_C"] in cs
    xtr, xva, xte = (store.features(s, "cls", 1, "mean").astype(np.float64) for s in ("train", "val", "test"))
    ytr, yva = store.labels("train"), store.labels("val")
    scaler = StandardScaler().fit(xtr)
    val_auc = {c: roc_auc_score(yva, LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(xtr), ytr)
                                .predict_proba(scaler.transform(xva))[:, 1]) for c in cs}
    best = max(cs, key=lambda c: (val_auc[c], -c))  # ties to the smaller C
    assert res.info["best_C"] == best
    ref = LogisticRegression(C=best, max_iter=1000).fit(scaler.transform(xtr), ytr)
    np.testing.assert_allclose(res.predictions.splits["test"].columns["score"],
                               ref.predict_proba(scaler.transform(xte))[:, 1], rtol=1e-6, atol=1e-8)


def test_sklearn_multilabel_and_multiclass_shapes():
    rng = np.random.default_rng(0)
    x = {"cls@1": torch.from_numpy(rng.normal(size=(60, 5)).astype(np.float32))}
    y_ml = (x["cls@1"].numpy()[:, :3] > 0).astype(np.float32)
    y_ml[:, 2] = 0  # a label never positive in train: a constant prediction, not an error
    r = logreg_sweep(x, y_ml, None, None, x, "multilabel", 3, Cs=[1.0])
    assert r.test_scores.shape == (60, 3) and np.all(r.test_scores[:, 2] == 0) and r.selected_on == "train"
    y_mc = np.argmax(x["cls@1"].numpy()[:, :3], axis=1)
    r = logreg_sweep(x, y_mc, x, y_mc, x, "multiclass", 3, Cs=[0.1, 1.0])
    np.testing.assert_allclose(r.test_scores.sum(1), 1.0)
    with pytest.raises(ConfigError, match="every class"):
        logreg_sweep(x, np.minimum(y_mc, 1), None, None, x, "multiclass", 3, Cs=[1.0])


@pytest.mark.parametrize("solver", ["sweep", "sklearn_lbfgs"])
def test_patient_kfold_reports_mean_and_sd_over_folds(solver, setup, tmp_path):
    ds, _ = setup
    _, (res, _) = _run({"folds": 3, "solver": solver, "Cs": [1.0], "lrs": [1e-2], "epochs": 2},
                       _ctx(setup, tmp_path))
    test = res.predictions.splits["test"]
    assert sorted(test.keys) == sorted(r.key for r in ds.records)  # every sample scored once, out of fold
    fold = test.columns["fold"]
    by_patient = {}
    for pid, f in zip(test.patient_ids, fold):
        by_patient.setdefault(pid, set()).add(int(f))
    assert all(len(f) == 1 for f in by_patient.values())  # no patient in two folds
    aucs = [roc_auc_score(test.columns["target"][fold == k], test.columns["score"][fold == k]) for k in range(3)]
    values = _aggregate(res)
    assert values["auroc"] == pytest.approx(np.mean(aucs))
    assert values["auroc_fold_sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert len(res.info["per_fold"]) == 3


def test_train_subsets_are_stratified_seeded_units(setup, tmp_path):
    ds, store = setup
    units, results = _run({"train_subset": [10, 20], "solver": "sklearn_lbfgs", "Cs": [1.0]}, _ctx(setup, tmp_path))
    assert [(u.params["train_subset"], u.seed) for u in units] == [(10, 0), (10, 1), (20, 0), (20, 1)]
    assert [r.info["train_samples"] for r in results] == [10, 10, 20, 20]
    y = store.labels("train")
    from medprobe.protocols.frozen import train_subset_rows
    rows = np.arange(len(y))
    a, b = train_subset_rows(y, rows, 20, 0, "binary"), train_subset_rows(y, rows, 20, 1, "binary")
    assert len(set(a)) == 20 and not np.array_equal(a, b)
    assert np.array_equal(a, train_subset_rows(y, rows, 20, 0, "binary"))
    assert abs(y[a].mean() - y.mean()) <= 1 / 20 + 1e-9  # stratified: the class balance of train
    with pytest.raises(ConfigError, match="train_subset"):
        _run({"train_subset": [len(y) + 1]}, _ctx(setup, tmp_path))


def test_bad_combinations_fail_at_parse():
    proto = get_protocol("linear")
    for raw, pattern in [({"folds": 2}, "K >= 3"), ({"folds": 3, "train_subset": [5]}, "one or the other"),
                         ({"Cs": [0.0]}, "Cs"), ({"solver": "saga"}, "solver")]:
        with pytest.raises(ConfigError, match=pattern):
            proto.parse_options(raw, "protocols.linear")
    with pytest.raises(ConfigError, match="few-shot"):
        get_protocol("fewshot").parse_options({"linear": {"folds": 3}}, "protocols.fewshot")
