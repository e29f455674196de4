"""Derived identity: a unit's key changes with every option, the data's labels and the weights' bytes.

The contract test is parametrised over every registered protocol and every leaf field of its
Options dataclass (nested dataclasses included): nothing decides a result without entering its key.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from medprobe.data.adapters import build_dataset
from medprobe.errors import MedprobeError
from medprobe.experiment.config import load_experiment
from medprobe.experiment.runner import plan_experiment, unit_identity
from medprobe.identity import canonical, digest
from medprobe.protocols import list_protocols
from medprobe.protocols.base import get_protocol

DATASET_ID = {"settings": {"adapter": "phantom"}, "fingerprint": "f" * 16}
BACKBONE_ID = {"name": "dinov2_vits14", "weights": "random", "tiny": True, "overrides": {}}
SETTINGS = {"image_size": 28, "precision": "fp32", "batch_size": 64, "bootstrap": 50}
# options a protocol cannot be parsed without
REQUIRED = {"metadata": {"columns": ["sex", "view"]}, "freeze_blocks": {"k": [0, 1]}, "first_blocks": {"k": [1, 2]},
            "segmentation": {"shots": [1]}}
# fields whose valid values depend on the dataset (3 segmentation classes, a tiny ViT's blocks)
# fields no offline value can be given for (the scorer loads real published weights)
UNTESTABLE = {"report_generation.chexbert": "needs the released CheXbert weights",
              "report_generation.radgraph": "needs the released RadGraph weights",
              "fewshot.linear.folds": "few-shot draws its own training sets: only null is valid",
              "fewshot.linear.train_subset": "few-shot draws its own training sets: only [] is valid",
              "metadata.linear.train_subset": "applies to the linear protocol only: only [] is valid"}
SPECIAL = {"segmentation.class_weights": [[1.0, 2.0, 1.0]], "segmentation.blocks": [[0, 1, 2, 3]],
           "zero_shot.class_prompts": [{"nodule": ["a lung nodule"]}]}


@pytest.fixture(scope="module")
def required(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """REQUIRED plus the options that need files: a tiny causal LM for report generation (and a second,
    other LM for the contract test's ``lm`` field)."""
    from medprobe.protocols.report_generation.lm import write_scratch_lm
    texts = ["no acute findings", "small opacity in the left lower zone", "describe the image"]
    root = tmp_path_factory.mktemp("lms")
    lm = write_scratch_lm(texts, root / "a", layers=1, hidden=16, heads=2, max_positions=2048)
    SPECIAL["report_generation.lm"] = [str(write_scratch_lm(texts, root / "b", layers=2, hidden=16, heads=2, max_positions=2048))]
    return {**REQUIRED, "report_generation": {"lm": str(lm)}}


@pytest.fixture(scope="module")
def datasets() -> dict[str, Any]:
    return {
        "reports": build_dataset("phantom", None, n=40, size=32, seed=0, reports=True),
        "2d": build_dataset("phantom", None, n=40, size=32, seed=0),
        "seg": build_dataset("phantom", None, n=24, size=32, seed=0, task="segmentation"),
        "3d": build_dataset("phantom", None, n=24, size=16, seed=0, ndim=3),
    }


def _dataset_for(proto, datasets) -> Any:
    for ds in datasets.values():
        if proto.supports(ds) is None:
            return ds
    raise AssertionError(f"no test dataset supports protocol {proto.name}")


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted field path, type hint)`` of every leaf field of an Options dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _leaves(hint, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, hint))
    return out


def _literal_choices(hint: Any) -> tuple | None:
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return None


