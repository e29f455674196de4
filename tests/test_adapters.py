"""Adapter registry and the phantom, medmnist and manifest adapters."""
import csv
import os
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import medprobe.data.adapters as adapters
from medprobe.data import build_dataset, check_no_leakage, get_adapter, list_adapters, register_adapter
from medprobe.data.adapters.medmnist import MEDMNIST_SETS
from medprobe.data.base import ArrayDataset, Record, TaskSpec
from medprobe.data.phantom import write_phantom_files
from medprobe.errors import ConfigError, DataError


# --------------------------------------------------------------------------- registry
def test_registry_lists_adapters_with_docs():
    infos = {i.name: i for i in list_adapters()}
    assert {"phantom", "medmnist", "manifest"} <= set(infos)
    assert [i.name for i in list_adapters()] == sorted(infos)
    for info in infos.values():
        assert info.summary and len(info.details) > 200 and callable(info.builder)
    assert "licence" in infos["medmnist"].details.lower() and "zenodo" in infos["medmnist"].details
    assert get_adapter("phantom").options() == {"n": 240, "size": 64, "seed": 0, "task": "binary", "ndim": 2,
                                                "reports": False, "class_names": None, "finding": "nodule"}


def test_unknown_adapter_and_option():
    with pytest.raises(ConfigError, match="Did you mean 'phantom'"):
        build_dataset("phantm")
    with pytest.raises(ConfigError, match=r"no option 'sise'.*Did you mean 'size'.*Allowed options: n, size, seed"):
        build_dataset("phantom", sise=32)
    with pytest.raises(ConfigError, match="option ndim must be one of 2, 3"):
        build_dataset("phantom", ndim=4)
    with pytest.raises(ConfigError, match="option task"):
        build_dataset("phantom", task="detection")
    with pytest.raises(ConfigError, match="option n must be an integer"):
        build_dataset("phantom", n="many")


def test_register_adapter_extends_the_registry():
    @register_adapter("toy_test_adapter", "a toy", "details of the toy")
    def build_toy(root, k: int = 2):
        recs = [Record(f"r{i}", "train", f"p{i}", 0) for i in range(k)]
        return ArrayDataset(np.zeros((k, 4, 4)), recs, TaskSpec("binary", ("a", "b")), name=str(root))
    try:
        ds = build_dataset("toy_test_adapter", "somewhere", k=3)
        assert len(ds) == 3 and ds.name == "somewhere"
        assert get_adapter("toy_test_adapter").details == "details of the toy"
        with pytest.raises(ConfigError, match="Allowed options: k"):
            build_dataset("toy_test_adapter", n=1)
    finally:
        adapters._REGISTRY.pop("toy_test_adapter")


# --------------------------------------------------------------------------- phantom
def test_phantom_default_binary():
    ds = build_dataset("phantom")
    assert len(ds) == 240 and ds.ndim == 2 and ds.task.kind == "binary"
    counts = Counter(r.split for r in ds.records)
    assert abs(counts["train"] / 240 - 0.6) < 0.06 and abs(counts["test"] / 240 - 0.2) < 0.05
    check_no_leakage(ds)
    per_patient = Counter(r.patient_id for r in ds.records)
    assert max(per_patient.values()) == 2 and len(per_patient) < 240
    assert set(ds.records[0].metadata) == {"sex", "age", "age_bin", "view"}
    for s in ("train", "val", "test"):
        assert set(ds.labels(ds.indices(s)).tolist()) == {0, 1}
    img = ds.load_image(0)
    assert img.shape == (64, 64) and img.dtype == np.float32 and ds.value_range == (0.0, 1.0)
    assert ds.fingerprint() == build_dataset("phantom").fingerprint()
    assert ds.fingerprint() != build_dataset("phantom", seed=1).fingerprint()


def test_phantom_segmentation_and_3d():
    seg = build_dataset("phantom", n=12, size=32, task="segmentation")
    assert seg.task.kind == "segmentation" and seg.task.class_names == ("background", "lungs", "heart")
    assert seg.load_mask(3).shape == (32, 32) and seg.load_mask(3).dtype == np.int64
    vol = build_dataset("phantom", None, n=6, size=16, ndim=3)
    assert vol.ndim == 3 and vol.load_image(0).shape == (8, 16, 16) and vol.task.kind == "binary"
    vseg = build_dataset("phantom", n=6, size=16, ndim=3, task="segmentation")
    assert vseg.load_mask(0).shape == (8, 16, 16) and vseg.task.num_classes == 3


