"""Tiny copies, in their release layouts, of MIMIC-CXR-JPG (+ MIMIC-IV patients), SIIM-ACR pneumothorax and
VinDr-RibCXR (for tests/test_more_adapters.py; the helpers are those of fixtures_public)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from fixtures_public import img, jpg, png, write_csv
from medprobe.data.phantom import write_dicom

MIMIC_OBS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
             "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
             "Pneumothorax", "Support Devices")
MIMIC_METADATA_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                         "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                         "PatientOrientationCodeSequence_CodeMeaning")


def _gz(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join([header] + rows) + "\n").encode()))
    return path


def write_mimic_cxr_jpg(root: Path) -> tuple[Path, Path]:
    """mimic-cxr-jpg/2.0.0 (split, metadata and chexpert CSVs gzipped, files/pXX/...) and a MIMIC-IV patients.csv.gz.

    Subjects 10000032 (2 studies, one with a lateral), 10000764 (test), 10000898 (validate), 10001176 (no
    labeler row for its study, and absent from the patients table)."""
    images = [  # dicom, subject, study, split, view, date
        ("d1", "10000032", "50414267", "train", "PA", "21800506"),
        ("d2", "10000032", "50414267", "train", "LATERAL", "21800506"),
        ("d3", "10000032", "53189527", "train", "AP", "21830626"),
        ("d4", "10000764", "57375967", "test", "AP", "21321015"),
        ("d5", "10000898", "50771383", "validate", "PA", "21540112"),
        ("d6", "10001176", "54684191", "train", "PA", "21860722"),
    ]
    _gz(root / "mimic-cxr-2.0.0-split.csv.gz", "dicom_id,study_id,subject_id,split",
        [f"{d},{st},{su},{sp}" for d, su, st, sp, _, _ in images])
    _gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA_HEADER,
        [f"{d},{su},{st},CHEST (PA AND LAT),{v},3056,2544,{date},134318.0,CHEST (PA AND LAT),postero-anterior,Erect"
         for d, su, st, _, v, date in images])
    labels = {  # study -> observation values (others blank)
        "50414267": {"No Finding": "1.0"},
        "53189527": {"Cardiomegaly": "-1.0", "Pleural Effusion": "1.0", "Edema": "0.0"},
        "57375967": {"Pneumothorax": "1.0", "Atelectasis": "1.0"},
        "50771383": {"Consolidation": "1.0", "Support Devices": "1.0"},
    }
    rows = []
    for d, su, st, _, _, _ in images:
        if st in labels and not any(r.startswith(f"{su},{st},") for r in rows):
            rows.append(",".join([su, st] + [labels[st].get(c, "") for c in MIMIC_OBS]))
    _gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "subject_id,study_id," + ",".join(MIMIC_OBS), rows)
    for k, (d, su, st, _, _, _) in enumerate(images):
        jpg(root / "files" / f"p{su[:2]}" / f"p{su}" / f"s{st}" / f"{d}.jpg", img(900 + k))
    patients = _gz(root.parent / "mimiciv" / "hosp" / "patients.csv.gz",
                   "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
                   ["10000032,F,52,2180,2014 - 2016,2180-09-09", "10000764,M,86,2132,2014 - 2016,",
                    "10000898,F,39,2152,2011 - 2013,"])
    return root, patients


# --------------------------------------------------------------------------- SIIM-ACR pneumothorax
SIIM_SHAPE = (6, 5)


def write_siim(root: Path, rle_relative: str) -> Path:
    """The Kaggle SIIM-ACR layout: train-rle.csv (ImageId, EncodedPixels; -1 = none; several rows per image) and
    dicom-images-train/<study uid>/<series uid>/<ImageId>.dcm."""
    uids = [f"1.2.276.0.7230010.3.1.4.8323329.{1000 + k}.1517875166.{k}" for k in range(6)]
    rows = []
    for k, uid in enumerate(uids):
        rows.append(f"{uid}, {rle_relative if k in (1, 4) else '-1'}")
        if k == 4:
            rows.append(f"{uid}, 0 1")  # a second mask of the same image: the top-left pixel
        write_dicom(root / "dicom-images-train" / f"1.2.study.{k}" / f"1.2.series.{k}" / f"{uid}.dcm",
                    img(1500 + k, SIIM_SHAPE, "uint16", 255), PatientID=f"pid-{k // 2}",
                    PatientSex="F" if k % 2 else "M", PatientAge=f"{20 + k:03d}Y", ViewPosition="PA" if k % 3 else "AP",
                    BitsStored=8)
    write_csv(root / "train-rle.csv", "ImageId, EncodedPixels", rows)
    return root


# --------------------------------------------------------------------------- VinDr-RibCXR
RIBS = tuple(f"R{i}" for i in range(1, 11)) + tuple(f"L{i}" for i in range(1, 11))
RIB_SHAPE = (24, 16)


def rib_box(name: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), inclusive, of the rectangle drawn for rib ``name``: rib i on rows 2i-1..2i,
    right ribs on columns 1..6, left ribs on 9..14."""
    i = int(name[1:])
    x0 = 1 if name.startswith("R") else 9
    return x0, 2 * i - 1, x0 + 5, 2 * i