def _candidates(value: Any, hint: Any) -> list[Any]:
    """Other values a field of type ``hint`` currently holding ``value`` may take."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        out = []
        for a in inner:
            out += _candidates(value if value is not None else _example(a), a)
            if value is None:
                out.insert(0, _example(a))
        return out + ([None] if value is not None and type(None) in args else [])
    choices = _literal_choices(hint)
    if choices:
        return [c for c in choices if c != value]
    if hint is bool:
        return [not value]
    if hint is int:
        return [value + 1, value * 2, max(value - 1, 0)]
    if hint is float:
        return [value * 2 if value else 0.5, value / 2, value + 0.1]
    if hint is str:
        return [value + "_other", "other"]
    if origin is list:
        (item,) = args
        value = list(value)
        choices = _literal_choices(item)
        if choices:
            out = [[c for c in choices if c not in value][:1] + value] if set(choices) - set(value) else []
            return out + ([value[:-1]] if len(value) > 1 else []) + [[c] for c in choices if [c] != value]
        if item is str:
            return [value[:-1]] if value else [["fc1"], ["qkv"]]
        if item is int:
            return [value + [max(value or [0]) + 1], [v + 1 for v in value] or [2], value[:-1]]
        if item is float:
            return [[v * 2 for v in value] or [0.5], [v / 2 for v in value], value[:-1]]
        if typing.get_origin(item) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
            out = [value + [max(ints or [0]) + 1], value[:-1]]
            for a in typing.get_args(item):
                out += [[c] for c in (_literal_choices(a) or ())]
            return out
    if origin is dict or hint is dict:
        return [{**(value or {}), "extra": 1}]
    raise AssertionError(f"the contract test does not know how to change a field of type {hint}")


def _example(hint: Any) -> Any:
    if hint is int:
        return 2
    if hint is float:
        return 0.5
    if hint is str:
        return "x"
    if typing.get_origin(hint) is list:
        return [_example(typing.get_args(hint)[0])]
    raise AssertionError(hint)


def _get(raw: dict, path: str) -> Any:
    for part in path.split("."):
        raw = raw[part]
    return raw


def _set(raw: dict, path: str, value: Any) -> dict:
    out = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    node = out
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return out


def _keys(proto, options, ds) -> set[str]:
    units = proto.units(options, [0, 1], ds)
    assert units, f"{proto.name} made no unit"
    return {unit_identity(proto, options, u, DATASET_ID, BACKBONE_ID, SETTINGS)[0] for u in units}


CASES = [(name, path) for name in list_protocols()
         for path, _ in _leaves(get_protocol(name).Options)]


@pytest.mark.parametrize("protocol,field", CASES, ids=[f"{p}:{f}" for p, f in CASES])
def test_every_option_field_enters_the_unit_key(protocol, field, datasets, required):
    if f"{protocol}.{field}" in UNTESTABLE:
        pytest.skip(UNTESTABLE[f"{protocol}.{field}"])
    proto = get_protocol(protocol)
    ds = _dataset_for(proto, datasets)
    base_opts = proto.parse_options(dict(required.get(protocol, {})), f"protocols.{protocol}")
    raw = canonical(base_opts)
    base = _keys(proto, base_opts, ds)
    hint = dict(_leaves(proto.Options))[field]
    changed_any = False
    current = _get(raw, field)
    for value in SPECIAL.get(f"{protocol}.{field}", []) + _candidates(current, hint):
        if canonical(value) == current:
            continue
        try:
            opts = proto.parse_options(_set(raw, field, value), f"protocols.{protocol}")
            if not proto.units(opts, [0, 1], ds):
                continue  # a valid value with nothing to run
            keys = _keys(proto, opts, ds)
        except MedprobeError:
            continue  # not a valid value for this field: try the next one
        changed_any = True
        top = field.split(".")[0]
        if top in proto.expands:
            # a list that expands into units: units of the values that changed get new keys
            assert keys != base, f"{protocol}.{field}={value!r} left every key unchanged"
        else:
            assert not keys & base, f"{protocol}.{field}={value!r} kept the key of an earlier unit"
    assert changed_any, f"no valid other value found for {protocol}.{field}; extend _candidates"


@pytest.mark.parametrize("protocol", list_protocols())
def test_keys_are_stable_and_distinct(protocol, datasets, required):
    proto = get_protocol(protocol)
    ds = _dataset_for(proto, datasets)
    opts = proto.parse_options(dict(required.get(protocol, {})), f"protocols.{protocol}")
    units = proto.units(opts, [0, 1], ds)
    keys = [unit_identity(proto, opts, u, DATASET_ID, BACKBONE_ID, SETTINGS)[0] for u in units]
    assert len(set(keys)) == len(keys), "two units of one configuration share a key"
    again = proto.parse_options(dict(required.get(protocol, {})), f"protocols.{protocol}")
    assert keys == [unit_identity(proto, again, u, DATASET_ID, BACKBONE_ID, SETTINGS)[0]
                    for u in proto.units(again, [0, 1], ds)]
    for changed in ({**DATASET_ID, "fingerprint": "g" * 16}, ):
        assert not set(keys) & {unit_identity(proto, opts, u, changed, BACKBONE_ID, SETTINGS)[0] for u in units}
    other_bb = {**BACKBONE_ID, "weights": "file:abc"}
    assert not set(keys) & {unit_identity(proto, opts, u, DATASET_ID, other_bb, SETTINGS)[0] for u in units}
    for name in SETTINGS:
        s = {**SETTINGS, name: "other"}
        assert not set(keys) & {unit_identity(proto, opts, u, DATASET_ID, BACKBONE_ID, s)[0] for u in units}


def test_version_enters_the_key(datasets, monkeypatch):
    proto = get_protocol("knn")
    opts = proto.parse_options({}, "protocols.knn")
    before = _keys(proto, opts, datasets["2d"])
    monkeypatch.setattr(type(proto), "version", proto.version + 1)
    assert not before & _keys(proto, opts, datasets["2d"])


# --------------------------------------------------------------------------- data and weights by content
def _manifest(tmp_path: Path, flip: bool = False) -> Path:
    from medprobe.data.phantom import write_phantom_files
    root = tmp_path / "data"
    if not root.exists():
        write_phantom_files(root, n=12, size=32, seed=0)
    csv = root / "manifest.csv"
    text = [",".join(c for i, c in enumerate(line.split(",")) if i != 1)  # drop the mask column
            for line in csv.read_text().splitlines()]
    header = text[0].split(",")
    col = header.index("label")
    rows = [r.split(",") for r in text[1:]]
    if flip:
        for r in rows:
            r[col] = str(1 - int(r[col]))
    out = root / ("flipped.csv" if flip else "labels.csv")
    out.write_text("\n".join([text[0]] + [",".join(r) for r in rows]) + "\n")
    return out


def _experiment(tmp_path: Path, csv: Path, weights: str = "random", name: str = "e") -> Path:
    cfg = {"name": name, "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "seeds": [0],
           "image_size": 28, "precision": "fp32",
           "datasets": {"d": {"adapter": "manifest", "root": str(csv)}},
           "backbones": {"b": {"name": "dinov2_vits14", "weights": weights, "tiny": True}},
           "protocols": {"knn": {"k": [3]}, "linear": {"epochs": 2}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_flipping_labels_changes_every_key(tmp_path):
    a = {u.key for u in plan_experiment(load_experiment(_experiment(tmp_path, _manifest(tmp_path)))).units}
    b = {u.key for u in plan_experiment(load_experiment(_experiment(tmp_path, _manifest(tmp_path, True)))).units}
    assert a and not a & b


def test_replacing_weights_at_the_same_path_changes_every_key(tmp_path):
    from medprobe.backbones import create_backbone
    csv = _manifest(tmp_path)
    path = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(create_backbone("dinov2_vits14", "random", tiny=True).model.state_dict(), path)
    a = {u.key for u in plan_experiment(load_experiment(_experiment(tmp_path, csv, str(path)))).units}
    again = {u.key for u in plan_experiment(load_experiment(_experiment(tmp_path, csv, str(path)))).units}
    assert a == again
    state = create_backbone("dinov2_vits14", "random", tiny=True).model.state_dict()
    next(iter(state.values())).add_(1.0)  # other bytes, same size, same path
    torch.save(state, path)
    b = {u.key for u in plan_experiment(load_experiment(_experiment(tmp_path, csv, str(path)))).units}
    assert a and not a & b


def test_digest_is_canonical():
    assert digest({"a": 1, "b": [1.5, 2]}) == digest({"b": [1.5, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
