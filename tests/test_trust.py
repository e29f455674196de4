"""Issue 12's first list, each bullet reproduced and now behaving correctly.

Changed options rerun (never "already done"); different configurations are never pooled;
a resume reuses the store of the whole experiment; one writer per output folder; a done unit's
rows are never deleted; undefined metrics and failed units reach the report without crashing it.
"""
from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
import yaml

from medprobe.cli import main
from medprobe.errors import ConfigError
from medprobe.experiment.config import load_experiment
from medprobe.experiment.lock import OutputLock
from medprobe.experiment.runner import plan_experiment, run_experiment
from medprobe.metrics import MetricValue
from medprobe.results.report import build_report
from medprobe.results.store import ResultsStore, RunRecord
from medprobe.results.tables import load_results, summarize


def _write(tmp_path: Path, protocols: dict, name: str = "exp", seeds=(0,), **extra) -> Path:
    cfg = {"name": "trust", "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
           "seeds": list(seeds), "image_size": 28, "bootstrap": 20, "precision": "fp32",
           "datasets": {"p": {"adapter": "phantom", "n": 48, "size": 32, "seed": 0}},
           "backbones": {"vit": {"name": "dinov2_vits14", "weights": "random", "tiny": True}},
           "protocols": protocols, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(path: Path):
    return run_experiment(load_experiment(path), progress=False, log=lambda s: None)


def test_an_edited_option_reruns_instead_of_being_already_done(tmp_path):
    first = _run(_write(tmp_path, {"knn": {"k": [3], "temperature": 0.07}}))
    assert first.done == 1
    assert _run(_write(tmp_path, {"knn": {"k": [3], "temperature": 0.07}})).skipped_done == 1
    edited = _run(_write(tmp_path, {"knn": {"k": [3], "temperature": 0.5}}))
    assert edited.done == 1 and edited.skipped_done == 0


def test_two_configurations_are_never_pooled_and_get_derived_labels(tmp_path):
    _run(_write(tmp_path, {"linear": {"epochs": 2, "lrs": [0.001]}}))
    _run(_write(tmp_path, {"linear": {"epochs": 3, "lrs": [0.001]}}))
    summary = summarize(load_results(tmp_path / "run"))
    auroc = summary[summary["metric"] == "auroc"]
    assert len(auroc) == 2 and set(auroc["n"]) == {1}  # not one row with n = 2
    assert set(auroc["variant"]) == {"linear epochs=2", "linear epochs=3"}


def test_a_resume_reuses_the_store_of_the_whole_experiment(tmp_path):
    linear = {"linear": {"blocks": [1, 2], "epochs": 2, "lrs": [0.001]}}
    _run(_write(tmp_path, linear))
    stores = sorted(p.name for p in (tmp_path / "cache").iterdir())
    plan = plan_experiment(load_experiment(_write(tmp_path, {**linear, "knn": {"k": [3]}})))
    assert plan.needs[("p", "vit")].last_blocks == 2  # the done linear unit's needs count too
    summary = _run(_write(tmp_path, {**linear, "knn": {"k": [3]}}))
    assert summary.done == 1 and summary.skipped_done == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == stores  # no second extraction


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, capsys):
    path = _write(tmp_path, {"knn": {"k": [3]}})
    out = tmp_path / "run"
    out.mkdir()
    with OutputLock(out, "medprobe run other"):
        with pytest.raises(ConfigError, match=r"in use by another run .*PID \d+ on host"):
            _run(path)
        assert main(["run", str(path), "--quiet"]) == 2
        assert "in use by another run" in capsys.readouterr().err
    assert _run(path).done == 1  # the lock was released: the next run proceeds


def _record(key: str, **changes) -> RunRecord:
    base = dict(key=key, experiment="e", dataset="d", backbone="b", weights="random", protocol="linear",
                variant="linear", params={}, seed=0, config_key="c" + key, options={"epochs": 1},
                backbone_key="bk", backbone_identity={"name": "b"}, dataset_key="dk", env={})
    base.update(changes)
    return RunRecord(**base)


def test_start_never_deletes_the_rows_of_a_done_unit(tmp_path):
    store = ResultsStore(tmp_path / "results.db")
    assert store.start(_record("u1"))
    store.finish("u1", [MetricValue("auroc", 0.8)], "test", {}, 1.0)
    assert not store.start(_record("u1"))  # a second run reaching the same unit
    store.fail("u1", "boom", 1.0)          # and failing it afterwards
    store.close()
    with sqlite3.connect(tmp_path / "results.db") as c:
        assert c.execute("SELECT status FROM runs WHERE key='u1'").fetchone() == ("done",)
        assert c.execute("SELECT value FROM metrics WHERE run_key='u1'").fetchall() == [(0.8,)]


