"""Readers: PNG/TIFF/JPEG, DICOM (modality LUT, MONOCHROME1, multi-frame, series, windowing), NIfTI, NumPy, masks."""
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medprobe.data.phantom import write_dicom
from medprobe.data.readers import (nifti_affine, read_dicom, read_dicom_series, read_image, read_mask,
                                   read_nifti)
from medprobe.errors import DataError

RNG = np.random.default_rng(0)


def _gray(dtype=np.uint8, shape=(20, 24), hi=255):
    return RNG.integers(0, hi + 1, size=shape).astype(dtype)


# --------------------------------------------------------------------------- Pillow formats
@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp"])
def test_8bit_grayscale_keeps_values(tmp_path, ext):
    a = _gray()
    Image.fromarray(a).save(tmp_path / f"a{ext}")
    out = read_image(tmp_path / f"a{ext}")
    assert out.dtype == np.float32 and out.shape == a.shape
    np.testing.assert_array_equal(out, a.astype(np.float32))


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16bit_grayscale_keeps_native_units(tmp_path, ext):
    a = _gray(np.uint16, hi=60000)
    a[0, 0] = 60000
    Image.fromarray(a).save(tmp_path / f"a{ext}")
    out = read_image(tmp_path / f"a{ext}")
    np.testing.assert_array_equal(out, a.astype(np.float32))
    assert out.max() == 60000


def test_float_tiff_and_jpeg(tmp_path):
    f = RNG.normal(size=(16, 16)).astype(np.float32) * 1000
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    np.testing.assert_allclose(read_image(tmp_path / "f.tif"), f)
    a = np.full((16, 16), 128, np.uint8)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (16, 16) and abs(float(out.mean()) - 128) < 2


def test_colour_modes(tmp_path):
    rgb = _gray(shape=(10, 12, 3))
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb.astype(np.float32))
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (10, 12, 3)
    np.testing.assert_array_equal(out, rgb.astype(np.float32))
    gray = _gray(shape=(10, 12))
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), gray.astype(np.float32))
    # palette image with a gray palette reads as grayscale, a coloured palette as RGB
    Image.fromarray(gray).convert("P").save(tmp_path / "pal_gray.png")
    assert read_image(tmp_path / "pal_gray.png").shape == (10, 12)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (10, 12, 3)


def test_multipage_tiff_is_a_stack(tmp_path):
    frames = [Image.fromarray(_gray()) for _ in range(3)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    out = read_image(tmp_path / "stack.tif")
    assert out.shape == (3, 20, 24)
    np.testing.assert_array_equal(out[2], np.asarray(frames[2], np.float32))


# --------------------------------------------------------------------------- DICOM
def test_dicom_ct_rescale_to_hounsfield(tmp_path):
    raw = np.array([[0, 512], [1024, 2000]], dtype=np.int16)
    p = write_dicom(tmp_path / "ct.dcm", raw, Modality="CT", RescaleSlope=2, RescaleIntercept=-1024)
    out = read_image(p)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, raw * 2.0 - 1024)


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = np.array([[0, 100], [4000, 4095]], dtype=np.uint16)
    p = write_dicom(tmp_path / "cr.dcm", raw, Modality="CR", PhotometricInterpretation="MONOCHROME1", BitsStored=12,
                    HighBit=11, WindowCenter=2048, WindowWidth=4096)
    out = read_dicom(p)
    np.testing.assert_array_equal(out, 4095.0 - raw)  # stored 0 (white in MONOCHROME1) -> brightest
    win = read_dicom(p, window="auto")
    assert win.min() >= 0 and win.max() <= 1
    assert win[0, 0] > win[1, 1]  # stays bright after windowing


def test_dicom_windowing(tmp_path):
    raw = np.array([[0, 60], [100, 200]], dtype=np.uint16)
    p = write_dicom(tmp_path / "w.dcm", raw, RescaleIntercept=-100, RescaleSlope=1, WindowCenter=-40,
                    WindowWidth=80)
    np.testing.assert_allclose(read_dicom(p, window=(-40, 80)), [[0, 0.5], [1, 1]])
    np.testing.assert_allclose(read_dicom(p, window="auto"), [[0, 0.5], [1, 1]])
    np.testing.assert_array_equal(read_dicom(p), raw - 100.0)


