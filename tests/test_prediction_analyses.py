"""Export, paired comparison, subgroups and calibration of an output folder, built with the store API."""
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medprobe.cli import main
from medprobe.errors import DataError
from medprobe.metrics import classification_metrics
from medprobe.predictions import (Predictions, SplitPredictions, classification_predictions, read_predictions,
                                  write_predictions)
from medprobe.results import stats
from medprobe.results.analyses import calibration_summary, compare_table, subgroup_table
from medprobe.results.export import export_predictions
from medprobe.results.runs import load_runs
from medprobe.results.store import ResultsStore, RunRecord

BACKBONES = {"resnet": 0.6, "vit": 1.2}  # signal strength of each fake backbone


def _split_data(task, n, rng, strength, truth=None):
    if task == "binary":
        y = truth if truth is not None else (rng.random(n) < 0.4).astype(np.int64)
        s = 1 / (1 + np.exp(-(strength * (2 * y - 1) + rng.normal(0, 1, n))))
        return y, s
    if task == "multilabel":
        y = truth if truth is not None else (rng.random((n, 3)) < 0.3).astype(np.int64)
        s = 1 / (1 + np.exp(-(strength * (2 * y - 1) + rng.normal(0, 1, (n, 3)))))
        return y, s
    y = truth if truth is not None else rng.integers(0, 3, n)
    logits = strength * np.eye(3)[y] + rng.normal(0, 1, (n, 3))
    e = np.exp(logits)
    return y, e / e.sum(1, keepdims=True)


def _record(key, dataset, backbone, variant, seed, config_key, protocol="linear"):
    return RunRecord(key=key, experiment="t", dataset=dataset, backbone=backbone, weights="random", protocol=protocol,
                     variant=variant, params={}, seed=seed, config_key=config_key, options={"epochs": 3},
                     backbone_key=f"bk-{backbone}", backbone_identity={"name": backbone}, dataset_key=f"dk-{dataset}",
                     env={})


def make_output(tmp_path: Path, repeated_patients=False) -> Path:
    """Three configurations (binary with 2 seeds, multiclass, multilabel), two backbones each."""
    out = tmp_path / "out"
    store = ResultsStore(out / "results.db")
    truths = {}
    for dataset, task, seeds in (("bin", "binary", [0, 1]), ("mc", "multiclass", [0]), ("ml", "multilabel", [0])):
        n = {"val": 60, "test": 90}
        keys = {s: [f"{dataset}-{s}-{i}" for i in range(n[s])] for s in n}
        pids = {s: [f"{s}p{i // 3 if repeated_patients else i}" for i in range(n[s])] for s in n}
        meta = {s: {"sex": ["F" if i % 2 else "M" for i in range(n[s])],
                    "age": [float(20 + i % 5) if i % 7 else None for i in range(n[s])]} for s in n}
        for backbone, strength in BACKBONES.items():
            for seed in seeds:
                rng = np.random.default_rng([seed, int(strength * 10), len(dataset)])
                parts = {}
                for s in n:
                    tr_rng = np.random.default_rng([len(dataset), n[s]])
                    if (dataset, s) not in truths:
                        truths[(dataset, s)] = _split_data(task, n[s], tr_rng, 1.0)[0]
                    y, sc = _split_data(task, n[s], rng, strength, truths[(dataset, s)])
                    parts[s] = (keys[s], pids[s], y, sc)
                names = ["normal", "pneumonia"] if task == "binary" else ["a", "b", "c"]
                # test rows stored in a backbone-dependent order: pairing must match by sample key
                if backbone == "vit":
                    k, p, y, sc = parts["test"]
                    parts["test"] = (k[::-1], p[::-1], y[::-1], sc[::-1])
                pred = classification_predictions(task, names, parts, metadata=meta if backbone == "resnet" else {
                    s: {c: v[::-1] if s == "test" else v for c, v in m.items()} for s, m in meta.items()})
                key = f"{dataset}-{backbone}-{seed}"
                store.start(_record(key, dataset, backbone, f"linear {dataset}", seed, f"cfg-{dataset}"))
                rel = f"predictions/{key}.npz"
                sha = write_predictions(pred, out / rel)
                _, _, y, sc = parts["test"]
                metrics = classification_metrics(y, sc, task, names)
                store.finish(key, metrics, "test", {}, 0.1, predictions=(rel, sha))
    store.close()
    return out


