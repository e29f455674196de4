"""Volume geometry: canonical orientation, radiological layout, resampling, SimpleITK / DICOM series, windows.

The acceptance check: the same scan stored with flipped/permuted axes and the matching affine
gives identical volumes, slice embeddings and segmentation metrics (a generated volume always;
the MNI152 T1 and grey-matter map when ../shared/data is present).
"""
from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as ornt
from scipy import ndimage

from medprobe.data.adapters import build_dataset
from medprobe.data.phantom import write_dicom
from medprobe.data.readers import dicom_series_geometry
from medprobe.data.volume import (WINDOW_PRESETS, canonicalize, read_itk_raw, read_volume, to_source,
                                  voxel_sizes, window_range)
from medprobe.errors import ConfigError, DataError
from medprobe.metrics import segmentation_metrics

MNI_T1 = "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
#: a permutation with flips: file axis 0 -> new axis 1 reversed, 1 -> 0, 2 -> 2 reversed
FLIP = np.array([[1, -1], [0, 1], [2, -1]])


def restore(data: np.ndarray, affine: np.ndarray, transform: np.ndarray = FLIP) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored with other axes: array reoriented, affine changed to match (world unchanged)."""
    out = ornt.apply_orientation(data, transform)
    return np.ascontiguousarray(out), affine @ ornt.inv_ornt_aff(transform, data.shape)


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path.name


def manifest(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "split", "label"])
        w.writerows(rows)
    return path


def smooth_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 400 + 50).astype(np.float32)


def two_ways(tmp: Path, image: np.ndarray, mask: np.ndarray, pred: np.ndarray, affine: np.ndarray,
             **options) -> tuple:
    """Datasets over the scan as stored and as stored with flipped axes; and the predictions read both ways."""
    out = []
    for way, transform in (("a", np.array([[0, 1], [1, 1], [2, 1]])), ("b", FLIP)):
        folder = tmp / way
        folder.mkdir()
        img, aff = restore(image, affine, transform)
        msk, _ = restore(mask.astype(np.uint8), affine, transform)
        prd, _ = restore(pred.astype(np.uint8), affine, transform)
        rows = [[save(folder / f"{k}.nii.gz", img, aff), save(folder / f"m{k}.nii.gz", msk, aff), split, str(k % 2)]
                for k, split in enumerate(["train", "train", "test", "test"])]
        save(folder / "pred.nii.gz", prd, aff)
        ds = build_dataset("manifest", manifest(folder / "m.csv", rows), task="classification", **options)
        seg = build_dataset("manifest", folder / "m.csv", task="segmentation", num_classes=2, **options)
        pred_canon = read_volume(folder / "pred.nii.gz", mask=True, spacing=options.get("spacing"))[0]
        out.append((ds, seg, pred_canon))
    return out[0], out[1]


def extract(ds, tmp: Path):
    from medprobe.backbones import create_backbone
    from medprobe.features import extract_features
    vit = create_backbone("dinov2_vits14", "random", tiny=True)
    return extract_features(vit, ds, tmp, image_size=28, last_blocks=1, precision="fp32", batch_size=16,
                            progress=False).store


def assert_same_scan(tmp: Path, image, mask, pred, affine, **options) -> None:
    (ds_a, seg_a, pred_a), (ds_b, seg_b, pred_b) = two_ways(tmp, image, mask, pred, affine, **options)
    assert ds_a.fingerprint() != ds_b.fingerprint()  # different files: the stores are not shared
    np.testing.assert_array_equal(ds_a.load_image(0), ds_b.load_image(0))
    np.testing.assert_array_equal(seg_a.load_mask(0), seg_b.load_mask(0))
    np.testing.assert_allclose(ds_a.affine(0), ds_b.affine(0), atol=1e-5)  # NIfTI stores float32 affines
    assert ds_a.geometry(0).source_orientation != ds_b.geometry(0).source_orientation
    # identical slice embeddings
    store_a, store_b = extract(ds_a, tmp / "cache"), extract(ds_b, tmp / "cache")
    assert store_a.path != store_b.path
    for split in ("train", "test"):
        block = store_a.block_index(1)[-1]
        np.testing.assert_array_equal(store_a.tokens(split, "cls", block), store_b.tokens(split, "cls", block))
    # identical segmentation metrics, spacing-aware
    rows = [segmentation_metrics(p, seg.load_mask(0), 2, ["bg", "fg"], spacing=voxel_sizes(seg.affine(0)),
                                 surface=("hd95", "assd", "nsd"))
            for p, seg in ((pred_a, seg_a), (pred_b, seg_b))]
    values = [[(r.metric, r.cls, r.value) for r in rs] for rs in rows]
    assert values[0] == values[1]
    assert any(m == "hd95" and v > 0 for m, _, v in values[0])


def test_same_generated_scan_stored_flipped_gives_identical_embeddings_and_metrics(tmp_path):
    image = smooth_volume((14, 12, 9))
    mask = image > np.quantile(image, 0.7)
    pred = ndimage.binary_dilation(np.roll(mask, 1, axis=0))
    affine = np.array([[0.9, 0, 0, -10], [0, 1.3, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1.0]])
    assert_same_scan(tmp_path, image, mask, pred, affine)


def test_same_generated_scan_resampled_both_ways_is_identical(tmp_path):
    image = smooth_volume((10, 11, 6), seed=1)
    mask = image > np.quantile(image, 0.6)
    pred = ndimage.binary_erosion(mask) | np.roll(mask, 2, axis=1)
    affine = np.diag([1.0, 1.2, 3.0, 1.0])
    assert_same_scan(tmp_path, image, mask, pred, affine, spacing=[2.0, 1.5, 1.5])


def test_mni152_t1_stored_flipped_gives_identical_embeddings_and_metrics(tmp_path, shared_data):
    t1 = nib.load(str(shared_data / MNI_T1))
    gm = nib.load(str(shared_data / MNI_GM))
    step = 4  # every 4th voxel keeps the test fast; the data stay the real template
    sub = np.diag([step, step, step, 1.0])
    image = np.asarray(t1.dataobj, dtype=np.float32)[::step, ::step, ::step]
    grey = np.asarray(gm.dataobj, dtype=np.float32)[::step, ::step, ::step]
    mask = grey > 0.5 * (255 if grey.max() > 1 else 1)
    pred = ndimage.binary_dilation(np.roll(mask, 1, axis=0))
    assert_same_scan(tmp_path, image, mask, pred, t1.affine @ sub)


def test_axial_slices_are_in_radiological_layout():
    vol = np.zeros((8, 9, 5), np.float32)  # RAS: x -> patient's right... no: +x is toward the patient's Right
    vol[7, 4, 2] = 1.0  # far toward +x: the patient's right side
    vol[4, 8, 2] = 2.0  # far toward +y: anterior
    out, geom = canonicalize(vol, np.eye(4))
    assert geom.orientation == "SPL" and geom.source_orientation == "RAS" and out.shape == (5, 9, 8)
    axial = out[2]
    r, c = np.argwhere(axial == 1.0)[0]
    assert c == 0  # the patient's right is on the viewer's left
    r, c = np.argwhere(axial == 2.0)[0]
    assert r == 0  # anterior at the top
    coronal, g1 = canonicalize(vol, np.eye(4), slice_axis=1)
    assert g1.orientation == "AIL" and coronal.shape == (9, 5, 8)
    with pytest.raises(ConfigError, match="slice_axis"):
        canonicalize(vol, np.eye(4), slice_axis=3)


def test_resampling_and_the_way_back_to_the_file(tmp_path):
    labels = np.zeros((12, 10, 6), np.int16)
    labels[3:9, 2:7, 1:5] = 1
    labels[5:7, 4:6, 2:4] = 2
    affine = np.array([[0, -1.0, 0, 30], [0.8, 0, 0, -4], [0, 0, 3.0, 9], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(labels, affine), str(tmp_path / "l.nii.gz"))
    arr, geom = read_volume(tmp_path / "l.nii.gz", mask=True)
    assert not geom.resampled and arr.dtype == np.int64
    np.testing.assert_array_equal(to_source(arr, geom), labels)
    fine, g2 = read_volume(tmp_path / "l.nii.gz", mask=True, spacing=[1.5, 0.5, 0.5])
    np.testing.assert_allclose(g2.spacing, [1.5, 0.5, 0.5])
    assert g2.resampled and set(np.unique(fine)) <= {0, 1, 2}
    # world position of the first voxel is kept; the labels come back exactly (nearest both ways, finer grid)
    np.testing.assert_allclose(g2.affine[:3, 3], geom.affine[:3, 3])
    np.testing.assert_array_equal(to_source(fine, g2), labels)
    img, g3 = read_volume(tmp_path / "l.nii.gz", spacing=[6.0, 1.6, 2.0])
    # canonical grid (6, 12, 10) at (3, 0.8, 1) mm -> floor((n - 1) * old / new) + 1 voxels per axis
    assert img.dtype == np.float32 and img.shape == (3, 6, 5) and 0 < img.max() <= 2


def test_mha_through_simpleitk_matches_its_own_index_to_world(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    data = smooth_volume((7, 6, 5), seed=3).astype(np.int16)  # (z, y, x) as SimpleITK stores it
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))  # rotated 90 degrees in plane
    sitk.WriteImage(image, str(tmp_path / "v.mha"))
    raw, affine = read_itk_raw(tmp_path / "v.mha")
    for index in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        ras = (affine @ [*index, 1])[:3]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
        assert raw[index] == data[index[2], index[1], index[0]]
    vol, geom = read_volume(tmp_path / "v.mha")
    nib.save(nib.Nifti1Image(raw, affine), str(tmp_path / "v.nii.gz"))
    vol_nii, geom_nii = read_volume(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(vol, vol_nii)  # same scan through SimpleITK and nibabel: same canonical volume
    np.testing.assert_allclose(geom.affine, geom_nii.affine, atol=1e-6)


def test_dicom_series_geometry_matches_simpleitk_and_applies_rescale(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(0)
    iop = [0, 1, 0, 0, 0, -1]  # a sagittal acquisition: rows along +y (L->P), columns along -z
    series = "1.2.826.0.1.3680043.8.498.1"
    for k in [2, 0, 3, 1]:  # written out of order
        write_dicom(tmp_path / "s" / f"{k}.dcm", rng.integers(0, 3000, (6, 5)).astype(np.int16), Modality="CT",
                    RescaleSlope=1, RescaleIntercept=-1024, ImageOrientationPatient=iop,
                    ImagePositionPatient=[-30.0 + 2.5 * k, 10.0, 40.0], PixelSpacing=[0.8, 0.6],
                    SliceThickness=2.5, SeriesInstanceUID=series, InstanceNumber=k + 1)
    vol, affine = dicom_series_geometry(tmp_path / "s")
    assert vol.shape == (4, 6, 5) and vol.min() >= -1024 and vol.min() < 0  # Hounsfield units
    ours, g_ours = canonicalize(vol, affine)
    itk, g_itk = canonicalize(*read_itk_raw(tmp_path / "s"))
    np.testing.assert_array_equal(ours, itk.astype(np.float32))
    np.testing.assert_allclose(g_ours.affine, g_itk.affine, atol=1e-4)
    np.testing.assert_allclose(sorted(g_ours.spacing), [0.6, 0.8, 2.5], atol=1e-6)
    write_dicom(tmp_path / "bare" / "0.dcm", np.zeros((4, 4), np.int16))
    with pytest.raises(DataError, match="ImageOrientationPatient"):
        dicom_series_geometry(tmp_path / "bare")


def test_window_presets_and_dataset_identity(tmp_path):
    assert window_range("lung") == (-1350.0, 150.0)
    assert window_range([40, 400]) == (-160.0, 240.0) == window_range(WINDOW_PRESETS["abdomen"])
    assert window_range(None) is None
    with pytest.raises(ConfigError, match="unknown window 'liver'.*lung"):
        window_range("liver")
    with pytest.raises(ConfigError, match="width must be > 0"):
        window_range([40, 0])
    image = smooth_volume((6, 6, 4))
    folder = tmp_path / "d"
    folder.mkdir()
    rows = [[save(folder / f"{k}.nii.gz", image, np.eye(4)), "", s, str(k)] for k, s in enumerate(["train", "test"])]
    path = manifest(folder / "m.csv", rows)
    plain = build_dataset("manifest", path, task="classification")
    ct = build_dataset("manifest", path, task="classification", window="mediastinum")
    iso = build_dataset("manifest", path, task="classification", spacing=[2, 2, 2])
    assert plain.value_range is None and ct.value_range == (-125.0, 225.0)
    assert len({plain.fingerprint(), ct.fingerprint(), iso.fingerprint()}) == 3  # enters the feature-store key
    with pytest.raises(ConfigError, match="option window"):
        build_dataset("manifest", path, task="classification", window="soft")