# --------------------------------------------------------------------------- medmnist
def _write_medmnist(path: Path, shape=(28, 28), n=(6, 2, 3), classes=2, multilabel=0, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(k, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.integers(0, 2, size=(k, multilabel)) if multilabel
                                     else (np.arange(k) % classes)[:, None]).astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_medmnist_table_covers_all_sets():
    two_d = ["path", "chest", "derma", "oct", "pneumonia", "retina", "breast", "blood", "tissue", "organa", "organc",
             "organs"]
    three_d = ["organ", "nodule", "adrenal", "fracture", "vessel", "synapse"]
    assert set(MEDMNIST_SETS) == {f"{x}mnist" for x in two_d} | {f"{x}mnist3d" for x in three_d}
    assert MEDMNIST_SETS["chestmnist"].kind == "multilabel" and len(MEDMNIST_SETS["chestmnist"].classes) == 14
    assert "kappa" in MEDMNIST_SETS["retinamnist"].note and len(MEDMNIST_SETS["retinamnist"].classes) == 5
    assert MEDMNIST_SETS["organmnist3d"].ndim == 3 and len(MEDMNIST_SETS["organamnist"].classes) == 11


def test_medmnist_binary_file(tmp_path):
    arrays = _write_medmnist(tmp_path / "pneumoniamnist.npz")
    ds = build_dataset("medmnist", tmp_path / "pneumoniamnist.npz")
    assert len(ds) == 11 and ds.task.kind == "binary" and ds.task.class_names == ("normal", "pneumonia")
    assert [len(ds.indices(s)) for s in ("train", "val", "test")] == [6, 2, 3]
    first_val = int(ds.indices("val")[0])
    img = ds.load_image(first_val)
    assert img.dtype == np.float32 and img.shape == (28, 28)
    np.testing.assert_array_equal(img, arrays["val_images"][0])
    assert ds.records[first_val].patient_id == ds.records[first_val].key
    assert ds.value_range == (0.0, 255.0)
    fp = ds.fingerprint()
    assert fp == build_dataset("medmnist", tmp_path / "pneumoniamnist.npz").fingerprint()
    os.utime(tmp_path / "pneumoniamnist.npz", ns=(1, 1))
    assert build_dataset("medmnist", tmp_path / "pneumoniamnist.npz").fingerprint() != fp


def test_medmnist_multilabel_rgb_3d_and_flag(tmp_path):
    _write_medmnist(tmp_path / "chestmnist_64.npz", shape=(64, 64), multilabel=14)
    chest = build_dataset("medmnist", tmp_path / "chestmnist_64.npz")
    assert chest.task.kind == "multilabel" and chest.labels().shape == (11, 14)
    _write_medmnist(tmp_path / "renamed.npz", shape=(28, 28, 3), classes=7)
    with pytest.raises(ConfigError, match="flag"):
        build_dataset("medmnist", tmp_path / "renamed.npz")
    derma = build_dataset("medmnist", tmp_path / "renamed.npz", flag="dermamnist")
    assert derma.load_image(0).shape == (28, 28, 3) and derma.task.num_classes == 7
    _write_medmnist(tmp_path / "organmnist3d.npz", shape=(28, 28, 28), classes=11)
    organ = build_dataset("medmnist", tmp_path / "organmnist3d.npz")
    assert organ.ndim == 3 and organ.load_image(0).shape == (28, 28, 28) and organ.task.kind == "multiclass"


def test_medmnist_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_dataset("medmnist", tmp_path / "pneumoniamnist.npz")
    with pytest.raises(ConfigError, match="needs a root"):
        build_dataset("medmnist")
    arrays = _write_medmnist(tmp_path / "x.npz")
    del arrays["val_labels"]
    np.savez(tmp_path / "breastmnist.npz", **arrays)
    with pytest.raises(DataError, match=r"breastmnist\.npz: missing key 'val_labels'"):
        build_dataset("medmnist", tmp_path / "breastmnist.npz")
    arrays = _write_medmnist(tmp_path / "x.npz")
    arrays["train_images"] = arrays["train_images"][:, :, :, None, None]
    np.savez(tmp_path / "octmnist.npz", **arrays)
    with pytest.raises(DataError, match=r"octmnist\.npz: key 'train_images' has shape"):
        build_dataset("medmnist", tmp_path / "octmnist.npz")
    _write_medmnist(tmp_path / "bloodmnist.npz", shape=(28, 28, 3), n=(10, 2, 3), classes=9)  # blood has 8
    with pytest.raises(DataError, match=r"bloodmnist\.npz.*0\.\.7"):
        build_dataset("medmnist", tmp_path / "bloodmnist.npz")
    (tmp_path / "pathmnist.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"pathmnist\.npz: cannot read"):
        build_dataset("medmnist", tmp_path / "pathmnist.npz")


def test_real_pneumoniamnist(shared_data):
    ds = build_dataset("medmnist", shared_data / "medmnist" / "pneumoniamnist.npz")
    assert [len(ds.indices(s)) for s in ("train", "val", "test")] == [4708, 524, 624]
    assert np.bincount(ds.labels(ds.indices("train"))).tolist() == [1214, 3494]
    assert np.bincount(ds.labels(ds.indices("test"))).tolist() == [234, 390]
    assert ds.load_image(0).shape == (28, 28)


# --------------------------------------------------------------------------- manifest
def _write_csv(path: Path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _pngs(folder: Path, n: int, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size, size), i * 10, np.uint8)).save(folder / f"{i}.png")


def test_manifest_from_phantom_files(tmp_path):
    csv_path = write_phantom_files(tmp_path, n=12, size=32, fmt="png")
    seg = build_dataset("manifest", csv_path)
    assert seg.task.kind == "segmentation" and seg.task.num_classes == 3  # found by reading the masks
    assert seg.load_mask(0).shape == seg.load_image(0).shape == (32, 32)
    cls = build_dataset("manifest", csv_path, task="classification", class_names=["normal", "nodule"])
    assert cls.task == TaskSpec("binary", ("normal", "nodule")) and cls.ndim == 2
    rows = list(csv.DictReader(open(csv_path)))
    assert cls.labels().tolist() == [int(r["label"]) for r in rows]
    assert cls.records[0].metadata == {"sex": rows[0]["sex"], "age": int(rows[0]["age"]), "view": rows[0]["view"]}
    assert cls.records[0].patient_id == rows[0]["patient_id"] and cls.records[0].key == rows[0]["image"]
    check_no_leakage(cls)
    assert cls.fingerprint() == build_dataset("manifest", csv_path, task="classification",
                                              class_names=["normal", "nodule"]).fingerprint()


def test_manifest_string_labels_multiclass_and_defaults(tmp_path):
    _pngs(tmp_path / "img", 4)
    cells = [("train", "effusion", "A"), ("train", "normal", "B"), ("val", "mass", "7"), ("test", "normal", "")]
    rows = [[f"img/{i}.png", *c] for i, c in enumerate(cells)]
    ds = build_dataset("manifest", _write_csv(tmp_path / "m.csv", ["image", "split", "label", "site"], rows))
    assert ds.task == TaskSpec("multiclass", ("effusion", "mass", "normal"))
    assert ds.labels().tolist() == [0, 2, 1, 2]
    assert ds.records[0].patient_id == "img/0.png"  # defaults to the image path
    assert [r.metadata["site"] for r in ds.records] == ["A", "B", "7", None]  # mixed column stays text
    assert ds.load_image(3).max() == 30
    two = build_dataset("manifest", _write_csv(tmp_path / "b.csv", ["image", "split", "label"],
                                               [[r[0], r[1], "pos" if i % 2 else "neg"] for i, r in enumerate(rows)]))
    assert two.task == TaskSpec("binary", ("neg", "pos"))


def test_manifest_multilabel(tmp_path):
    _pngs(tmp_path, 3)
    rows = [["0.png", "train", 1, 0, 42.5], ["1.png", "val", 0, 0, 50], ["2.png", "test", 1, 1, 61]]
    path = _write_csv(tmp_path / "ml.csv", ["image", "split", "effusion", "mass", "age"], rows)
    ds = build_dataset("manifest", path, labels=["effusion", "mass"])
    assert ds.task == TaskSpec("multilabel", ("effusion", "mass"))
    assert ds.labels().tolist() == [[1, 0], [0, 0], [1, 1]]
    assert [r.metadata["age"] for r in ds.records] == [42.5, 50.0, 61.0]
    bad = _write_csv(tmp_path / "bad.csv", ["image", "split", "effusion", "mass"],
                     [["0.png", "train", 1, 0], ["1.png", "val", 2, 0]])
    with pytest.raises(DataError, match=r"bad\.csv: row 3: value '2' in label column 'effusion'.*0 or 1"):
        build_dataset("manifest", bad, labels=["effusion", "mass"])


def test_manifest_errors_name_file_and_row(tmp_path):
    _pngs(tmp_path, 3)
    def check(rows, match, header=("image", "split", "label"), **options):
        path = _write_csv(tmp_path / "e.csv", header, rows)
        with pytest.raises(DataError, match=match):
            build_dataset("manifest", path, **options)

    check([["0.png", "train"]], r"e\.csv: missing required column 'split'; columns present: image, label",
          header=("image", "label"))
    check([["0.png", "train", "1"], ["1.png", "test", ""]], r"e\.csv: row 3: empty value in label column 'label'")
    check([["0.png", "train", "1"], ["1.png", "training", "0"]], r"e\.csv: row 3: unknown split 'training'")
    check([["0.png", "train", "1"], ["0.png", "test", "0"]], r"row 3: image '0.png' is already listed in row 2")
    check([["0.png", "train", "1"], ["1.png", "test", "2"], ["2.png", "val", "3"]], r"must be 0\.\.C-1")
    check([["0.png", "train", "0.5"]], r"row 2: label '0.5'.*not an integer")
    check([["0.png", "train"]], r"missing label column 'label'; columns present: image, split",
          header=("image", "split"))
    rows = [["0.png", "train", "1"]] + [[f"missing{i}.png", "test", "0"] for i in range(12)]
    path = _write_csv(tmp_path / "miss.csv", ["image", "split", "label"], rows)
    with pytest.raises(DataError) as err:
        build_dataset("manifest", path)
    msg = str(err.value)
    assert "miss.csv: 12 listed file(s) not found" in msg and "row 3 image missing0.png" in msg
    assert "missing9.png" in msg and "missing10.png" not in msg and "and 2 more" in msg


def test_manifest_none_task_and_missing_csv(tmp_path):
    _pngs(tmp_path, 2)
    path = _write_csv(tmp_path / "u.csv", ["image", "split"], [["0.png", "train"], ["1.png", "train"]])
    ds = build_dataset("manifest", path, task="none")
    assert ds.task.kind == "none" and len(ds) == 2
    with pytest.raises(DataError, match=r"nothere\.csv: manifest CSV not found"):
        build_dataset("manifest", tmp_path / "nothere.csv")


def test_manifest_segmentation_mask_checks(tmp_path):
    _pngs(tmp_path / "img", 3, size=8)
    (tmp_path / "msk").mkdir()
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "msk" / "0.png")
    Image.fromarray(np.ones((6, 8), np.uint8)).save(tmp_path / "msk" / "1.png")
    Image.fromarray(np.full((8, 8), 5, np.uint8)).save(tmp_path / "msk" / "2.png")
    rows = [[f"img/{i}.png", f"msk/{i}.png", "train"] for i in range(3)]
    path = _write_csv(tmp_path / "s.csv", ["image", "mask", "split"], rows)
    ds = build_dataset("manifest", path, num_classes=3)
    assert ds.task.kind == "segmentation" and ds.task.class_names == ("background", "class_1", "class_2")
    assert ds.load_mask(0).sum() == 64
    with pytest.raises(DataError, match=r"msk/1\.png: mask shape \(6, 8\) differs from the shape \(8, 8\).*img/1\.png"):
        ds.load_mask(1)
    with pytest.raises(DataError, match=r"msk/2\.png: mask has values 5 outside 0\.\.2 \(num_classes=3\)"):
        ds.load_mask(2)
    assert build_dataset("manifest", path).task.num_classes == 6  # inferred from the largest mask value