def _db_metric(out: Path, key: str, metric: str = "auroc", cls: str = "") -> float:
    import sqlite3
    with sqlite3.connect(out / "results.db") as c:
        return c.execute("SELECT value FROM metrics WHERE run_key = ? AND metric = ? AND IFNULL(class, '') = ? "
                         "AND split = 'test'", (key, metric, cls)).fetchone()[0]


def test_metadata_round_trip_and_old_files(tmp_path):
    pred = classification_predictions("binary", ["n", "p"], {"test": (["a", "b", "c"], ["1", "2", "3"],
                                      np.array([0, 1, 1]), np.array([0.1, 0.8, 0.4]))},
                                      metadata={"test": {"sex": ["F", None, "M"], "age": [31, None, 40.5]}})
    write_predictions(pred, tmp_path / "p.npz")
    back = read_predictions(tmp_path / "p.npz").splits["test"]
    assert back.metadata["sex"].tolist() == ["F", "", "M"]
    assert back.metadata["age"][0] == 31 and math.isnan(back.metadata["age"][1])
    old = Predictions("classification", "binary", ("n", "p"),
                      {"test": SplitPredictions(["a"], ["1"], {"target": np.array([1]), "score": np.array([0.5])})})
    write_predictions(old, tmp_path / "old.npz")
    assert read_predictions(tmp_path / "old.npz").splits["test"].metadata == {}


def test_export_recomputes_every_auroc(tmp_path):
    out = make_output(tmp_path)
    csv_path = tmp_path / "preds.csv"
    summary = export_predictions(out, csv_path)
    assert summary.units == 8 and not summary.skipped
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["run_key", "dataset", "backbone", "protocol", "label_text", "seed", "split",
                             "sample_key", "patient_id", "class", "target", "score"]
    assert summary.rows == len(rows) == 2 * 2 * 150 + 2 * 2 * 150 * 3
    groups = defaultdict(list)
    for r in rows:
        if r["split"] == "test":
            groups[(r["run_key"], r["class"])].append((int(r["target"]), float(r["score"])))
    for run in load_runs(out):
        classes = {c for (k, c) in groups if k == run.key}
        per = {}
        for c in classes:
            y, s = map(np.array, zip(*groups[(run.key, c)]))
            per[c] = roc_auc_score(y, s)
            if c:
                assert abs(per[c] - _db_metric(out, run.key, "auroc", c)) < 1e-6
        assert abs(np.mean(list(per.values())) - _db_metric(out, run.key)) < 1e-6
    assert {r["class"] for r in rows if r["dataset"] == "bin"} == {""}
    assert {r["label_text"] for r in rows} == {"linear bin", "linear mc", "linear ml"}


