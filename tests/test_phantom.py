"""Synthetic phantoms: shapes, determinism, anatomy, learnable labels, speed, files on disk."""
import csv
import time

import numpy as np
import pytest
from scipy import ndimage

from medprobe.data.phantom import make_chest_phantoms, make_volume_phantoms, volume_metadata, write_phantom_files
from medprobe.data.readers import read_image, read_mask, read_nifti
from medprobe.errors import ConfigError


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(score)) + 1.0
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


@pytest.mark.parametrize("size", [16, 37, 64])
def test_chest_shapes_ranges_and_anatomy(size):
    images, labels, masks, meta = make_chest_phantoms(10, size=size, seed=3)
    assert images.shape == (10, size, size) and images.dtype == np.float32
    assert labels.shape == (10,) and labels.sum() == 5
    assert masks.shape == images.shape and masks.dtype == np.int64
    assert 0.0 <= images.min() and images.max() <= 1.0
    for img, m in zip(images, masks):
        assert set(np.unique(m)) == {0, 1, 2}
        assert img[m == 1].mean() < img[m == 2].mean()  # lungs darker than the heart
        # two lung fields: lung pixels on both sides of the midline
        cols = np.nonzero((m == 1).any(axis=0))[0]
        assert cols.min() < size // 2 < cols.max()
    assert len(meta) == 10
    for m in meta:
        assert m["sex"] in ("M", "F") and 1 <= m["age"] <= 95 and isinstance(m["age"], int)
        assert m["view"] in ("PA", "AP")


def test_chest_is_deterministic_and_seeded():
    a = make_chest_phantoms(6, size=32, seed=1)
    b = make_chest_phantoms(6, size=32, seed=1)
    c = make_chest_phantoms(6, size=32, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], b[2])
    assert a[3] == b[3]
    assert not np.array_equal(a[0], c[0])


def test_positive_fraction_is_exact():
    assert make_chest_phantoms(20, size=16, positive_fraction=0.25)[1].sum() == 5
    assert make_chest_phantoms(7, size=16, positive_fraction=0.0)[1].sum() == 0


def test_nodule_is_learnable_but_not_trivial():
    images, labels, masks, _ = make_chest_phantoms(300, size=64, seed=1)
    lung = [ndimage.binary_erosion(m == 1, iterations=2) for m in masks]
    blob = np.array([(-ndimage.gaussian_laplace(x, 1.5))[k].max() for x, k in zip(images, lung)])
    brightness = np.array([x.mean() for x in images])
    assert _auc(blob, labels) > 0.8  # a blob detector finds the nodule
    assert _auc(brightness, labels) < 0.7  # but global intensity does not give it away


def test_repeat_images_share_patient_and_anatomy():
    images, labels, masks, meta = make_chest_phantoms(40, size=32, seed=0, repeat_fraction=0.5)
    ids = [m["patient_id"] for m in meta]
    pairs = [i for i in range(1, 40) if ids[i] == ids[i - 1]]
    assert pairs and len(set(ids)) < 40
    assert max(ids.count(p) for p in ids) <= 2
    for i in pairs:
        assert meta[i]["sex"] == meta[i - 1]["sex"]
        # same anatomy up to the view-dependent heart size
        assert (masks[i] == 1).sum() == pytest.approx((masks[i - 1] == 1).sum(), rel=0.25)
        assert not np.array_equal(images[i], images[i - 1])


def test_chest_speed_1000_images():
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        make_chest_phantoms(1000, size=64)
        best = min(best, time.perf_counter() - t)
    assert best < 2.0


def test_volumes():
    vols, labels, masks = make_volume_phantoms(8, size=24, depth=10, seed=5)
    assert vols.shape == (8, 10, 24, 24) and vols.dtype == np.float32
    assert masks.shape == vols.shape and masks.dtype == np.int64 and set(np.unique(masks)) == {0, 1, 2}
    assert labels.sum() == 4 and 0 <= vols.min() and vols.max() <= 1
    np.testing.assert_array_equal(vols, make_volume_phantoms(8, size=24, depth=10, seed=5)[0])
    assert all(v[m == 1].mean() > v[m == 0].mean() for v, m in zip(vols, masks))  # organ A brighter than background
    meta = volume_metadata(8, seed=5)
    assert len(meta) == 8 and {"patient_id", "sex", "age", "view"} <= set(meta[0])


def test_volume_lesion_is_learnable():
    vols, labels, masks = make_volume_phantoms(60, seed=5)
    # depth of the darkest smoothed spot inside organ A, relative to the organ's median
    dip = np.array([np.median(v[m == 1]) - ndimage.uniform_filter(v, 3)[ndimage.binary_erosion(m == 1)].min()
                    for v, m in zip(vols, masks)])
    assert _auc(dip, labels) > 0.75
    assert _auc(vols.mean(axis=(1, 2, 3)), labels) < 0.7


def test_invalid_arguments():
    with pytest.raises(ConfigError, match="size"):
        make_chest_phantoms(2, size=8)
    with pytest.raises(ConfigError, match="positive integer"):
        make_chest_phantoms(0)
    with pytest.raises(ConfigError, match="depth"):
        make_volume_phantoms(2, depth=2)
    with pytest.raises(ConfigError, match="format"):
        write_phantom_files("unused", fmt="jpg")


@pytest.mark.parametrize("fmt", ["png", "dcm", "nii"])
def test_write_phantom_files(tmp_path, fmt):
    csv_path = write_phantom_files(tmp_path / "ph", n=12, size=32, seed=0, fmt=fmt)
    assert csv_path == tmp_path / "ph" / "manifest.csv"
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 12
    assert list(rows[0]) == ["image", "mask", "label", "patient_id", "split", "sex", "age", "view"]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    split_of = {}
    for r in rows:
        assert not r["image"].startswith("/")  # relative to the CSV
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"]  # patient-level
        image = read_image(csv_path.parent / r["image"])
        mask = read_mask(csv_path.parent / r["mask"])
        assert mask.shape == image.shape and set(np.unique(mask)) <= {0, 1, 2}
    assert len(split_of) < 12  # some patients have two images
    if fmt == "nii":
        vol, aff = read_nifti(csv_path.parent / rows[0]["image"])
        assert vol.shape == (16, 32, 32) and aff[2, 0] == pytest.approx(2.5)
    else:
        ref = make_chest_phantoms(12, size=32, seed=0, repeat_fraction=0.25)[0][0]
        scale = 255 if fmt == "png" else 4000
        np.testing.assert_allclose(read_image(csv_path.parent / rows[0]["image"]) / scale, ref, atol=1 / scale)


def test_write_without_masks(tmp_path):
    csv_path = write_phantom_files(tmp_path, n=5, size=16, with_masks=False)
    header = next(csv.reader(open(csv_path)))
    assert "mask" not in header and not (tmp_path / "masks").exists()