def test_dicom_multiframe_and_extensionless(tmp_path):
    vol = np.stack([np.full((8, 9), k, np.uint16) for k in range(5)])
    p = write_dicom(tmp_path / "mf.dcm", vol, Modality="MR")
    out = read_image(p)
    assert out.shape == (5, 8, 9)
    np.testing.assert_array_equal(out[:, 0, 0], np.arange(5))
    (tmp_path / "IM0001").write_bytes(p.read_bytes())
    assert read_image(tmp_path / "IM0001").shape == (5, 8, 9)


def test_dicom_series_sorted_by_position_then_instance_number(tmp_path):
    zs = [30.0, 10.0, 20.0]
    paths = []
    for k, z in enumerate(zs):
        paths.append(write_dicom(tmp_path / f"s{k}.dcm", np.full((4, 4), int(z), np.uint16),
                                 ImagePositionPatient=[0, 0, z], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                                 InstanceNumber=3 - k))
    vol = read_dicom_series(paths)
    assert vol.shape == (3, 4, 4)
    np.testing.assert_array_equal(vol[:, 0, 0], [10, 20, 30])
    np.testing.assert_array_equal(read_dicom_series(tmp_path)[:, 0, 0], [10, 20, 30])
    numbered = [write_dicom(tmp_path / "n" / f"{k}.dcm", np.full((4, 4), k, np.uint16), InstanceNumber=10 - k)
                for k in range(3)]
    np.testing.assert_array_equal(read_dicom_series(numbered)[:, 0, 0], [2, 1, 0])
    bad = write_dicom(tmp_path / "big.dcm", np.zeros((5, 5), np.uint16))
    with pytest.raises(DataError, match="big.dcm.*differs"):
        read_dicom_series(paths + [bad])