def test_damaged_or_replaced_predictions_file_is_named(tmp_path):
    out = make_output(tmp_path)
    path = out / "predictions" / "bin-vit-1.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="bin-vit-1.npz.*checksum"):
        export_predictions(out, tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()
    # a valid predictions file put in place of another one: also refused
    path.write_bytes((out / "predictions" / "bin-vit-0.npz").read_bytes())
    with pytest.raises(DataError, match="bin-vit-1.npz"):
        compare_table(out, bootstrap=20)
    path.unlink()
    with pytest.raises(DataError, match="bin-vit-1.npz.*missing"):
        export_predictions(out, tmp_path / "x.csv")
    assert main(["export-predictions", str(out), "--out", str(tmp_path / "x.csv")]) == 2


def test_compare_table_pairs_by_config_and_corrects(tmp_path):
    out = make_output(tmp_path)
    rows = compare_table(out, "auroc", bootstrap=300, per_seed=True, per_class=True)
    primary = [r for r in rows if not r["detail"]]
    assert [(r["dataset"], r["backbone_a"], r["backbone_b"]) for r in primary] == [
        ("bin", "resnet", "vit"), ("mc", "resnet", "vit"), ("ml", "resnet", "vit")]
    b = primary[0]
    assert b["seeds"] == [0, 1] and b["n_samples"] == 90 and b["resampled_by"] == "sample"
    # values are the seed means of the database's AUROCs
    assert b["value_a"] == pytest.approx(np.mean([_db_metric(out, f"bin-resnet-{s}") for s in (0, 1)]), abs=1e-9)
    assert b["value_b"] == pytest.approx(np.mean([_db_metric(out, f"bin-vit-{s}") for s in (0, 1)]), abs=1e-9)
    assert b["test"] == "delong" and b["p"] == b["p_delong"] and b["diff"] < 0
    assert b["seed_diffs"] == pytest.approx([_db_metric(out, f"bin-resnet-{s}") - _db_metric(out, f"bin-vit-{s}")
                                             for s in (0, 1)], abs=1e-9)
    assert [r["test"] for r in primary[1:]] == ["bootstrap", "bootstrap"]
    np.testing.assert_allclose([r["p_holm"] for r in primary], stats.holm([r["p"] for r in primary]))
    details = [r for r in rows if r["detail"]]
    assert {r["detail"] for r in details} == {"seed", "class"} and all(r["p_holm"] is None for r in details)
    ml_classes = [r for r in details if r["dataset"] == "ml"]
    assert [r["class"] for r in ml_classes] == ["a", "b", "c"] and all(r["p_delong"] is not None for r in ml_classes)
    # DeLong of one class equals the direct computation on the database's per-class AUROC
    c0 = ml_classes[0]
    assert c0["value_a"] == pytest.approx(_db_metric(out, "ml-resnet-0", "auroc", "a"), abs=1e-9)
    # reproducible
    assert compare_table(out, "auroc", bootstrap=300, per_seed=True, per_class=True) == rows
    acc = compare_table(out, "accuracy", bootstrap=100)
    assert all(r["test"] == "bootstrap" and r["p_delong"] is None for r in acc)


def test_compare_with_repeated_patients_uses_patient_bootstrap(tmp_path):
    out = make_output(tmp_path, repeated_patients=True)
    rows = compare_table(out, "auroc", bootstrap=100)
    b = rows[0]
    assert b["resampled_by"] == "patient" and b["n_patients"] == 30
    assert b["test"] == "bootstrap" and b["p_delong"] is not None and "patients" in b["note"]


def test_subgroups_from_stored_and_external_metadata(tmp_path):
    out = make_output(tmp_path)
    rows = subgroup_table(out, "sex", "auroc", bootstrap=100)
    groups = [r for r in rows if r["row"] == "group" and r["dataset"] == "bin" and r["backbone"] == "resnet"]
    assert [g["group"] for g in groups] == ["F", "M"] and [g["n"] for g in groups] == [45, 45]
    # seed mean of sklearn's AUROC in the group, recomputed from the predictions files
    for g in groups:
        vals = []
        for s in (0, 1):
            sp = read_predictions(out / "predictions" / f"bin-resnet-{s}.npz").splits["test"]
            m = sp.metadata["sex"] == g["group"]
            vals.append(roc_auc_score(sp.columns["target"][m], sp.columns["score"][m]))
        assert g["value"] == pytest.approx(np.mean(vals), abs=1e-9)
    gap = [r for r in rows if r["row"] == "gap" and r["dataset"] == "bin" and r["backbone"] == "resnet"][0]
    assert gap["value"] == pytest.approx(abs(groups[0]["value"] - groups[1]["value"]))
    # numeric metadata with missing values: the missing group is reported, not part of the gap
    age = subgroup_table(out, "age", "auroc", bootstrap=50)
    assert "(missing)" in {r["group"] for r in age if r["row"] == "group"}
    gap = [r for r in age if r["row"] == "gap"][0]
    assert "(missing)" not in (gap["worst"], gap["best"])
    # external metadata (sample_key -> value) for predictions stored without the column
    ext = {f"bin-test-{i}": ("a" if i < 30 else "b") for i in range(90)}
    rows = subgroup_table(out, "site", "auroc", bootstrap=50, metadata=ext)
    assert {r["group"] for r in rows if r["row"] == "group" and r["dataset"] == "bin"} == {"a", "b"}
    with pytest.raises(DataError, match="site"):
        subgroup_table(out, "site", bootstrap=10)


def test_calibration_threshold_chosen_on_val(tmp_path):
    out = make_output(tmp_path)
    rows = calibration_summary(out, bins=10)
    r = [r for r in rows if r["run_key"] == "bin-vit-0"][0]
    pv = read_predictions(out / "predictions" / "bin-vit-0.npz")
    val, te = pv.splits["val"], pv.splits["test"]
    thr = stats.choose_threshold(val.columns["target"], val.columns["score"])
    assert r["threshold"] == thr and r["threshold_method"] == "youden"
    y, s = te.columns["target"], te.columns["score"]
    assert r["sensitivity"] == pytest.approx(((s >= thr) & (y == 1)).sum() / (y == 1).sum())
    assert r["specificity"] == pytest.approx(((s < thr) & (y == 0)).sum() / (y == 0).sum())
    assert r["ece"] == pytest.approx(stats.ece(y, s, 10)) and r["brier"] == pytest.approx(np.mean((s - y) ** 2))
    ml = [r for r in rows if r["run_key"] == "ml-vit-0"]
    assert [r["class"] for r in ml] == ["a", "b", "c"] and all(r["threshold"] is not None for r in ml)
    mc = [r for r in rows if r["run_key"] == "mc-vit-0"]
    assert mc[0]["class"] == "top-label" and mc[0]["threshold"] is None
    sens = calibration_summary(out, threshold="sensitivity", target_sensitivity=0.9)
    r9 = [r for r in sens if r["run_key"] == "bin-vit-0"][0]
    assert r9["threshold"] == stats.choose_threshold(val.columns["target"], val.columns["score"], "sensitivity", 0.9)


def test_cli_commands(tmp_path, capsys):
    out = make_output(tmp_path)
    assert main(["compare", str(out), "--bootstrap", "50", "--csv", str(tmp_path / "c.csv")]) == 0
    text = capsys.readouterr().out
    assert "resnet" in text and "p_holm" in text and "delong" in text
    assert (tmp_path / "c.csv").read_text().count("\n") == 4
    assert main(["compare", str(out), "--bootstrap", "50", "--json", "--metric", "auprc"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 3 and all(r["metric"] == "auprc" for r in data)
    assert main(["compare", str(out), "--metric", "dice"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main(["subgroups", str(out), "--by", "sex", "--bootstrap", "20"]) == 0
    assert "gap" in capsys.readouterr().out
    meta = tmp_path / "meta.csv"
    meta.write_text("sample_key,site\n" + "".join(f"bin-test-{i},{'x' if i % 3 else 'y'}\n" for i in range(90)))
    assert main(["subgroups", str(out), "--by", "site", "--metadata", str(meta), "--bootstrap", "20", "--json"]) == 0
    assert {r["group"] for r in json.loads(capsys.readouterr().out) if r["row"] == "group"} >= {"x", "y"}
    assert main(["calibration", str(out), "--plots", str(tmp_path / "plots")]) == 0
    assert "ECE" in capsys.readouterr().out
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 8 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert main(["export-predictions", str(out), "--out", str(tmp_path / "e.csv")]) == 0
    assert "8 units" in capsys.readouterr().out


def test_end_to_end_tiny_experiment(tmp_path, capsys):
    """A real run (phantom data, two tiny random backbones): export, recompute, compare."""
    import yaml
    from medprobe.experiment.config import load_experiment
    from medprobe.experiment.runner import run_experiment
    cfg = {"name": "e2e", "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), "seeds": [0, 1],
           "image_size": 28, "bootstrap": 0, "precision": "fp32",
           "datasets": {"phantom": {"adapter": "phantom", "n": 60, "size": 32, "seed": 0}},
           "backbones": {"vit": {"name": "dinov2_vits14", "weights": "random", "tiny": True},
                         "cnn": {"name": "resnet18", "weights": "random", "tiny": True}},
           "protocols": {"knn": {"k": [5]}, "linear": {"inputs": ["cls"], "blocks": [1], "epochs": 2}}}
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = run_experiment(load_experiment(path), progress=False, log=lambda s: None)
    assert summary.done == 6 and not summary.failed
    out = tmp_path / "out"
    assert main(["export-predictions", str(out), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    checked = 0
    for run in load_runs(out):
        test = [r for r in rows if r["run_key"] == run.key and r["split"] == "test"]
        by_class = defaultdict(list)
        for r in test:
            by_class[r["class"]].append((int(r["target"]), float(r["score"])))
        aucs = [roc_auc_score(*map(np.array, zip(*v))) for v in by_class.values()]
        assert abs(np.mean(aucs) - _db_metric(out, run.key)) < 1e-6
        checked += 1
    assert checked == 6
    capsys.readouterr()
    assert main(["compare", str(out), "--bootstrap", "200", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert {(r["protocol"], r["label"]) for r in table} == {("knn", "knn k=5"), ("linear", "linear")}
    lin = [r for r in table if r["protocol"] == "linear"][0]
    assert lin["seeds"] == [0, 1] and {lin["backbone_a"], lin["backbone_b"]} == {"cnn", "vit"}
    assert lin["p_holm"] is not None and lin["value_a"] is not None