def test_manifest_nifti_volumes(tmp_path):
    affine = np.diag([0.7, 0.8, 3.0, 1.0])
    affine[:3, 3] = [1, 2, 3]
    vol = np.random.default_rng(0).normal(size=(10, 12, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image((vol > 0).astype(np.uint8), affine), tmp_path / "m.nii.gz")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "flat.png")
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "v2.nii.gz")
    path = _write_csv(tmp_path / "v.csv", ["image", "mask", "split", "label"],
                      [["v.nii.gz", "m.nii.gz", "train", "1"], ["v2.nii.gz", "flat.png", "test", "0"]])
    # canonical orientation (default): axial slices in radiological layout SPL (D superior, H posterior, W left)
    ds = build_dataset("manifest", path, num_classes=2)
    assert ds.ndim == 3 and ds.load_image(0).shape == (5, 12, 10)
    np.testing.assert_array_equal(ds.load_image(0), np.transpose(vol, (2, 1, 0))[:, ::-1, ::-1])
    aff = ds.affine(0)
    np.testing.assert_allclose(aff @ [4, 9, 2, 1], affine @ [10 - 1 - 2, 12 - 1 - 9, 4, 1])
    assert ds.geometry(0).orientation == "SPL" and ds.geometry(0).source_orientation == "RAS"
    assert ds.load_mask(0).shape == (5, 12, 10)
    with pytest.raises(DataError, match=r"flat\.png: 2D mask \(10, 12\) for the 3D image"):
        ds.load_mask(1)
    cls = build_dataset("manifest", path, task="classification")
    assert cls.task.kind == "binary" and cls.ndim == 3
    sagittal = build_dataset("manifest", path, task="classification", slice_axis=0)
    assert sagittal.load_image(0).shape == (10, 5, 12)  # RIP: D right, H inferior, W posterior
    # orientation=file keeps the file's axes with slice_axis as depth
    raw = build_dataset("manifest", path, num_classes=2, orientation="file")
    assert raw.load_image(0).shape == (5, 10, 12)
    np.testing.assert_allclose(raw.affine(0) @ [4, 9, 11, 1], affine @ [9, 11, 4, 1])
    assert build_dataset("manifest", path, task="classification", slice_axis=0,
                         orientation="file").load_image(0).shape == (10, 12, 5)


