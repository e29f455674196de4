"""The experiment runner: validation before work, results in SQLite, resume after SIGKILL."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medprobe.errors import ConfigError
from medprobe.experiment.config import load_experiment
from medprobe.experiment.runner import plan_experiment, run_experiment


def experiment(tmp_path: Path, out: str = "run", **changes) -> Path:
    cfg = {
        "name": "tiny",
        "output_dir": str(tmp_path / out),
        "cache_dir": str(tmp_path / "cache"),
        "seeds": [0, 1],
        "image_size": 28,
        "bootstrap": 50,
        "precision": "fp32",
        "datasets": {"phantom": {"adapter": "phantom", "n": 60, "size": 32, "seed": 0}},
        "backbones": {"vit": {"name": "dinov2_vits14", "weights": "random", "tiny": True}},
        "protocols": {
            "knn": {"k": [5, 10]},
            "linear": {"inputs": ["cls", "cls+mean"], "blocks": [1, 2], "epochs": 3},
            "fewshot": {"shots": [1, 2], "repeats": 2},
            "metadata": {"columns": ["sex"]},
        },
    }
    for k, v in changes.items():
        cfg[k] = v
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def db_rows(out: Path):
    with sqlite3.connect(out / "results.db") as c:
        runs = dict(c.execute("SELECT key, status FROM runs").fetchall())
        metrics = c.execute("SELECT run_key, split, metric, IFNULL(class, ''), value FROM metrics").fetchall()
    return runs, metrics


def test_run_writes_results_and_resume_skips_done(tmp_path):
    config = load_experiment(experiment(tmp_path))
    plan = plan_experiment(config)
    assert len(plan.units) == 2 + 2 + 2 * 2 * 2 + 2  # knn ks, linear seeds, fewshot shots x probes x repeats, metadata
    summary = run_experiment(config, progress=False, log=lambda s: None)
    assert summary.done == len(plan.units) and not summary.failed
    runs, metrics = db_rows(config.output_path)
    assert set(runs.values()) == {"done"}
    names = {m[2] for m in metrics}
    assert {"auroc", "auprc", "accuracy", "balanced_accuracy", "kappa", "recall", "specificity"} <= names
    again = run_experiment(config, progress=False, log=lambda s: None)
    assert again.done == 0 and again.skipped_done == len(plan.units)
    assert db_rows(config.output_path) == (runs, metrics)


def test_interrupted_unit_is_redone(tmp_path, monkeypatch):
    config = load_experiment(experiment(tmp_path, protocols={"linear": {"blocks": [1], "epochs": 2}}))
    from medprobe.protocols.frozen import Linear
    original = Linear.run
    calls = {"n": 0}

    def flaky(self, unit, options, ctx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # like a kill in the middle of the second unit
        return original(self, unit, options, ctx)

    monkeypatch.setattr(Linear, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, progress=False, log=lambda s: None)
    runs, _ = db_rows(config.output_path)
    assert sorted(runs.values()) == ["done", "running"]
    monkeypatch.setattr(Linear, "run", original)
    summary = run_experiment(config, progress=False, log=lambda s: None)
    assert summary.done == 1 and summary.skipped_done == 1
    assert set(db_rows(config.output_path)[0].values()) == {"done"}


def _medprobe(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "medprobe", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _done_count(out: Path) -> int:
    try:
        with sqlite3.connect(out / "results.db", timeout=1) as c:
            return c.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigkill_at_any_moment_then_rerun_matches_uninterrupted(tmp_path):
    reference = experiment(tmp_path, "reference")
    assert _medprobe("run", str(reference), "--quiet").wait(timeout=300) == 0
    ref_runs, ref_metrics = db_rows(tmp_path / "reference")

    killed = experiment(tmp_path, "killed", cache_dir=str(tmp_path / "cache2"))
    out = tmp_path / "killed"
    for threshold in (0, 3, 9):  # during extraction / after a few units / later
        proc = _medprobe("run", str(killed), "--quiet")
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if (threshold == 0 and any((tmp_path / "cache2").glob("*.tmp-*"))) or \
                    (threshold and _done_count(out) >= threshold):
                break
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _medprobe("run", str(killed), "--quiet").wait(timeout=300) == 0
    runs, metrics = db_rows(out)
    assert runs == ref_runs  # same keys, all done
    assert len(metrics) == len(set(m[:4] for m in metrics))  # no duplicate metric rows
    assert sorted(metrics) == sorted(ref_metrics)  # identical numbers


def test_config_errors_before_any_work(tmp_path):
    bad = {
        "protocols": {"knn": {"k": [10], "temprature": 0.1}},
    }
    with pytest.raises(ConfigError, match="temperature"):
        plan_experiment(load_experiment(experiment(tmp_path, **bad)))
    with pytest.raises(ConfigError, match="dinov2_vits14"):
        plan_experiment(load_experiment(experiment(tmp_path, backbones={"b": {"name": "dinov2_vits41"}})))
    with pytest.raises(ConfigError, match="epochs"):
        plan_experiment(load_experiment(experiment(tmp_path, protocols={"linear": {"epochs": 0}})))
    with pytest.raises(ConfigError, match="expected an integer"):
        load_experiment(experiment(tmp_path, seeds=["a"]))
    with pytest.raises(ConfigError, match="protocol"):
        plan_experiment(load_experiment(experiment(tmp_path, protocols={"knnn": {}})))
    with pytest.raises(ConfigError, match="missing.npz"):
        plan_experiment(load_experiment(experiment(
            tmp_path, datasets={"d": {"adapter": "medmnist", "root": str(tmp_path / "missing.npz")}})))
    with pytest.raises(ConfigError, match="image_size"):
        load_experiment(experiment(tmp_path, image_size=2))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_cli_run_dry_run_and_set(tmp_path, capsys):
    from medprobe.cli import main
    path = experiment(tmp_path)
    assert main(["run", str(path), "--dry-run", "--set", "protocols.fewshot.repeats=1"]) == 0
    out = capsys.readouterr().out
    assert "phantom x vit x fewshot: 4 units" in out
    assert main(["run", str(path), "--set", "protocols.knn.k=0", "--dry-run"]) == 2
    assert "k" in capsys.readouterr().err