# --------------------------------------------------------------------------- NIfTI
def test_nifti_axes_and_affine(tmp_path):
    data = RNG.normal(size=(6, 7, 5)).astype(np.float32)
    affine = np.array([[0.0, -0.9, 0, 10], [1.1, 0, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    vol, aff = read_nifti(tmp_path / "v.nii.gz")
    assert vol.shape == (5, 6, 7) and vol.dtype == np.float32
    np.testing.assert_allclose(vol[3, 2, 4], data[2, 4, 3])
    # the returned affine maps (d, h, w) to the same world point as the file's affine maps (i, j, k)
    np.testing.assert_allclose(aff @ [3, 2, 4, 1], affine @ [2, 4, 3, 1])
    np.testing.assert_allclose(nifti_affine(tmp_path / "v.nii.gz"), aff)
    vol0, aff0 = read_nifti(tmp_path / "v.nii.gz", slice_axis=0)
    assert vol0.shape == (6, 7, 5)
    np.testing.assert_allclose(aff0, affine)
    np.testing.assert_array_equal(read_image(tmp_path / "v.nii.gz"), vol)


def test_nifti_scaling_and_4d(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    nib.save(img, tmp_path / "s.nii")
    vol, _ = read_nifti(tmp_path / "s.nii")
    assert vol[0, 0, 1] == pytest.approx(10 + 0.5 * 4)
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(DataError, match=r"t\.nii\.gz.*4D"):
        read_nifti(tmp_path / "t.nii.gz")


# --------------------------------------------------------------------------- NumPy
def test_npy_and_npz(tmp_path):
    a = RNG.normal(size=(8, 8))
    np.save(tmp_path / "a.npy", a)
    out = read_image(tmp_path / "a.npy")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, a, rtol=1e-6)
    np.savez(tmp_path / "single.npz", whatever=a)
    np.testing.assert_allclose(read_image(tmp_path / "single.npz"), a, rtol=1e-6)
    np.savez(tmp_path / "keyed.npz", image=a, other=a * 2)
    np.testing.assert_allclose(read_image(tmp_path / "keyed.npz"), a, rtol=1e-6)
    np.savez(tmp_path / "ambiguous.npz", x=a, y=a)
    with pytest.raises(DataError, match=r"ambiguous\.npz.*'image'"):
        read_image(tmp_path / "ambiguous.npz")


# --------------------------------------------------------------------------- errors
def test_nan_and_inf_pixels_are_errors(tmp_path):
    a = np.ones((4, 4), np.float32)
    a[1, 2] = np.nan
    np.save(tmp_path / "nan.npy", a)
    with pytest.raises(DataError, match=r"nan\.npy.*NaN"):
        read_image(tmp_path / "nan.npy")
    b = np.ones((4, 4), np.float32)
    b[0, 0] = np.inf
    Image.fromarray(b, mode="F").save(tmp_path / "inf.tif")
    with pytest.raises(DataError, match=r"inf\.tif.*infinite"):
        read_image(tmp_path / "inf.tif")


def test_corrupt_and_truncated_files(tmp_path):
    Image.fromarray(_gray(shape=(64, 64))).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc\.png"):
        read_image(tmp_path / "trunc.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"garbage\.png.*corrupt"):
        read_image(tmp_path / "garbage.png")
    (tmp_path / "garbage.dcm").write_bytes(b"\x00" * 200)
    with pytest.raises(DataError, match=r"garbage\.dcm"):
        read_image(tmp_path / "garbage.dcm")
    p = write_dicom(tmp_path / "full.dcm", _gray(np.uint16, shape=(32, 32)))
    (tmp_path / "cut.dcm").write_bytes(p.read_bytes()[:-500])
    with pytest.raises(DataError, match=r"cut\.dcm"):
        read_image(tmp_path / "cut.dcm")
    nib.save(nib.Nifti1Image(RNG.normal(size=(16, 16, 16)).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    data = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz"):
        read_nifti(tmp_path / "cut.nii.gz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match=r"bad\.npz"):
        read_image(tmp_path / "bad.npz")


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "x.xyz").write_bytes(b"1")
    with pytest.raises(DataError, match=r"x\.xyz.*unsupported.*\.png.*\.dcm.*\.nii\.gz.*\.npy"):
        read_image(tmp_path / "x.xyz")
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        read_image(tmp_path / "nope.png")


# --------------------------------------------------------------------------- masks
def test_read_mask(tmp_path):
    m = RNG.integers(0, 3, size=(10, 10)).astype(np.uint8)
    Image.fromarray(m).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, m)
    pal = Image.fromarray(m, mode="P")  # palette indices are the labels
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "pal.png"), m)
    np.save(tmp_path / "ok.npy", m.astype(np.float32))
    np.testing.assert_array_equal(read_mask(tmp_path / "ok.npy"), m)
    np.save(tmp_path / "frac.npy", m.astype(np.float32) + 0.5)
    with pytest.raises(DataError, match=r"frac\.npy.*non-integer"):
        read_mask(tmp_path / "frac.npy")
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match=r"colour\.png.*single-channel"):
        read_mask(tmp_path / "colour.png")
    vol = RNG.integers(0, 4, size=(5, 6, 7)).astype(np.uint8)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.nii.gz"), np.transpose(vol, (2, 0, 1)))
    (tmp_path / "m.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match=r"m\.jpg.*unsupported mask"):
        read_mask(tmp_path / "m.jpg")


# --------------------------------------------------------------------------- real data (optional)
def test_real_dicom_files(shared_data):
    d = shared_data / "dicom"
    ct = read_image(d / "693_UNCR.dcm")
    assert ct.shape == (512, 512) and ct.min() < -900  # air in Hounsfield units after the intercept
    cr = read_image(d / "RG1_UNCR.dcm")  # MONOCHROME1 chest radiograph
    assert cr.shape == (1955, 1841)
    h = cr.shape[0]
    lungs = cr[h // 3: h // 2, cr.shape[1] // 5: cr.shape[1] // 3].mean()
    spine = cr[h // 3: h // 2, cr.shape[1] // 2 - 50: cr.shape[1] // 2 + 50].mean()
    assert spine > lungs  # after inversion bone/mediastinum is brighter than lung
    assert read_image(d / "emri_small.dcm").shape == (10, 64, 64)
    mr = read_dicom(d / "MR2_UNCR.dcm", window="auto")
    assert mr.shape == (1024, 1024) and 0 <= mr.min() and mr.max() <= 1


def test_real_mni152_t1(shared_data):
    path = shared_data / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    vol, aff = read_nifti(path)
    assert vol.shape == (189, 197, 233) and vol.dtype == np.float32 and vol.max() > 0
    assert abs(np.linalg.det(aff[:3, :3])) == pytest.approx(1.0)  # 1 mm isotropic
    assert (aff @ [94, 98, 116, 1])[:3] == pytest.approx([0, -18, 22], abs=5)  # volume centre near the origin