def test_manifest_dimension_mismatch(tmp_path):
    _pngs(tmp_path, 1)
    np.save(tmp_path / "vol.npy", np.zeros((4, 8, 8), np.float32))
    path = _write_csv(tmp_path / "d.csv", ["image", "split", "label"], [["0.png", "train", 0], ["vol.npy", "test", 1]])
    ds = build_dataset("manifest", path)
    assert ds.ndim == 2
    with pytest.raises(DataError, match=r"d\.csv row 3: .*vol\.npy is a volume"):
        ds.load_image(1)


def test_one_option_helper_for_every_option_kind():
    """medprobe.options.option is the single option lookup (adapters, metrics, runtime); errors name the option."""
    from medprobe.options import option
    assert option("n", "3", int) == 3 and option("n", 3.0, int, minimum=1) == 3
    assert option("flag", "yes", bool) is True and option("flag", 0, bool) is False
    assert option("labels", "a, b", list[str] | None) == ["a", "b"] and option("labels", None, list[str] | None) is None
    assert option("task", "auto", str, choices=("auto", "none")) == "auto"
    for args, kw, match in [(("n", 2.5, int), {}, "option n must be an integer, got 2.5"),
                            (("n", 0, int), {"minimum": 1}, "option n must be >= 1, got 0"),
                            (("ndim", 4, int), {"choices": (2, 3)}, "option ndim must be one of 2, 3, got 4"),
                            (("task", "segm", str), {"choices": ("segmentation", "none")},
                             "option task: unknown value 'segm'. Did you mean 'segmentation'"),
                            (("flag", "maybe", bool), {}, "option flag must be true or false"),
                            (("labels", [], list[str]), {}, "option labels must be a list of names")]:
        with pytest.raises(ConfigError, match=match):
            option(*args, **kw)
    import medprobe.data.adapters as registry
    import medprobe.data.adapters._common as common
    import medprobe.errors as errors
    assert not any(hasattr(m, n) for m, n in [(registry, "int_option"), (registry, "choice_option"),
                                              (common, "bool_option"), (common, "options_list"),
                                              (errors, "check_choice")])