def test_undefined_headline_and_failed_units_reach_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    store = ResultsStore(out / "results.db")
    store.start(_record("u1", variant="metadata sex (linear)", protocol="metadata"))
    store.finish("u1", [MetricValue("auroc", math.nan, note="test split has one class (F)"),
                        MetricValue("accuracy", 1.0)], "test", {}, 1.0)
    store.start(_record("u2", protocol="knn", variant="knn k=5"))
    store.fail("u2", "ConfigError: something went wrong in <unit>", 1.0)
    store.close()
    report = build_report(out)
    row = report.summary[(report.summary["metric"] == "auroc")].iloc[0]
    assert math.isnan(row["mean"]) and "one class" in row["note"]
    assert [f["variant"] for f in report.failed] == ["knn k=5"]
    md = (out / "report.md").read_text()
    assert "n/a" in md and "one class" in md and "Failed units" in md and "something went wrong" in md
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "n/a" in printed and "failed:" in printed


def test_report_in_a_read_only_folder_writes_nothing(tmp_path, capsys, monkeypatch):
    import os
    out = tmp_path / "out"
    store = ResultsStore(out / "results.db")
    store.start(_record("u1"))
    store.finish("u1", [MetricValue("auroc", 0.7)], "test", {}, 1.0)
    store.close()
    real_access = os.access
    # as root (CI) permissions do not bind: the folder is made to look read-only to the report
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == out else real_access(p, mode))
    before = sorted(p.name for p in out.iterdir())
    assert main(["report", str(out)]) == 0
    assert "not writable" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_rerun_with_nothing_left_writes_nothing(tmp_path):
    path = _write(tmp_path, {"knn": {"k": [3]}})
    _run(path)
    out = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert _run(path).skipped_done == 1
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_every_run_records_its_environment(tmp_path):
    _run(_write(tmp_path, {"knn": {"k": [3]}}))
    report = build_report(tmp_path / "run", write=False)
    (env, n), = report.environments
    assert n == 1 and env["packages"]["torch"] and env["precision"] == "fp32" and env["device"] == "cpu"
    assert env["medprobe"] and env["python"]


# --------------------------------------------------------------------------- filesystem faults (issue 18 items 6, 8)
def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path, {"knn": {"k": [3]}})
    (tmp_path / "run").write_text("not a folder")
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err


def test_results_db_that_is_a_folder_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path, {"knn": {"k": [3]}})
    (tmp_path / "run" / "results.db").mkdir(parents=True)
    assert main(["run", str(path), "--quiet"]) == 2
    assert "is a folder, not a results database" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "run")]) == 2


@pytest.mark.parametrize("content", [b"", b"this is not a database at all" * 100])
def test_a_damaged_results_db_is_a_clear_error(tmp_path, capsys, content):
    path = _write(tmp_path, {"knn": {"k": [3]}})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.db").write_bytes(content)
    assert main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "results.db" in err and "Traceback" not in err
    code = main(["run", str(path), "--quiet"])
    err = capsys.readouterr().err
    if content:  # not a database: refused, never overwritten
        assert code == 2 and "not a medprobe results database" in err
        assert (tmp_path / "run" / "results.db").read_bytes() == content
    else:  # an empty file holds no results: the run starts it afresh
        assert code == 0