def write_vindr_rib(root: Path) -> Path:
    """data/{train,val}/img/*.png and data/{train,val}/Vindr_RibCXR_{train,val}_mask.json (pandas 'columns' orient:
    column -> row index -> value; 'img' the image path, each rib a polygon [{x, y}, ...] or "None"). R10 of the
    first training image is "None" (not visible)."""
    for split, n in (("train", 4), ("val", 2)):
        cols: dict[str, dict[str, object]] = {"img": {}}
        cols.update({name: {} for name in RIBS})
        for k in range(n):
            rel = f"data/{split}/img/VinDr_RibCXR_{split}_{k:03d}.png"
            png(root / rel, img(1600 + k + (10 if split == "val" else 0), RIB_SHAPE))
            cols["img"][str(k)] = rel
            for name in RIBS:
                if name == "R10" and k == 0 and split == "train":
                    cols[name][str(k)] = "None"
                    continue
                x0, y0, x1, y1 = rib_box(name)
                cols[name][str(k)] = [{"x": x0 + 0.2, "y": y0}, {"x": x1 - 0.1, "y": y0 - 0.3},
                                      {"x": x1, "y": y1}, {"x": x0, "y": y1 + 0.2}]
        (root / "data" / split / f"Vindr_RibCXR_{split}_mask.json").write_text(json.dumps(cols))
    return root


# --------------------------------------------------------------------------- BTCV
BTCV_CASES = (1, 2, 5, 6, 7)  # 1 and 2 are in TransUNet's test list


def write_btcv(root: Path) -> Path:
    """RawData/Training/img/imgNNNN.nii.gz and RawData/Training/label/labelNNNN.nii.gz (values 0..13), and an
    unlabelled RawData/Testing/img volume."""
    from fixtures_public import _nifti
    import numpy as np
    for k, case in enumerate(BTCV_CASES):
        shape = (8, 7, 4)
        vol = img(1700 + k, shape, "int16", 400) - 200
        lab = np.zeros(shape, np.uint8)
        lab[1:3, 1:3, 1] = 8   # aorta
        lab[4:6, 2:4, 2] = 4   # gallbladder
        lab[6, 5, 3] = 5       # esophagus (not among TransUNet's 8)
        lab[0, 0, 0] = 13      # left adrenal gland
        _nifti(root / "RawData" / "Training" / "img" / f"img{case:04d}.nii.gz", vol)
        _nifti(root / "RawData" / "Training" / "label" / f"label{case:04d}.nii.gz", lab)
    _nifti(root / "RawData" / "Testing" / "img" / "img0061.nii.gz", img(1799, (8, 7, 4), "int16", 400))
    return root
