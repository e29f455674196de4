"""Presets: one experiment file per published table or figure of the seed studies.

A preset is package data ``presets/<study>/<table>.yaml`` with

* ``source``: the study, its seed file, the table/figure, its title and what it reports;
* ``experiment``: an ordinary experiment (datasets x backbones x protocols, the paper's recipe);
* ``stand_in``: per dataset, the task kind, dimensionality and class names of the real data
  (checked against the adapters by the tests), so ``--stand-in phantom`` can replace it by a
  phantom of the same kind;
* ``published``: the paper's numbers, one row each (dataset, backbone, protocol, optional
  unit params and class, metric, value, optional sd, ``scale`` 100 for percentages).

What a preset needs (dataset adapters, backbones and weights) is derived from its experiment.
:func:`published_rows` reads an output folder and returns "ours vs published" rows.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medprobe.errors import ConfigError, suggest

STAND_INS = ("phantom",)
STAND_IN_SIZE = 32  # phantom pixels (2D side; 3D volumes are size x size x size/2)
STAND_IN_N = {2: 120, 3: 24}  # phantom images / volumes
WEIGHT_OPTIONS = ("classifier_weights",)  # protocol options naming pre-trained weights (random under --tiny)


@dataclass(frozen=True)
class Preset:
    """One preset file: ``name`` is ``<study>/<table>``."""

    name: str
    raw: dict[str, Any]

    @property
    def source(self) -> dict[str, Any]:
        return dict(self.raw.get("source") or {})

    @property
    def experiment(self) -> dict[str, Any]:
        return copy.deepcopy(self.raw["experiment"])

    @property
    def stand_in(self) -> dict[str, dict[str, Any]]:
        return copy.deepcopy(self.raw.get("stand_in") or {})

    @property
    def published(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self.raw.get("published") or [])

    def needs(self) -> dict[str, dict[str, str]]:
        """Datasets (adapter names) and backbones (name and weights) the preset runs on, from its experiment."""
        exp = self.raw["experiment"]
        data = {k: v["adapter"] for k, v in exp["datasets"].items()}
        weights = {k: f"{v['name']} ({v.get('weights', 'random')})" for k, v in exp["backbones"].items()}
        return {"datasets": data, "backbones": weights}

    def summary(self) -> dict[str, Any]:
        s = self.source
        return {"name": self.name, "study": s.get("study", ""), "table": s.get("table", ""),
                "title": s.get("title", ""), "protocols": list(self.raw["experiment"]["protocols"]),
                "published": len(self.published), **self.needs()}


def _files() -> list[tuple[str, Any]]:
    root = resources.files(__name__)
    out = []
    for study in sorted(root.iterdir(), key=lambda p: p.name):
        if not study.is_dir() or study.name.startswith(("_", ".")):
            continue
        for f in sorted(study.iterdir(), key=lambda p: p.name):
            if f.name.endswith(".yaml"):
                out.append((f"{study.name}/{f.name[:-5]}", f))
    return out


def _read(name: str, file: Any) -> Preset:
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {name}: not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("experiment"), dict):
        raise ConfigError(f"preset {name}: expected a mapping with an 'experiment' mapping")
    return Preset(name, raw)


def list_presets() -> list[Preset]:
    """Every preset shipped with medprobe, sorted by name."""
    return [_read(n, f) for n, f in _files()]


def get_preset(name: str) -> Preset:
    """The preset ``<study>/<table>`` (or a unique table name); :class:`ConfigError` with close names otherwise."""
    files = dict(_files())
    if name not in files:
        by_table = [n for n in files if n.split("/", 1)[1] == name]
        if len(by_table) != 1:
            raise ConfigError(suggest(name, files, "preset") + " See `medprobe presets`.")
        name = by_table[0]
    return _read(name, files[name])


# --------------------------------------------------------------------------- rewriting
def stand_in_entry(kind: str, declared: dict[str, Any], where: str) -> dict[str, Any]:
    """The dataset entry replacing a real dataset: a phantom of the same task kind and dimensionality."""
    if kind not in STAND_INS:
        raise ConfigError(f"--stand-in: {suggest(kind, STAND_INS, 'stand-in')}")
    task, ndim = declared.get("task"), int(declared.get("ndim", 2))
    if task not in ("binary", "multiclass", "multilabel", "segmentation"):
        raise ConfigError(f"{where}: stand_in task must be binary, multiclass, multilabel or segmentation, got {task!r}")
    entry: dict[str, Any] = {"adapter": "phantom", "task": task, "ndim": ndim, "n": STAND_IN_N[ndim],
                             "size": STAND_IN_SIZE}
    if task in ("multiclass", "multilabel"):
        classes = declared.get("classes")
        entry["class_names"] = list(classes) if isinstance(classes, list) else int(classes or 3)
    return entry


def _tiny_size(name: str, size: int | None) -> int:
    """A quarter of the configured image size, rounded to the patch size (32 px steps for CNNs)."""
    from medprobe.backbones.registry import get_spec
    spec = get_spec(name)
    step = spec.patch_size or 32
    size = size or spec.default_image_size
    return max(2 * step, int(round(size / 4 / step)) * step)


def rewrite(raw: dict[str, Any], stand_in: dict[str, dict[str, Any]] | None = None, kind: str | None = None,
            tiny: bool = False) -> dict[str, Any]:
    """``raw`` with every dataset replaced by its stand-in and/or every backbone at its tiny configuration.

    Tiny: ``tiny: true``, random weights (pre-trained weights do not fit a tiny model), a quarter of
    the image size (distinct sizes stay distinct) and random weights for protocol options that
    name pre-trained weights.
    """
    raw = copy.deepcopy(raw)
    if kind is not None:
        stand_in = stand_in or {}
        datasets = {}
        for i, dname in enumerate(raw["datasets"]):
            if dname not in stand_in:
                raise ConfigError(f"datasets.{dname}: no stand_in declared (task, ndim) to replace it with a {kind}")
            # a seed per entry: two stand-ins of the same kind are different data (and derive different keys)
            datasets[dname] = {**stand_in_entry(kind, stand_in[dname], f"stand_in.{dname}"), "seed": i}
            real = raw["datasets"][dname] if isinstance(raw["datasets"][dname], dict) else {}
            if "test_on" in real:
                datasets[dname]["test_on"] = real["test_on"]  # cross-dataset units stay
            # the stand-in is scored like the dataset it replaces (kappa for APTOS, AUPRC for RSNA...)
            from medprobe.data.headline import headline_metric
            datasets[dname]["headline_metric"] = headline_metric(
                str(real.get("adapter", "")), datasets[dname]["task"], real.get("headline_metric"))
        raw["datasets"] = datasets
    if tiny:
        top = raw.get("image_size")
        seen: dict[str, str] = {}
        merged: dict[str, str] = {}
        for bname, entry in list(raw["backbones"].items()):
            entry = dict(entry)
            entry["image_size"] = _tiny_size(entry["name"], entry.get("image_size") or top)
            entry.update(tiny=True, weights="random")
            same = json.dumps(entry, sort_keys=True, default=str)
            if same in seen:  # differed only by weights: one tiny random model computes both
                merged[bname] = seen[same]
                del raw["backbones"][bname]
                continue
            seen[same] = bname
            raw["backbones"][bname] = entry
        raw["image_size"] = None
        if merged:
            raw["source"] = {**(raw.get("source") or {}), "tiny_merged": merged}
        for popts in raw["protocols"].values():
            for key in WEIGHT_OPTIONS:
                if isinstance(popts, dict) and key in popts:
                    popts[key] = "random"
    return raw


def preset_experiment(name: str, overrides: list[str] | None = None, stand_in: str | None = None,
                      tiny: bool = False) -> dict[str, Any]:
    """The raw experiment mapping of preset ``name`` with ``--set`` overrides, stand-ins and tiny applied,
    carrying its ``source`` and ``published`` sections."""
    from medprobe.experiment.config import apply_overrides
    preset = get_preset(name)
    raw = preset.experiment
    raw = apply_overrides(raw, overrides or [])
    overridden_out = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides or [])
    raw = rewrite(raw, preset.stand_in, stand_in, tiny)
    if not overridden_out and (stand_in or tiny):
        suffix = "-".join(filter(None, [stand_in, "tiny" if tiny else None]))
        raw["output_dir"] = f"{raw['output_dir']}-{suffix}"
    raw["source"] = {"preset": preset.name, **preset.source, **(raw.get("source") or {}),
                     "stand_in": stand_in, "tiny": bool(tiny)}
    raw["published"] = preset.published
    return raw


def load_preset(name: str, overrides: list[str] | None = None, stand_in: str | None = None, tiny: bool = False):
    """The validated :class:`~medprobe.experiment.config.ExperimentConfig` of a preset."""
    from medprobe.experiment.config import ExperimentConfig
    from medprobe.options import parse
    return parse(ExperimentConfig, preset_experiment(name, overrides, stand_in, tiny), f"preset {name}")


# --------------------------------------------------------------------------- ours vs published
def _matches(params: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(k in params and json.dumps(params[k], sort_keys=True) == json.dumps(v, sort_keys=True)
               for k, v in wanted.items())


def _runs(output_dir: Path) -> list[dict[str, Any]]:
    from medprobe.results.store import connect_readonly
    db = output_dir / "results.db"
    if not db.is_file():
        return []
    conn = connect_readonly(db)
    try:
        runs = {r[0]: {"dataset": r[1], "backbone": r[2], "protocol": r[3], "params": json.loads(r[4] or "{}"),
                       "seed": r[5], "metrics": {}}
                for r in conn.execute("SELECT key, dataset, backbone, protocol, params_json, seed FROM runs "
                                      "WHERE status = 'done'")}
        for key, split, metric, cls, value in conn.execute("SELECT run_key, split, metric, class, value FROM metrics"):
            if key in runs:
                runs[key]["metrics"][(split, metric, cls)] = value
    finally:
        conn.close()
    return list(runs.values())


def _value(run: dict[str, Any], metric: str, cls: str | None) -> float | None:
    for (split, m, c), v in run["metrics"].items():
        if m == metric and c == cls and split == "test":
            return v
    return None


def published_rows(output_dir: str | Path) -> list[dict[str, Any]]:
    """"Ours vs published" rows of a preset run (an empty list when the output holds no preset).

    Ours: the units matching the row's dataset, backbone, protocol and params; where a seed has
    several (e.g. a list of learning rates) the one with the best ``val_score`` is taken, as the
    studies report the value chosen on validation; then mean and sd over seeds, in the paper's
    scale (``scale`` 100 for percentages).
    """
    out = Path(output_dir)
    path = out / "experiment.json"
    if not path.is_file():
        return []
    exp = json.loads(path.read_text())
    published = exp.get("published") or []
    source = exp.get("source") or {}
    runs = _runs(out)
    rows = []
    for p in published:
        scale = float(p.get("scale", 1))
        cand = [r for r in runs if r["dataset"] == p["dataset"] and r["backbone"] == p["backbone"]
                and r["protocol"] == p["protocol"] and _matches(r["params"], p.get("params") or {})]
        by_seed: dict[int, list[dict[str, Any]]] = {}
        for r in cand:
            by_seed.setdefault(r["seed"], []).append(r)
        values, note = [], ""
        for seed, rs in sorted(by_seed.items()):
            if len(rs) > 1:
                val = [_value(r, "val_score", None) for r in rs]
                if all(v is not None and v == v for v in val):
                    rs = [rs[max(range(len(rs)), key=lambda i: val[i])]]
                    note = "best of several units on validation"
                else:
                    note = f"mean of {len(rs)} matching units (no val_score to choose one)"
            vs = [_value(r, p["metric"], p.get("class")) for r in rs]
            vs = [v for v in vs if v is not None and v == v]
            if vs:
                values.append(sum(vs) / len(vs))
        ours = sum(values) / len(values) * scale if values else None
        sd = (math.sqrt(sum((v * scale - ours) ** 2 for v in values) / (len(values) - 1))
              if ours is not None and len(values) > 1 else None)
        rows.append({"preset": source.get("preset"), "table": source.get("table"), "dataset": p["dataset"],
                     "backbone": p["backbone"], "protocol": p["protocol"], "params": p.get("params") or {},
                     "metric": p["metric"], "class": p.get("class"), "published": p["value"],
                     "published_sd": p.get("sd"), "ours": ours, "ours_sd": sd, "n": len(values),
                     "delta": None if ours is None else ours - float(p["value"]), "note": note,
                     "stand_in": source.get("stand_in"), "tiny": source.get("tiny")})
    return rows


def format_published(rows: list[dict[str, Any]]) -> list[str]:
    """Plain-text table lines of :func:`published_rows`."""
    if not rows:
        return []

    def num(v: Any, sd: Any = None) -> str:
        if v is None:
            return "n/a"
        s = f"{v:.3f}" if abs(v) < 2 else f"{v:.1f}"
        return s + (f" ± {sd:.3f}" if sd is not None and abs(v) < 2 else f" ± {sd:.1f}" if sd is not None else "")

    head = rows[0]
    lines = [f"published ({head['table']}) vs ours" +
             (f" [stand-in: {head['stand_in']}{', tiny' if head['tiny'] else ''}: not comparable]"
              if head["stand_in"] or head["tiny"] else "")]
    table = [("dataset", "backbone", "protocol", "metric", "published", "ours", "n")]
    for r in rows:
        proto = r["protocol"] + "".join(f" {k}={v}" for k, v in r["params"].items())
        metric = r["metric"] + (f" [{r['class']}]" if r["class"] else "")
        table.append((r["dataset"], r["backbone"], proto, metric, num(r["published"], r["published_sd"]),
                      num(r["ours"], r["ours_sd"]), str(r["n"])))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip() for t in table]
    return lines