def test_two_backbones_are_compared_in_the_html_report(tmp_path):
    path = _write(tmp_path, {"knn": {"k": [3]}}, backbones={
        "vit": {"name": "dinov2_vits14", "weights": "random", "tiny": True},
        "cnn": {"name": "resnet18", "weights": "random", "tiny": True}})
    assert _run(path).done == 2
    assert main(["report", str(tmp_path / "run"), "--html"]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Backbone comparison" in page and "p (Holm)" in page


# --------------------------------------------------------------------------- parallel workers (issue 14 item 4)
def _metric_rows(out: Path) -> dict:
    with sqlite3.connect(out / "results.db") as c:
        rows = c.execute("SELECT m.run_key, m.split, m.metric, IFNULL(m.class, ''), m.value FROM metrics m "
                         "JOIN runs r ON r.key = m.run_key WHERE r.status = 'done'").fetchall()
    import re
    timing = re.compile(r"(_s$|_s_|ms|latency|memory|throughput|per_second)")
    return {r[:4]: r[4] for r in rows if not timing.search(r[2])}  # wall-clock costs differ between runs


PARALLEL = {"knn": {"k": [3, 5]}, "linear": {"epochs": 2, "lrs": [0.001, 0.01]},
            "finetune": {"epochs": 1, "batch_size": 8, "augment": []}}


@pytest.mark.parametrize("launcher", ["processes", "submitit-local"])
def test_workers_give_the_results_of_a_sequential_run(tmp_path, launcher):
    seq = tmp_path / "seq"
    seq.mkdir()
    _run(_write(seq, PARALLEL, seeds=(0, 1)))
    par = tmp_path / "par"
    par.mkdir()
    summary = run_experiment(load_experiment(_write(par, PARALLEL, seeds=(0, 1))), progress=False,
                             log=lambda s: None, workers=2, launcher=launcher)
    assert summary.done == 2 + 2 + 2 and not summary.failed
    assert not list((par / "run" / "shards").glob("*.db"))  # merged
    a, b = _metric_rows(seq / "run"), _metric_rows(par / "run")
    assert a.keys() == b.keys() and len(a) > 20
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k
    # and a rerun finds everything done
    assert _run(_write(par, PARALLEL, seeds=(0, 1))).skipped_done == 6


def test_leftover_shards_are_merged_by_report_and_resume(tmp_path):
    from medprobe.experiment.parallel import worker_main
    config = load_experiment(_write(tmp_path, {"knn": {"k": [3, 5]}}))
    plan = plan_experiment(config)
    out = config.output_path
    (out / "shards").mkdir(parents=True)
    first = plan.units[0].key
    assert worker_main(config, [first], str(out / "shards" / "job-0.db"), "cpu", 1)["done"] == 1
    assert main(["report", str(out)]) == 0  # a parent killed before merging: report merges
    assert not list((out / "shards").glob("*.db"))
    summary = _run(_write(tmp_path, {"knn": {"k": [3, 5]}}))
    assert summary.skipped_done == 1 and summary.done == 1


# --------------------------------------------------------------------------- validation before any work (issue 18 item 9)
def test_dry_run_refuses_an_image_size_off_the_patch_grid(tmp_path, capsys):
    path = _write(tmp_path, {"knn": {"k": [3]}}, image_size=30)
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "image_size: 30 is not a multiple of dinov2_vits14's patch size 14; use 28 or 42" in err


def test_dry_run_refuses_a_dataset_without_a_test_split(tmp_path, capsys):
    from medprobe.data.phantom import write_phantom_files
    root = tmp_path / "data"
    write_phantom_files(root, n=12, size=32, seed=0)
    csv = root / "manifest.csv"
    lines = [",".join(c for i, c in enumerate(line.split(",")) if i != 1)  # drop the mask column
             for line in csv.read_text().splitlines()]
    col = lines[0].split(",").index("split")
    rows = [line.split(",") for line in lines[1:]]
    for r in rows:
        r[col] = "train" if r[col] == "test" else r[col]
    (root / "notest.csv").write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n")
    path = _write(tmp_path, {"knn": {"k": [3]}},
                  datasets={"d": {"adapter": "manifest", "root": str(root / "notest.csv")}})
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "needs a 'test' split" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("meta", ['{"hello": 1}', '[1, 2, 3]', '"text"'])
def test_a_meta_json_that_is_not_a_store_is_rebuilt_and_said(tmp_path, capsys, meta):
    path = _write(tmp_path, {"knn": {"k": [3]}})
    _run(path)
    (store,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    (store / "meta.json").write_text(meta)
    (tmp_path / "run" / "results.db").unlink()  # run the unit again: it must read its features afresh
    assert _run(path).done == 1
    assert "is damaged" in capsys.readouterr().err
    assert (store / "meta.json").read_text() != meta


def test_configurations_that_differ_in_a_run_setting_are_labelled_by_it(tmp_path):
    _run(_write(tmp_path, {"knn": {"k": [3]}}, image_size=28))
    _run(_write(tmp_path, {"knn": {"k": [3]}}, image_size=42))
    summary = summarize(load_results(tmp_path / "run"))
    labels = set(summary.loc[summary["metric"] == "auroc", "variant"])
    assert labels == {"knn k=3 image_size=28", "knn k=3 image_size=42"}


def test_a_volume_probe_stores_per_volume_predictions(tmp_path):
    from medprobe.predictions import read_predictions
    path = _write(tmp_path, {"volume_probe": {"pooling": ["mean"], "epochs": 1}},
                  datasets={"v": {"adapter": "phantom", "n": 24, "size": 16, "ndim": 3}})
    assert _run(path).done == 1
    (pred_file,) = (tmp_path / "run" / "predictions").glob("*.npz")
    sp = read_predictions(pred_file).splits["test"]
    assert len(sp) == len(set(sp.keys)) > 0 and set(sp.columns) >= {"target", "score"}
    assert "sex" in sp.metadata
