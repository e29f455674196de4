"""Deterministic synthetic medical images: the offline demo data and the test fixture factory.

* :func:`make_chest_phantoms` — chest-radiograph-like 2D images (body, lungs, heart, ribs,
  spine) with lung/heart masks; label 1 = a bright opacity (nodule) inside a lung.
* :func:`make_volume_phantoms` — CT/MRI-like volumes with two organs; label 1 = a
  hypodense lesion inside organ A.
* :func:`write_phantom_files` — the same written as PNG/DICOM/NIfTI files plus a manifest CSV.

Everything is vectorised numpy and fully determined by ``seed``. Shapes are defined in
normalised coordinates, so any image size >= 16 works.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from medprobe.errors import ConfigError

_CHUNK = 128  # images rendered at once (bounds memory for large n or sizes)


def _check(n: int, size: int, depth: int | None = None, positive_fraction: float = 0.5) -> None:
    if int(n) != n or n < 1:
        raise ConfigError(f"number of phantoms must be a positive integer, got {n!r}")
    if int(size) != size or size < 16:
        raise ConfigError(f"phantom size must be an integer >= 16, got {size!r}")
    if depth is not None and (int(depth) != depth or depth < 4):
        raise ConfigError(f"phantom depth must be an integer >= 4, got {depth!r}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ConfigError(f"positive_fraction must be within [0, 1], got {positive_fraction!r}")


def _patient_of(n: int, seed: int, repeat_fraction: float) -> np.ndarray:
    """Index of the first image of each image's patient (repeats are follow-up images)."""
    rng = np.random.default_rng([seed, 101])
    repeat = rng.random(n) < repeat_fraction
    owner = np.arange(n)
    for i in range(1, n):  # a repeat belongs to the previous image's patient; at most two per patient
        if repeat[i] and owner[i - 1] == i - 1:
            owner[i] = i - 1
    return owner


def _metadata(n: int, seed: int, owner: np.ndarray, views: tuple[str, ...]) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, 202])
    sex = np.where(rng.random(n) < 0.5, "M", "F")
    age = np.clip(np.round(rng.gamma(4.0, 12.0, n)), 1, 95).astype(int)
    view = rng.choice(np.asarray(views), size=n, p=None if len(views) != 2 else [0.65, 0.35])
    ids = {o: f"P{k:05d}" for k, o in enumerate(np.unique(owner))}
    out = []
    for i in range(n):
        o = owner[i]
        out.append({"patient_id": ids[o], "sex": str(sex[o]), "age": int(min(95, age[o] + (i != o))),
                    "view": str(view[i])})
    return out


def _labels(n: int, rng: np.random.Generator, positive_fraction: float) -> np.ndarray:
    labels = np.zeros(n, dtype=np.int64)
    labels[rng.permutation(n)[:int(round(n * positive_fraction))]] = 1
    return labels


def _upsample_matrix(low: int, size: int) -> np.ndarray:
    """(size, low) linear interpolation matrix from a coarse grid to ``size`` pixels."""
    pos = np.linspace(0, low - 1, size)
    lo = np.clip(np.floor(pos).astype(int), 0, low - 2)
    w = pos - lo
    m = np.zeros((size, low), dtype=np.float32)
    m[np.arange(size), lo] = 1 - w
    m[np.arange(size), lo + 1] = w
    return m


def _soft(inside: np.ndarray, edge: float) -> np.ndarray:
    """Soft membership from ``1 - r^2`` (positive inside an ellipse)."""
    return 1.0 / (1.0 + np.exp(-np.clip(inside / edge, -30, 30)))


# --------------------------------------------------------------------------- 2D chest
#: label-1 findings of the chest phantoms: (Gaussian sigma range, contrast range); sigma in units of
#: the half-width of the image
CHEST_FINDINGS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "nodule": ((0.035, 0.09), (0.10, 0.32)),
    "consolidation": ((0.16, 0.28), (0.25, 0.40)),
}


