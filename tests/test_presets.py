"""Presets (one experiment per published table), their stand-ins, ours-vs-published rows, and the
recipe options they use: lr grids, freeze_blocks k=all, reduce-on-plateau, latency, headline metric."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fixtures_more as FM
import fixtures_public as F
from medprobe.data.adapters import build_dataset
from medprobe.data.headline import headline_metric
from medprobe.errors import ConfigError
from medprobe.experiment.runner import plan_experiment, run_experiment
from medprobe.presets import format_published, get_preset, list_presets, load_preset, published_rows
from medprobe.protocols.adapt import training
from medprobe.protocols.base import get_protocol
from test_adapt import built, make_ctx, run_protocol, values

PRESETS = [p.name for p in list_presets()]


def test_every_study_has_presets_with_published_numbers():
    studies = {n.split("/")[0] for n in PRESETS}
    assert studies == {"dinov2_radiology", "wacv_natural_fm", "rad_dino"}
    for study in studies:
        assert sum(len(get_preset(n).published) for n in PRESETS if n.startswith(study)) > 10


@pytest.mark.parametrize("name", PRESETS)
def test_preset_dry_run_with_phantom_stand_ins(name, tmp_path):
    preset = get_preset(name)
    config = load_preset(name, [f"output_dir={tmp_path / 'out'}"], stand_in="phantom", tiny=True)
    plan = plan_experiment(config)
    assert plan.units, name
    exp = preset.experiment
    assert set(config.datasets) == set(exp["datasets"]) and set(preset.stand_in) == set(exp["datasets"])
    for name_, ds in plan.datasets.items():  # a stand-in has the declared kind, dimensionality and classes
        declared = preset.stand_in[name_]
        assert ds.task.kind == declared["task"] and ds.ndim == declared["ndim"]
        if "classes" in declared:
            assert list(ds.task.class_names) == declared["classes"]
    for ref in config.backbone_configs.values():
        assert ref.tiny and ref.weights == "random"
    units = {(u.dataset, u.backbone, u.protocol.name) for u in plan.units}
    merged = (config.source or {}).get("tiny_merged", {})
    for row in preset.published:  # every published number names something the experiment computes
        backbone = merged.get(row["backbone"], row["backbone"])
        assert (row["dataset"], backbone, row["protocol"]) in units, row
        assert isinstance(row["value"], (int, float))
    assert config.published == preset.published and config.source["table"] == preset.source["table"]


# the real adapters on tiny copies of the public datasets: the declared stand-ins match them
FIXTURES = {"nih_chestxray14": F.write_nih, "chexpert": F.write_chexpert, "montgomery": F.write_montgomery,
            "sarscov2_ct": F.write_sarscov2, "amos": F.write_amos, "figshare_brain_tumor": F.write_figshare,
            "vindr_cxr": F.write_vindr, "rsna_pneumonia": F.write_rsna, "candid_ptx": F.write_candid,
            "aptos2019": F.write_aptos, "cbis_ddsm": F.write_cbis, "isic2019": F.write_isic,
            "mimic_cxr_jpg": lambda root: FM.write_mimic_cxr_jpg(root)[0]}
DECLARED = sorted({(n, d) for n in PRESETS for d in get_preset(n).experiment["datasets"]})


@pytest.mark.parametrize("name,dataset", DECLARED)
def test_declared_stand_in_matches_the_adapter(name, dataset, tmp_path):
    preset = get_preset(name)
    entry = dict(preset.experiment["datasets"][dataset])
    adapter = entry.pop("adapter")
    entry.pop("root")
    if adapter == "msd":
        root = F.write_msd(tmp_path)
    else:
        root = FIXTURES[adapter](tmp_path / adapter)
    entry.pop("split_fractions", None)  # the tiny fixtures are too small for some fractions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = build_dataset(adapter, root, **entry)
    declared = preset.stand_in[dataset]
    assert (ds.task.kind, ds.ndim) == (declared["task"], declared["ndim"])
    if "classes" in declared:
        assert list(ds.task.class_names) == declared["classes"]


def test_unknown_preset_and_missing_root_are_user_errors():
    with pytest.raises(ConfigError, match="unknown preset 'table3_linar'.*table3_linear"):
        get_preset("table3_linar")
    with pytest.raises(ConfigError, match="datasets.nih.*needs a root"):
        plan_experiment(load_preset("dinov2_radiology/table3_linear"))


def test_preset_runs_and_reports_published_beside_ours(tmp_path):
    config = load_preset("rad_dino/table1a_vindr", [f"output_dir={tmp_path / 'o'}", "seeds=[0, 1]", "bootstrap=0"],
                         stand_in="phantom", tiny=True)
    summary = run_experiment(config, progress=False)
    assert not summary.failed and summary.done == 6
    rows = published_rows(config.output_path)
    assert len(rows) == len(config.published) == 24
    with sqlite3.connect(config.output_path / "results.db") as c:  # ours = mean over seeds of the stored value
        stored = [v for (v,) in c.execute(
            "SELECT m.value FROM metrics m JOIN runs r ON r.key = m.run_key WHERE r.backbone = 'rad_dino' AND "
            "m.metric = 'auprc' AND m.class = 'Cardiomegaly' AND m.split = 'test'")]
    row = next(r for r in rows if r["backbone"] == "rad_dino" and r["class"] == "Cardiomegaly")
    assert len(stored) == 2 and row["n"] == 2
    assert row["ours"] == pytest.approx(100 * np.mean(stored)) and row["published"] == 69.9
    assert row["ours_sd"] == pytest.approx(100 * np.std(stored, ddof=1))
    lines = format_published(rows)
    assert "not comparable" in lines[0] and any("69.9 ± 0.3" in line for line in lines)


def test_cli_presets_lists_plain_and_json():
    out = subprocess.run([sys.executable, "-m", "medprobe.cli", "presets"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(PRESETS) and lines[0].split("\t")[0] == PRESETS[0]
    assert "nih_chestxray14" in out.stdout
    js = json.loads(subprocess.run([sys.executable, "-m", "medprobe.cli", "presets", "--json"], capture_output=True,
                                   text=True, check=True).stdout)
    assert {r["name"] for r in js} == set(PRESETS) and all(r["datasets"] and r["backbones"] for r in js)


# --------------------------------------------------------------------------- recipes
@pytest.fixture(scope="module")
def phantom():
    return build_dataset("phantom", None, n=32, size=32, seed=0)


def test_lr_list_expands_into_units_with_narrowed_identity(phantom):
    proto = get_protocol("freeze_blocks")
    options = proto.parse_options({"k": [1, 2], "lr": [1e-3, 1e-2]}, "p")
    units = proto.units(options, [0], phantom)
    assert [(u.params["k"], u.params["lr"]) for u in units] == [(1, 1e-3), (1, 1e-2), (2, 1e-3), (2, 1e-2)]
    resolved = [proto.unit_options(options, u) for u in units]
    assert [r["lr"] for r in resolved] == [[1e-3], [1e-2], [1e-3], [1e-2]]
    assert len({json.dumps(r, sort_keys=True) for r in resolved}) == 4
    assert proto.variant(units[1].params) == "freeze_blocks k=1 lr=0.01"
    single = proto.units(proto.parse_options({"k": [1], "lr": 1e-3}, "p"), [0], phantom)
    assert proto.variant(single[0].params) == "freeze_blocks k=1"  # a single lr is not a grid


def test_each_lr_unit_trains_with_its_lr_and_records_val_score_and_latency(phantom, tmp_path, monkeypatch):
    seen = []
    real_fit = training.fit

    def spy(model, train, val, cfg, task, **kw):
        seen.append(cfg.lr)
        return real_fit(model, train, val, cfg, task, **kw)

    monkeypatch.setattr("medprobe.protocols.adapt.protocols.fit", spy)
    for i in range(2):
        _, _, unit, res = run_protocol("finetune", {"epochs": 1, "lr": [1e-4, 3e-3]},
                                       make_ctx(phantom, "deit_s16", tmp_path, 32), unit_index=i)
        v = values(res)
        assert v["val_score"] == pytest.approx(res.info["best_val"])
        assert v["inference_latency_ms_b1"] > 0
    assert seen == [1e-4, 3e-3]


def test_freeze_blocks_all_trains_only_the_head(phantom, tmp_path):
    model, bb, _ = built("freeze_blocks", {"k": ["all"]}, make_ctx(phantom, "deit_s16", tmp_path, 32))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(p.requires_grad for p in bb.parameters()), trainable
    model, bb, _ = built("freeze_blocks", {"k": [bb.num_blocks]}, make_ctx(phantom, "deit_s16", tmp_path, 32))
    assert not any(p.requires_grad for p in bb.parameters())  # the same with the number of blocks


def test_reduce_on_plateau_divides_lr_after_patience():
    s = training.PlateauScale(patience=2)
    for score in (0.5, 0.6, 0.6, 0.55):  # best, better, stall, stall -> / 10
        s.update(score)
    assert s.scale == pytest.approx(0.1)
    s.update(0.7)
    s.update(0.7)
    assert s.scale == pytest.approx(0.1)
    s.update(0.1)
    assert s.scale == pytest.approx(0.01)
    assert training.lr_factor(50, 100, 0, "plateau") == 1.0


def test_plateau_schedule_lowers_the_lr_in_training():
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    y = (x[:, 0] > 0).long().numpy()
    from medprobe.protocols.adapt.data import EmbeddingSource
    train = EmbeddingSource(x.numpy(), np.arange(40), y, "binary")
    val = EmbeddingSource(x.numpy()[:10] * 0, np.arange(10), y[:10], "binary")  # constant input: val never improves
    model = __import__("medprobe.protocols.adapt.models", fromlist=["Classifier"]).Classifier(None, 4, 2)
    cfg = training.TrainConfig(epochs=6, lr=0.1, warmup_epochs=0, schedule="plateau", plateau_patience=1,
                               patience=None, batch_size=10, select_metric="loss")
    res = training.fit(model, train, val, cfg, "binary")
    lrs = [h["lr"] for h in res.history]
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] < 0.1 * 0.05


def test_headline_metric_per_dataset():
    assert headline_metric("aptos2019") == "kappa" and headline_metric("isic2019") == "recall"
    assert headline_metric("vindr_cxr") == headline_metric("rsna_pneumonia") == "auprc"
    assert headline_metric("nih_chestxray14") == "auroc" and headline_metric("montgomery", "segmentation") == "dice_jaccard_mean"
    assert headline_metric("nih_chestxray14", override="auprc") == "auprc"
    with pytest.raises(ConfigError, match="headline_metric"):
        headline_metric("nih_chestxray14", override="dice")


@pytest.mark.parametrize("task,names", [("multiclass", 5), ("multilabel", ["a", "b", "c", "d"])])
@pytest.mark.parametrize("ndim", [2, 3])
def test_phantom_multiclass_and_multilabel(task, names, ndim):
    ds = build_dataset("phantom", None, n=48, size=16, ndim=ndim, task=task, class_names=names)
    c = names if isinstance(names, int) else len(names)
    assert ds.task.kind == task and ds.task.num_classes == c and ds.ndim == ndim
    y = ds.labels()
    assert y.shape == ((48,) if task == "multiclass" else (48, c))
    assert (np.unique(y) == np.arange(c)).all() if task == "multiclass" else set(np.unique(y)) == {0, 1}
    with pytest.raises(ConfigError, match="class_names"):
        build_dataset("phantom", None, n=8, size=16, task="binary", class_names=3)
