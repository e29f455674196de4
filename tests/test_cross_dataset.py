"""test_on: frozen probes trained on one dataset and scored on another (two phantom chest sets, different labels)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from medprobe.data import build_dataset
from medprobe.errors import ConfigError
from medprobe.experiment.config import load_experiment
from medprobe.experiment.runner import dry_run_lines, plan_experiment, run_experiment
from medprobe.features import extract_features
from medprobe.features.cross import CrossStore, align_labels, evaluation_splits
from medprobe.predictions import read_predictions
from medprobe.protocols.mlknn import mlknn_predict

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONE = {"name": "dinov2_vits14", "weights": "random", "tiny": True}


def _experiment(tmp_path: Path, out: str = "run", test_seed: int = 1, protocols: dict | None = None,
                **train_changes) -> Path:
    train = {"adapter": "phantom", "n": 60, "size": 32, "seed": 0, "task": "multilabel",
             "class_names": ["lesion", "ap_view", "male"], "test_on": ["other"], **train_changes}
    cfg = {"name": "cross", "output_dir": str(tmp_path / out), "cache_dir": str(tmp_path / "cache"), "seeds": [0],
           "image_size": 28, "bootstrap": 20, "precision": "fp32",
           "datasets": {"home": train,
                        # same findings by position, but the third is named differently: not comparable, masked
                        "other": {"adapter": "phantom", "n": 50, "size": 32, "seed": test_seed, "task": "multilabel",
                                  "class_names": ["lesion", "ap_view", "sex_is_male"]}},
           "backbones": {"vit": BACKBONE},
           "protocols": protocols or {"knn": {"k": [5]}, "linear": {"inputs": ["cls"], "blocks": [1], "epochs": 2,
                                                                     "lrs": [0.01, 0.1]},
                                      "fewshot": {"shots": [2], "repeats": 1, "probes": ["knn"], "k": 3},
                                      "metadata": {"columns": ["sex"]}}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "results.db") as c:
        return c.execute("SELECT r.dataset, r.protocol, m.metric, IFNULL(m.class, ''), m.value, m.note "
                         "FROM metrics m JOIN runs r ON r.key = m.run_key").fetchall()


def test_cross_dataset_run_on_two_phantom_sets(tmp_path):
    config = load_experiment(_experiment(tmp_path))
    plan = plan_experiment(config)
    labels = sorted({(u.record.dataset, u.protocol.name) for u in plan.units})
    assert {("home->other", p) for p in ("knn", "linear", "fewshot")} <= set(labels)
    assert ("home->other", "metadata") not in labels
    assert any("metadata on home->other" in s for s in plan.skipped)
    assert any("home->other x vit x knn" in line for line in dry_run_lines(plan))

    summary = run_experiment(config, progress=False, log=lambda s: None)
    assert not summary.failed and summary.done == len(plan.units)
    rows = _metrics(config.output_path)
    cross = {(p, m, c): (v, note) for d, p, m, c, v, note in rows if d == "home->other"}
    for proto in ("knn", "linear", "fewshot"):
        for cls in ("lesion", "ap_view"):
            assert np.isfinite(cross[(proto, "auroc", cls)][0])
        value, note = cross[(proto, "auroc", "male")]  # the test set does not label it: masked, never negative
        assert (value is None or np.isnan(value)) and "not labelled" in note  # NaN is stored as NULL
        assert cross[(proto, "auroc", "")][0] == pytest.approx(
            np.mean([cross[(proto, "auroc", c)][0] for c in ("lesion", "ap_view")]))

    # the kNN scores are ML-kNN on home's train features against other's test features, with aligned targets
    with sqlite3.connect(config.output_path / "results.db") as c:
        key, ppath, sha = c.execute("SELECT key, predictions, predictions_sha256 FROM runs "
                                    "WHERE dataset = 'home->other' AND protocol = 'knn'").fetchone()
    pred = read_predictions(config.output_path / ppath, sha).splits["test"]
    home, other = plan.datasets["home"], plan.datasets["other"]
    assert pred.keys == [other.records[i].key for i in other.indices("test")]
    # metadata for subgroup analyses come from the test dataset's own records, even where keys coincide
    assert {r.key for r in home.records} & set(pred.keys)
    assert list(pred.metadata["sex"]) == [other.records[i].metadata["sex"] for i in other.indices("test")]
    target = pred.columns["target"]
    assert (target[:, 2] == -1).all()
    np.testing.assert_array_equal(target[:, :2], other.labels(other.indices("test"))[:, :2])
    stores = {}
    for name, ds in (("home", home), ("other", other)):
        stores[name] = extract_features(config.backbone_configs["vit"].build(), ds, config.cache_path, image_size=28,
                                        last_blocks=plan.needs[(name, "vit")].last_blocks, precision="fp32",
                                        batch_size=config.batch_size, progress=False).store
    want = mlknn_predict(np.array(stores["home"].features("train")), stores["home"].labels("train"),
                         np.array(stores["other"].features("test")), ks=[5])[5]
    np.testing.assert_allclose(pred.columns["score"], want, rtol=1e-5, atol=1e-6)
    assert cross[("knn", "auroc", "lesion")][0] == pytest.approx(roc_auc_score(target[:, 0], want[:, 0]))

    from medprobe.results.report import build_report
    report = build_report(config.output_path, write=False)
    assert "home->other" in set(report.summary["dataset"])


def test_cross_unit_keys_follow_both_datasets(tmp_path):
    a = plan_experiment(load_experiment(_experiment(tmp_path, "a")))
    b = plan_experiment(load_experiment(_experiment(tmp_path, "b", test_seed=2)))  # other test data

    def keys(plan, dataset):
        return {u.key for u in plan.units if u.record.dataset == dataset}
    assert keys(a, "home") == keys(b, "home")  # the training dataset's own units are untouched
    assert keys(a, "home->other").isdisjoint(keys(b, "home->other"))
    c = plan_experiment(load_experiment(_experiment(tmp_path, "c", test_on=[])))  # test_on adds units only
    assert keys(c, "home") == keys(a, "home") and not keys(c, "home->other")
    assert {u.record.dataset_key for u in a.units if u.record.dataset == "home->other"} != \
        {u.record.dataset_key for u in a.units if u.record.dataset == "home"}


def test_test_on_errors(tmp_path):
    with pytest.raises(ConfigError, match="test_on: 'nowhere' is not another entry"):
        load_experiment(_experiment(tmp_path, test_on=["nowhere"]))
    with pytest.raises(ConfigError, match="test_on: 'home' is not another entry"):
        load_experiment(_experiment(tmp_path, test_on=["home"]))
    with pytest.raises(ConfigError, match="task kinds differ"):
        plan_experiment(load_experiment(_experiment(tmp_path, task="binary", class_names=None)))


def test_alignment_rules_and_evaluation_rows():
    y = np.array([[1, 0, 1], [0, -1, 1]], dtype=np.float32)
    out = align_labels(y, "multilabel", ["a", "b", "c"], ["c", "x", "a", "b"], known=np.array([1, 1, 1, 0], bool))
    np.testing.assert_array_equal(out, [[1, -1, 1, -1], [1, -1, 0, -1]])
    ds = build_dataset("phantom", n=20, size=16)
    assert evaluation_splits(ds) == ["test"]
    whole = ds.subset(ds.indices("train"))
    assert evaluation_splits(whole) == ["train"]  # no test split: all of it


def test_cross_store_reads_test_rows_of_the_other_store(tmp_path):
    from medprobe.backbones.ref import BackboneRef
    from medprobe.options import parse
    bb = parse(BackboneRef, BACKBONE, "bb").build()
    a = build_dataset("phantom", n=30, size=16, task="multilabel", class_names=["x", "y"])
    b = build_dataset("phantom", n=30, size=16, seed=3, task="multilabel", class_names=["y", "z"])
    sa = extract_features(bb, a, tmp_path, image_size=28, progress=False).store
    sb = extract_features(bb, b, tmp_path, image_size=28, progress=False).store
    view = CrossStore(sa, sb, ["train", "test"])
    assert view.splits == [s for s in sa.splits if s != "test"] + ["test"]
    np.testing.assert_array_equal(view.features("test"), np.concatenate([sb.features("train"), sb.features("test")]))
    np.testing.assert_array_equal(view.features("train"), sa.features("train"))
    assert view.keys("test") == sb.keys("train") + sb.keys("test")
    yb = np.concatenate([sb.labels("train"), sb.labels("test")])
    np.testing.assert_array_equal(view.labels("test")[:, 1], yb[:, 0])  # y is b's first column
    assert (view.labels("test")[:, 0] == -1).all()  # x: b does not label it


def test_phantom_stand_ins_keep_test_on():
    from medprobe.presets import rewrite
    raw = {"datasets": {"nih": {"adapter": "nih_chestxray14", "labels": "harmonised", "test_on": ["chex"]},
                        "chex": {"adapter": "chexpert", "labels": "harmonised"}},
           "backbones": {}, "protocols": {}}
    decl = {"task": "multilabel", "classes": 18}
    out = rewrite(raw, {"nih": decl, "chex": decl}, "phantom")
    assert out["datasets"]["nih"]["test_on"] == ["chex"] and "test_on" not in out["datasets"]["chex"]