def make_chest_phantoms(n: int, size: int = 64, seed: int = 0, positive_fraction: float = 0.5, *,
                        repeat_fraction: float = 0.0, devices: bool = False,
                        findings: list[dict[str, Any]] | None = None, finding: str = "nodule"
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Synthetic chest radiographs.

    Returns ``(images, labels, masks, meta)``: images (n, size, size) float32 in [0, 1],
    labels (n,) int64 (1 = a nodule/opacity in a lung; exactly ``round(n *
    positive_fraction)`` positives), masks (n, size, size) int64 (0 background, 1 lungs,
    2 heart) and per-image metadata ``{patient_id, sex, age, view}``. With
    ``repeat_fraction`` > 0, that share of images are second images of the previous
    patient (same anatomy, new noise, view and label). ``devices=True`` also draws support
    devices (a central line, ECG leads; see :mod:`medprobe.data.phantom_reports`); a list passed
    as ``findings`` receives one dict per image describing what was drawn (for report text).
    ``finding`` is what label 1 draws (see :data:`CHEST_FINDINGS`): a small ``nodule`` (subtle;
    a pretrained model's task) or a large ``consolidation`` (visible even to a random network).
    """
    if finding not in CHEST_FINDINGS:
        raise ConfigError(f"phantom finding must be one of {', '.join(CHEST_FINDINGS)}, got {finding!r}")
    _check(n, size, positive_fraction=positive_fraction)
    n, size = int(n), int(size)
    rng = np.random.default_rng([seed, 1])
    owner = _patient_of(n, seed, repeat_fraction)
    meta = _metadata(n, seed, owner, ("PA", "AP"))
    male = np.array([m["sex"] == "M" for m in meta])
    ap = np.array([m["view"] == "AP" for m in meta])

    def anat(x: np.ndarray) -> np.ndarray:  # per-patient anatomy, shared by a patient's images
        return x[owner]

    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    p = {
        "body_cx": anat(u(-0.04, 0.04)), "body_rx": anat(u(0.80, 0.90)) + 0.03 * male, "body_cy": anat(u(0.15, 0.3)),
        "lung_dx": anat(u(0.32, 0.40)), "lung_cy": anat(u(-0.12, 0.0)), "lung_rx": anat(u(0.19, 0.25)),
        "lung_ry": anat(u(0.48, 0.60)), "lung_tilt": anat(u(0.05, 0.2)),
        "heart_cx": anat(u(0.06, 0.16)), "heart_cy": anat(u(0.2, 0.3)),
        "heart_rx": anat(u(0.27, 0.35)) * np.where(ap, 1.15, 1.0), "heart_ry": anat(u(0.22, 0.28)),
        "rib_phase": u(-0.06, 0.06), "rib_curve": anat(u(0.25, 0.45)),
        "gain": u(0.85, 1.15), "offset": u(-0.05, 0.05), "gamma": u(0.8, 1.25),
        "smooth_amp": u(0.02, 0.06), "noise": u(0.01, 0.025),
    }
    labels = _labels(n, rng, positive_fraction)
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    rad, ang = np.sqrt(rng.uniform(0.0, 1.0, n)) * 0.7, rng.uniform(0, 2 * np.pi, n)
    p["nod_x"] = side * p["lung_dx"] + rad * np.cos(ang) * p["lung_rx"]
    p["nod_y"] = p["lung_cy"] + rad * np.sin(ang) * p["lung_ry"]
    (s_lo, s_hi), (c_lo, c_hi) = CHEST_FINDINGS[finding]
    p["nod_s"] = np.maximum(rng.uniform(s_lo, s_hi, n), 2.0 / size)
    p["nod_c"] = rng.uniform(c_lo, c_hi, n) * labels
    if devices or findings is not None:
        from medprobe.data.phantom_reports import device_parameters, drawn_findings
        if devices:
            p.update(device_parameters(n, seed, p))
        if findings is not None:
            findings[:] = drawn_findings(p, labels, size)

    images = np.empty((n, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=np.int64)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        crng = np.random.default_rng([seed, 2, start])
        images[sl], masks[sl] = _render_chest({k: v[sl] for k, v in p.items()}, size, crng)
    return images, labels, masks, meta


def _render_chest(p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    m = len(p["gain"])
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = c[None, :, None], c[None, None, :]
    col = lambda k: p[k].astype(np.float32)[:, None, None]  # noqa: E731
    edge = 4.0 / size

    body_in = 1 - ((x - col("body_cx")) / col("body_rx")) ** 2 - ((y - col("body_cy")) / 1.15) ** 2
    body = _soft(body_in, edge)
    lungs_in = []
    for s in (-1.0, 1.0):
        dx, dy = x - s * col("lung_dx"), y - col("lung_cy")
        t = s * col("lung_tilt")
        xr, yr = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        lungs_in.append(1 - (xr / col("lung_rx")) ** 2 - (yr / col("lung_ry")) ** 2)
    lung_in = np.maximum(lungs_in[0], lungs_in[1])
    heart_in = 1 - ((x - col("heart_cx")) / col("heart_rx")) ** 2 - ((y - col("heart_cy")) / col("heart_ry")) ** 2
    lung = _soft(lung_in, edge) * (1 - _soft(heart_in, edge))
    heart = _soft(heart_in, edge)

    img = 0.04 + body * (0.58 - 0.38 * lung + 0.04 * heart)
    img = img + 0.12 * np.exp(-(x / 0.07) ** 2) * body  # spine
    # posterior ribs: periodic arcs descending laterally, over the thorax only
    phase = (y - col("rib_curve") * x ** 2 - col("rib_phase")) * (2 * np.pi / 0.17)
    ribs = 0.5 + 0.5 * np.cos(phase)
    ribs = ribs * ribs
    ribs = ribs * ribs * ribs  # sharpen to narrow bands
    thorax = _soft(col("lung_cy") + col("lung_ry") + 0.04 - y, edge) * (np.abs(x) > 0.06)
    img = img + 0.10 * ribs * body * thorax

    dist2 = (x - col("nod_x")) ** 2 + (y - col("nod_y")) ** 2
    img = img + col("nod_c") * np.exp(-dist2 / (2 * col("nod_s") ** 2))
    if "line_c" in p:
        from medprobe.data.phantom_reports import render_devices
        img = img + render_devices(p, x, y, size)

    up = _upsample_matrix(6, size)
    smooth = up[None] @ rng.standard_normal((m, 6, 6), dtype=np.float32) @ up.T[None]
    img = img + col("smooth_amp") * smooth + col("noise") * rng.standard_normal((m, size, size), dtype=np.float32)
    img = np.clip(img, 0, 1) ** col("gamma") * col("gain") + col("offset")

    mask = np.zeros((m, size, size), dtype=np.int64)
    mask[(lung_in > 0) & (body_in > 0)] = 1
    mask[(heart_in > 0) & (body_in > 0)] = 2
    return np.clip(img, 0, 1).astype(np.float32), mask


# --------------------------------------------------------------------------- 3D volumes
def make_volume_phantoms(n: int, size: int = 32, depth: int = 16, seed: int = 0, positive_fraction: float = 0.5,
                         *, repeat_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic CT/MRI-like volumes.

    Returns ``(volumes, labels, masks)``: volumes (n, depth, size, size) float32 in [0, 1],
    labels (n,) int64 (1 = a dark lesion inside organ A) and organ masks (n, depth, size,
    size) int64 (0 background, 1 organ A, a large ellipsoid, 2 organ B, a small bright
    one). ``repeat_fraction`` as in :func:`make_chest_phantoms` (see :func:`volume_metadata`).
    """
    _check(n, size, depth, positive_fraction)
    n, size, depth = int(n), int(size), int(depth)
    rng = np.random.default_rng([seed, 3])
    owner = _patient_of(n, seed, repeat_fraction)
    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    p = {
        "body_rx": u(0.78, 0.9)[owner], "body_ry": u(0.58, 0.7)[owner],
        "a_cx": u(-0.4, -0.22)[owner], "a_cy": u(-0.15, 0.05)[owner], "a_cz": u(-0.15, 0.15)[owner],
        "a_rx": u(0.28, 0.38)[owner], "a_ry": u(0.25, 0.33)[owner], "a_rz": u(0.5, 0.75)[owner],
        "b_cx": u(0.25, 0.45)[owner], "b_cy": u(0.1, 0.3)[owner], "b_cz": u(-0.2, 0.2)[owner],
        "b_rx": u(0.11, 0.17)[owner], "b_ry": u(0.11, 0.17)[owner], "b_rz": u(0.3, 0.45)[owner],
        "gain": u(0.9, 1.1), "offset": u(-0.04, 0.04), "noise": u(0.015, 0.035),
    }
    labels = _labels(n, rng, positive_fraction)
    r, th, ph = rng.uniform(0, 0.5, n), rng.uniform(0, 2 * np.pi, n), rng.uniform(-1, 1, n)
    p["les_x"] = p["a_cx"] + r * np.cos(th) * p["a_rx"]
    p["les_y"] = p["a_cy"] + r * np.sin(th) * p["a_ry"]
    p["les_z"] = p["a_cz"] + ph * 0.5 * p["a_rz"]
    p["les_s"] = np.maximum(u(0.08, 0.16), 2.0 / size)
    p["les_sz"] = np.maximum(p["les_s"], 2.5 / depth)
    p["les_c"] = u(0.06, 0.3) * labels

    vols = np.empty((n, depth, size, size), dtype=np.float32)
    masks = np.empty((n, depth, size, size), dtype=np.int64)
    step = max(1, _CHUNK * 64 * 64 // (size * size * depth))
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        crng = np.random.default_rng([seed, 4, start])
        vols[sl], masks[sl] = _render_volume({k: v[sl] for k, v in p.items()}, size, depth, crng)
    return vols, labels, masks


def _render_volume(p: dict[str, np.ndarray], size: int, depth: int, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray]:
    m = len(p["gain"])
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    cz = (np.arange(depth, dtype=np.float32) + 0.5) / depth * 2 - 1
    z, y, x = cz[None, :, None, None], c[None, None, :, None], c[None, None, None, :]
    col = lambda k: p[k].astype(np.float32)[:, None, None, None]  # noqa: E731
    edge = 4.0 / size

    body_in = 1 - (x / col("body_rx")) ** 2 - (y / col("body_ry")) ** 2 + 0 * z
    a_in = 1 - sum(((v - col(f"a_c{a}")) / col(f"a_r{a}")) ** 2 for v, a in ((x, "x"), (y, "y"), (z, "z")))
    b_in = 1 - sum(((v - col(f"b_c{a}")) / col(f"b_r{a}")) ** 2 for v, a in ((x, "x"), (y, "y"), (z, "z")))
    body, organ_a, organ_b = _soft(body_in, edge), _soft(a_in, edge), _soft(b_in, edge)
    spine = _soft(1 - (x / 0.12) ** 2 - ((y - 0.42) / 0.12) ** 2 + 0 * z, edge)
    vol = 0.03 + body * (0.42 + 0.18 * organ_a * (1 - organ_b) + 0.32 * organ_b + 0.45 * spine)
    d2 = ((x - col("les_x")) ** 2 + (y - col("les_y")) ** 2) / col("les_s") ** 2 + \
        ((z - col("les_z")) / col("les_sz")) ** 2
    vol = vol - col("les_c") * np.exp(-d2 / 2) * organ_a
    vol = vol + col("noise") * rng.standard_normal(vol.shape, dtype=np.float32)
    vol = vol * col("gain") + col("offset")
    mask = np.zeros(vol.shape, dtype=np.int64)
    mask[(a_in > 0) & (body_in > 0)] = 1
    mask[(b_in > 0) & (body_in > 0)] = 2
    return np.clip(vol, 0, 1).astype(np.float32), mask


def volume_metadata(n: int, seed: int = 0, repeat_fraction: float = 0.0) -> list[dict[str, Any]]:
    """Metadata ``{patient_id, sex, age, view}`` matching ``make_volume_phantoms(n, seed=seed, ...)``."""
    return _metadata(int(n), seed, _patient_of(int(n), seed, repeat_fraction), ("axial",))


# --------------------------------------------------------------------------- files
def write_dicom(path: str | Path, pixels: np.ndarray, **attributes: Any) -> Path:
    """Write a minimal uncompressed DICOM file (for synthetic data and tests).

    ``pixels``: integer (H, W) or multi-frame (D, H, W) array, stored as 16-bit (signed if
    its dtype is signed). ``attributes`` are DICOM keywords set on the dataset (e.g.
    ``RescaleSlope=2``, ``PhotometricInterpretation="MONOCHROME1"``, ``Modality="CT"``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    arr = np.asarray(pixels)
    if arr.ndim not in (2, 3) or arr.dtype.kind not in "iu":
        raise ValueError(f"write_dicom expects an integer (H, W) or (D, H, W) array, got {arr.dtype} {arr.shape}")
    signed = arr.dtype.kind == "i"
    arr = arr.astype("<i2" if signed else "<u2")
    uid = generate_uid(entropy_srcs=[str(path.name), str(arr.shape), str(sorted(attributes))])
    sop_class = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid, "series"])
    ds.Modality, ds.PatientID = "OT", "ANON"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    if arr.ndim == 3:
        ds.NumberOfFrames = int(arr.shape[0])
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def write_phantom_files(root: str | Path, n: int = 12, size: int = 32, seed: int = 0, fmt: str = "png",
                        with_masks: bool = True) -> Path:
    """Write ``n`` phantoms as files plus ``manifest.csv`` and return the CSV path.

    ``fmt``: ``png`` (8-bit chest images), ``dcm`` (16-bit DICOM chest images) or ``nii``
    (NIfTI volumes of depth ``size // 2``, read back with ``read_nifti(slice_axis=2)``).
    Masks are PNG (2D) or NIfTI (3D). The CSV has the columns image, [mask], label,
    patient_id, split, sex, age, view, with paths relative to the CSV; splits are
    patient-level (about 60/20/20) and some patients have two images.
    """
    from medprobe.data.base import Record
    from medprobe.data.splits import patient_split

    if fmt not in ("png", "dcm", "nii"):
        raise ConfigError(f"phantom file format must be 'png', 'dcm' or 'nii', got {fmt!r}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if with_masks:
        (root / "masks").mkdir(parents=True, exist_ok=True)
    if fmt == "nii":
        images, labels, masks = make_volume_phantoms(n, size=size, depth=max(4, size // 2), seed=seed,
                                                     repeat_fraction=0.25)
        meta = volume_metadata(n, seed, repeat_fraction=0.25)
    else:
        images, labels, masks, meta = make_chest_phantoms(n, size=size, seed=seed, repeat_fraction=0.25)
    records = [Record(f"case_{i:04d}", "", m["patient_id"], int(labels[i])) for i, m in enumerate(meta)]
    split = patient_split(records, (0.6, 0.2, 0.2), seed=seed)
    rows = []
    for i, m in enumerate(meta):
        stem = f"case_{i:04d}"
        if fmt == "png":
            image = f"images/{stem}.png"
            _write_png(root / image, np.round(images[i] * 255).astype(np.uint8))
        elif fmt == "dcm":
            image = f"images/{stem}.dcm"
            write_dicom(root / image, np.round(images[i] * 4000).astype(np.uint16), Modality="CR",
                        PatientID=m["patient_id"], BitsStored=12, HighBit=11, ViewPosition=m["view"],
                        PatientSex=m["sex"], PatientAge=f"{m['age']:03d}Y")
        else:
            image = f"images/{stem}.nii.gz"
            _write_nifti(root / image, images[i])
        row = {"image": image}
        if with_masks:
            row["mask"] = f"masks/{stem}.nii.gz" if fmt == "nii" else f"masks/{stem}.png"
            if fmt == "nii":
                _write_nifti(root / row["mask"], masks[i].astype(np.uint8))
            else:
                _write_png(root / row["mask"], masks[i].astype(np.uint8))
        row.update(label=int(labels[i]), patient_id=m["patient_id"], split=split[f"case_{i:04d}"], sex=m["sex"],
                   age=m["age"], view=m["view"])
        rows.append(row)
    csv_path = root / "manifest.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(arr).save(path)


def _write_nifti(path: Path, volume: np.ndarray) -> None:
    """Write a (D, H, W) array as a NIfTI file whose third axis is D (0.8 x 0.8 x 2.5 mm voxels)."""
    import nibabel as nib
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-100.0, -120.0, -50.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(volume, (1, 2, 0))), affine), str(path))
