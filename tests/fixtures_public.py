"""Tiny copies of the public benchmarks in their exact distribution formats (for the adapter tests).

Every writer creates the real file names, CSV headers, DICOM tags, NIfTI files and
MATLAB v7.3 (HDF5) structures of its dataset, with a handful of small images, and
returns the folder to pass as the adapter's root.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from medprobe.data.phantom import write_dicom


def img(seed: int, shape: tuple[int, ...] = (12, 10), dtype: str = "uint8", high: int = 255) -> np.ndarray:
    """A deterministic small image."""
    return np.random.default_rng(seed).integers(0, high + 1, size=shape).astype(dtype)


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)  # uint16 -> 16-bit grayscale PNG
    return path


def jpg(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)
    return path


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + rows) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- NIH ChestX-ray14
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def write_nih(root: Path) -> Path:
    """6 patients, 9 images; patients 5 and 6 are the official test set (Data_Entry_2017.csv format)."""
    entries = [  # image, findings, follow-up, patient, age, sex, view
        ("00000001_000.png", "Cardiomegaly", 0, 1, 58, "M", "PA"),
        ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA"),
        ("00000002_000.png", "No Finding", 0, 2, 81, "M", "PA"),
        ("00000003_000.png", "Hernia", 0, 3, 15, "F", "AP"),
        ("00000003_001.png", "Hernia|Pleural_Thickening", 1, 3, 414, "F", "PA"),
        ("00000004_000.png", "Mass|Nodule", 0, 4, 40, "M", "AP"),
        ("00000005_000.png", "No Finding", 0, 5, 60, "F", "PA"),
        ("00000005_001.png", "Effusion", 1, 5, 61, "F", "AP"),
        ("00000006_000.png", "Pneumothorax", 0, 6, 33, "M", "PA"),
    ]
    rows = [f"{n},{f},{fu},{pid},{age},{sex},{view},2500,2048,0.168,0.168," for n, f, fu, pid, age, sex, view in entries]
    write_csv(root / "Data_Entry_2017.csv", NIH_HEADER, rows)
    (root / "train_val_list.txt").write_text("\n".join(e[0] for e in entries if e[3] <= 4) + "\n")
    (root / "test_list.txt").write_text("\n".join(e[0] for e in entries if e[3] > 4) + "\n")
    for k, e in enumerate(entries):
        png(root / f"images_00{1 + k // 5}" / "images" / e[0], img(k))
    return root


# --------------------------------------------------------------------------- CheXpert
CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices")


def write_chexpert(parent: Path) -> Path:
    """CheXpert-v1.0-small with train.csv (4 patients, uncertain labels, a lateral) and valid.csv."""
    root = parent / "CheXpert-v1.0-small"

    def row(split: str, patient: int, study: int, view: int, frontal: bool, sex: str, age: int, appa: str,
            values: dict[str, str]) -> str:
        kind = "frontal" if frontal else "lateral"
        rel = f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study{study}/view{view}_{kind}.jpg"
        jpg(parent / rel, img(patient * 10 + view + study))
        cells = [values.get(c, "") for c in CHEXPERT_HEADER.split(",")[5:]]
        return ",".join([rel, sex, str(age), "Frontal" if frontal else "Lateral", appa] + cells)

    train = [
        row("train", 1, 1, 1, True, "Female", 68, "AP", {"No Finding": "1.0"}),
        row("train", 2, 1, 1, True, "Male", 87, "AP", {"Cardiomegaly": "-1.0", "Edema": "1.0", "Atelectasis": "0.0"}),
        row("train", 2, 1, 2, False, "Male", 87, "", {"Cardiomegaly": "1.0"}),
        row("train", 3, 1, 1, True, "Female", 41, "PA", {"Pleural Effusion": "1.0", "Consolidation": "-1.0"}),
        row("train", 3, 2, 1, True, "Female", 42, "PA", {"Atelectasis": "1.0"}),
        row("train", 4, 1, 1, True, "Unknown", 19, "AP", {"Support Devices": "1.0"}),
    ]
    valid = [
        row("valid", 64541, 1, 1, True, "Male", 73, "AP", {"Cardiomegaly": "1.0", "Edema": "0.0"}),
        row("valid", 64542, 1, 1, True, "Female", 70, "PA", {"No Finding": "1.0"}),
    ]
    write_csv(root / "train.csv", CHEXPERT_HEADER, train)
    write_csv(root / "valid.csv", CHEXPERT_HEADER, valid)
    return root


# --------------------------------------------------------------------------- Montgomery / Shenzhen
def write_montgomery(root: Path, n: int = 6) -> Path:
    """MontgomerySet with CXR_png, ManualMask/{left,right}Mask and ClinicalReadings."""
    for i in range(1, n + 1):
        stem = f"MCUCXR_{i:04d}_{i % 2}"
        png(root / "CXR_png" / f"{stem}.png", img(i, (12, 10), "uint16", 4095))
        left = np.zeros((12, 10), np.uint8)
        right = np.zeros((12, 10), np.uint8)
        left[2:9, 6:9] = 255
        right[2:9, 1:4] = 255
        png(root / "ManualMask" / "leftMask" / f"{stem}.png", left)
        png(root / "ManualMask" / "rightMask" / f"{stem}.png", right)
        (root / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (root / "ClinicalReadings" / f"{stem}.txt").write_text(
            f"Patient's Sex: {'F' if i % 2 else 'M'}\nPatient's Age: {20 * i:03d}Y\n"
            f"{'normal' if i % 2 == 0 else 'right upper lobe infiltrate'}\n")
    return root


def write_shenzhen(root: Path, n: int = 6, masks: int = 4) -> Path:
    """ChinaSet_AllFiles with CXR_png, ClinicalReadings and Kaggle-style mask/*_mask.png for some images."""
    readings = ["male 45yrs\nnormal", "female 64days\nnormal", "male 16month\nSTB", "femal 32yrs\nPTB",
                "Male 35yrs\nnormal", "female 70 yrs\nnormal"]
    for i in range(1, n + 1):
        stem = f"CHNCXR_{i:04d}_{i % 2}"
        png(root / "CXR_png" / f"{stem}.png", img(100 + i, (10, 12)))
        (root / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (root / "ClinicalReadings" / f"{stem}.txt").write_text(readings[(i - 1) % len(readings)] + "\n")
        if i <= masks:
            m = np.zeros((10, 12), np.uint8)
            m[2:8, 1:5] = 255
            m[2:8, 7:11] = 255
            png(root / "mask" / f"{stem}_mask.png", m)
    return root


# --------------------------------------------------------------------------- SARS-CoV-2 CT
def write_sarscov2(root: Path, flat: bool = False) -> Path:
    """Class folders COVID/ and non-COVID/ with patient folders of slices (or flat slices)."""
    k = 0
    for cls in ("COVID", "non-COVID"):
        for p in range(1, 4):
            for s in range(1, 4 if not flat else 2):
                k += 1
                name = f"Patient ({p})/{s}.png" if not flat else f"{'Covid' if cls == 'COVID' else 'Non-Covid'} ({p}).png"
                png(root / cls / name, img(200 + k, (9, 11)))
    return root


# --------------------------------------------------------------------------- NIfTI task folders
def _nifti(path: Path, data: np.ndarray, spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)) -> Path:
    import nibabel as nib
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag(list(spacing) + [1.0])), str(path))
    return path


def write_msd(parent: Path, task: str = "Task09_Spleen", n: int = 5, channels: int = 1) -> Path:
    """A Decathlon Task folder: dataset.json, imagesTr/labelsTr (and imagesTs) NIfTI volumes."""
    root = parent / task
    organ = task.split("_", 1)[1].lower()
    labels = {"Task09_Spleen": {"0": "background", "1": "spleen"},
              "Task04_Hippocampus": {"0": "background", "1": "Anterior", "2": "Posterior"},
              "Task02_Heart": {"0": "background", "1": "left atrium"},
              "Task01_BrainTumour": {"0": "background", "1": "edema", "2": "non-enhancing tumor",
                                     "3": "enhancing tumour"}}[task]
    modality = {"0": "CT"} if task == "Task09_Spleen" else {"0": "MRI"}
    if channels > 1:
        modality = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    training = []
    for i in range(n):
        name = f"{organ}_{i + 2}.nii.gz" if organ != "heart" else f"la_{i + 3:03d}.nii.gz"
        shape = (8, 7, 4)
        vol = img(300 + i, shape, "int16", 300) - 100
        if channels > 1:
            vol = np.stack([vol + 10 * c for c in range(channels)], axis=-1).astype(np.int16)
        lab = np.zeros(shape, np.uint8)
        lab[2:5, 2:5, 1:3] = 1
        lab[5:7, 3:5, 2] = len(labels) - 1
        _nifti(root / "imagesTr" / name, vol)
        _nifti(root / "labelsTr" / name, lab)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    _nifti(root / "imagesTs" / f"{organ}_99.nii.gz", img(399, (8, 7, 4), "int16", 300))
    meta = {"name": task.split("_", 1)[1], "description": "fixture", "reference": "fixture",
            "licence": "CC-BY-SA 4.0", "release": "1.0 04/05/2018", "tensorImageSize": "4D" if channels > 1 else "3D",
            "modality": modality, "labels": labels, "numTraining": n, "numTest": 1, "training": training,
            "test": [f"./imagesTs/{organ}_99.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


AMOS_LABELS = {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
               "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
               "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
               "15": "prostate/uterus"}


def write_amos(root: Path) -> Path:
    """amos22: dataset.json with training (CT + one MRI case), validation and unlabelled test."""
    def case(folder: str, lab_folder: str | None, number: int) -> dict[str, str]:
        name = f"amos_{number:04d}.nii.gz"
        _nifti(root / folder / name, img(number, (6, 6, 3), "int16", 400) - 200)
        out = {"image": f"./{folder}/{name}"}
        if lab_folder:
            lab = np.zeros((6, 6, 3), np.uint8)
            lab[1:3, 1:3, :] = 1
            lab[3:5, 3:5, 1] = 15
            _nifti(root / lab_folder / name, lab)
            out["label"] = f"./{lab_folder}/{name}"
        return out

    meta = {"name": "AMOS", "description": "fixture", "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": AMOS_LABELS, "numTraining": 5, "numValidation": 2, "numTest": 1,
            "training": [case("imagesTr", "labelsTr", n) for n in (1, 4, 5, 6, 507)],
            "validation": [case("imagesVa", "labelsVa", n) for n in (8, 13)],
            "test": [case("imagesTs", None, 9)]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


# --------------------------------------------------------------------------- Figshare brain tumor (.mat v7.3)
MAT_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Apr  3 10:00:00 2017 HDF5 schema 1.00 ."


def write_mat_v73(path: Path, label: int, pid: str, image: np.ndarray, mask: np.ndarray) -> Path:
    """A cjdata struct the way MATLAB 7.3 saves it: HDF5 after a 512-byte header, arrays transposed."""
    import h5py
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group("cjdata")
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        d = g.create_dataset("PID", data=np.array([[ord(c)] for c in pid], dtype=np.uint16))
        d.attrs["MATLAB_class"] = np.bytes_("char")
        d.attrs["MATLAB_int_decode"] = np.int32(2)
        d = g.create_dataset("image", data=np.ascontiguousarray(image.T))
        d.attrs["MATLAB_class"] = np.bytes_("int16")
        d = g.create_dataset("label", data=np.array([[float(label)]]))
        d.attrs["MATLAB_class"] = np.bytes_("double")
        d = g.create_dataset("tumorBorder", data=np.array([[3.0, 4.0, 5.0, 6.0]]))
        d.attrs["MATLAB_class"] = np.bytes_("double")
        d = g.create_dataset("tumorMask", data=np.ascontiguousarray(mask.T.astype(np.uint8)))
        d.attrs["MATLAB_class"] = np.bytes_("logical")
        d.attrs["MATLAB_int_decode"] = np.int32(1)
    with open(path, "r+b") as f:
        f.write(MAT_HEADER.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")
    return path


def write_figshare(root: Path) -> Path:
    """Six .mat files of 3 patients (non-square 12 x 10 slices, so the transpose is tested) + cvind.mat."""
    spec = [(1, "100360"), (1, "100360"), (2, "MR029870"), (3, "MR029870"), (2, "112649"), (3, "112649")]
    for k, (label, pid) in enumerate(spec, start=1):
        image = img(400 + k, (12, 10), "int16", 900)
        mask = np.zeros((12, 10), bool)
        mask[3:7, 2:5] = True
        write_mat_v73(root / f"brainTumorDataPublic_{1 if k <= 3 else 767}" / f"{k}.mat", label, pid, image, mask)
    (root / "cvind.mat").write_bytes(b"not read by the adapter")
    return root


# --------------------------------------------------------------------------- DICOM datasets
VINDR_LABELS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD",
                "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]


def write_vindr(root: Path) -> Path:
    """physionet vindr-cxr/1.0.0: annotations/image_labels_{train,test}.csv and .dicom files."""
    def values(pos: set[str]) -> str:
        return ",".join("1" if c in pos else "0" for c in VINDR_LABELS)

    train = []
    votes = {  # image -> three radiologists' positive sets
        "000434271f63a053c4128a0ba6352c7f": [{"Cardiomegaly"}, {"Cardiomegaly", "Pneumonia"}, {"No finding"}],
        "00053190460d56c53cc3e57321387478": [{"No finding"}, {"No finding"}, {"No finding"}],
        "0005e8e3701dfb1dd93d53e2ff537b6e": [{"Nodule/Mass"}, {"Nodule/Mass", "COPD"}, {"Nodule/Mass"}],
        "0006e0a85696f6bb578e84fafa9a5607": [{"Pleural effusion"}, {"No finding"}, {"Pleural effusion"}],
    }
    for k, (image_id, sets) in enumerate(votes.items()):
        for r, pos in enumerate(sets):
            train.append(f"{image_id},R{r + 8},{values(pos)}")
        write_dicom(root / "train" / f"{image_id}.dicom", img(500 + k, (10, 10), "uint16", 4000),
                    PatientSex="F" if k % 2 else "M", PatientAge=f"{40 + 10 * k:03d}Y", ViewPosition="PA",
                    PhotometricInterpretation="MONOCHROME1" if k == 0 else "MONOCHROME2")
    write_csv(root / "annotations" / "image_labels_train.csv", "image_id,rad_id," + ",".join(VINDR_LABELS), train)
    test = []
    for k, (image_id, pos) in enumerate({"002a34c58c5b758217ed1f584ccbcfe9": {"Cardiomegaly", "Tuberculosis"},
                                          "004f33259ee4aef671c2b95d54e4be68": {"No finding"}}.items()):
        test.append(f"{image_id},{values(pos)}")
        write_dicom(root / "test" / f"{image_id}.dicom", img(600 + k, (10, 10), "uint16", 4000), PatientSex="O")
    write_csv(root / "annotations" / "image_labels_test.csv", "image_id," + ",".join(VINDR_LABELS), test)
    return root


def write_rsna(root: Path) -> Path:
    """stage_2_train_labels.csv (one row per box), stage_2_detailed_class_info.csv, stage_2_train_images/*.dcm."""
    labels = ["0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0",
              "00313ee0-9eaa-42f4-b0ab-c148ed3241cd,,,,,0",
              "00322d4d-1c29-4943-afc9-b6754be640eb,,,,,0",
              "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1",
              "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1",
              "00569f44-917d-4c86-a842-81832af98c30,,,,,0",
              "00704310-78a8-4b38-8475-49f4573b2dbb,323.0,577.0,160.0,104.0,1"]
    classes = {"0004cfab-14fd-4e49-80ba-63a80b6bddd6": "No Lung Opacity / Not Normal",
               "00313ee0-9eaa-42f4-b0ab-c148ed3241cd": "No Lung Opacity / Not Normal",
               "00322d4d-1c29-4943-afc9-b6754be640eb": "Normal",
               "00436515-870c-4b36-a041-de91049b9ab4": "Lung Opacity",
               "00569f44-917d-4c86-a842-81832af98c30": "Normal",
               "00704310-78a8-4b38-8475-49f4573b2dbb": "Lung Opacity"}
    write_csv(root / "stage_2_train_labels.csv", "patientId,x,y,width,height,Target", labels)
    rows = [f"{pid},{cls}" for pid, cls in classes.items()]
    rows.insert(4, "00436515-870c-4b36-a041-de91049b9ab4,Lung Opacity")  # one row per box, as distributed
    write_csv(root / "stage_2_detailed_class_info.csv", "patientId,class", rows)
    for k, pid in enumerate(classes):
        with warnings.catch_warnings():  # RSNA stores PatientAge as a bare number, not a valid DICOM AS value
            warnings.simplefilter("ignore")
            write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", img(700 + k, (8, 8), "uint16", 255),
                        PatientSex="M" if k % 2 else "F", PatientAge=str(30 + 9 * k),
                        ViewPosition="AP" if k % 3 else "PA", PatientID=pid, BitsStored=8)
    return root


# SIIM relative RLE of a known 6 x 5 (H x W) mask: pixel index = column * H + row.
CANDID_SHAPE = (6, 5)
CANDID_MASK = np.array([[0, 0, 0, 0, 0],
                        [0, 1, 1, 0, 0],
                        [0, 1, 1, 0, 0],
                        [0, 1, 0, 0, 0],
                        [0, 0, 0, 0, 1],
                        [0, 0, 0, 0, 1]], dtype=np.uint8)
# column 1 rows 1-3 -> indices 7..9; column 2 rows 1-2 -> 13..14; column 4 rows 4-5 -> 28..29
CANDID_RLE_RELATIVE = "7 3 3 2 13 2"
CANDID_RLE_ABSOLUTE = "8 3 14 2 29 2"


def write_candid(root: Path, rle: str = CANDID_RLE_RELATIVE) -> Path:
    """Pneumothorax_reports.csv, chest_tube.csv, acute_rib_fracture.csv and DICOM images under dataset/."""
    uids = [f"1.2.826.0.1.3680043.8.498.1000{k}" for k in range(6)]
    reports = []
    for k, uid in enumerate(uids):
        encoded = rle if k in (0, 3) else "-1"
        reports.append(f'{uid},P{k // 2 + 1}_{uid[-6:]}.dcm,"{encoded}","Chest X-ray. {"Pneumothorax." if encoded != "-1" else "No pneumothorax."}"')
        write_dicom(root / "dataset" / f"{uid}.dcm", img(800 + k, CANDID_SHAPE, "uint16", 1000))
    write_csv(root / "Pneumothorax_reports.csv", "SOPInstanceUID,filename,EncodedPixels,Report", reports)
    write_csv(root / "chest_tube.csv", "anon_SOPUID,annotation_ref,mask_rle",
              [f"{uids[1]},ct_1,{rle}", f"{uids[2]},ct_2,-1"])
    write_csv(root / "acute_rib_fracture.csv", "anon_SOPUID,annotation_ref,mask_rle", [f"{uids[4]},rf_1,{rle}"])
    return root


def write_aptos(root: Path, n: int = 10) -> Path:
    """train.csv (id_code, diagnosis) and train_images/<id_code>.png (RGB)."""
    rows = []
    for k in range(n):
        code = f"{k:03x}c1f2e3d4"
        rows.append(f"{code},{k % 5}")
        png(root / "train_images" / f"{code}.png", img(900 + k, (8, 9, 3)))
    write_csv(root / "train.csv", "id_code,diagnosis", rows)
    write_csv(root / "test.csv", "id_code", ["ffffc1f2e3d4"])
    return root


CBIS_MASS_HEADER = ("patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,"
                    "mass shape,mass margins,assessment,pathology,subtlety,image file path,cropped image file path,"
                    "ROI mask file path")
CBIS_CALC_HEADER = ("patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,"
                    "calc type,calc distribution,assessment,pathology,subtlety,image file path,"
                    "cropped image file path,ROI mask file path")


def _cbis_case(root: Path, prefix: str, patient: str, side: str, view: str, n_abn: int, k: int) -> tuple[str, list[str]]:
    """NBIA-style folders (named differently from the CSV paths) for one image and its ROIs."""
    top = f"{prefix}_{patient}_{side}_{view}"
    write_dicom(root / "CBIS-DDSM" / top / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515" /
                "1-1.dcm", img(1000 + k, (16, 12), "uint16", 4000), SeriesDescription="full mammogram images")
    crops = []
    for a in range(1, n_abn + 1):
        folder = root / "CBIS-DDSM" / f"{top}_{a}" / "08-29-2017-DDSM-96009"
        write_dicom(folder / "1.000000-ROI mask images-07312" / "1-1.dcm", np.zeros((16, 12), np.uint16),
                    SeriesDescription="ROI mask images")
        write_dicom(folder / "2.000000-cropped images-62431" / "1-1.dcm", img(1100 + k + a, (5, 4), "uint16", 4000),
                    SeriesDescription="cropped images")
        crops.append(f"{top}_{a}/1.3.6.1.4.1.9590.100.1.2.{k}{a}/1.3.6.1.4.1.9590.100.1.2.{k}{a}9/000000.dcm")
    return f"{top}/1.3.6.1.4.1.9590.100.1.2.{k}/1.3.6.1.4.1.9590.100.1.2.{k}0/000000.dcm", crops


def write_cbis(root: Path) -> Path:
    """The four description CSVs and an NBIA-style CBIS-DDSM tree (paths in the CSVs do not exist as such)."""
    def mass_rows(prefix: str, cases: list[tuple[str, str, str, list[str]]], k0: int) -> list[str]:
        rows = []
        for k, (patient, side, view, pathologies) in enumerate(cases):
            image, crops = _cbis_case(root, prefix, patient, side, view, len(pathologies), k0 + k)
            for a, (path_, crop) in enumerate(zip(pathologies, crops), start=1):
                rows.append(f'{patient},3,{side},{view},{a},mass,OVAL,CIRCUMSCRIBED,4,{path_},4,"{image}\n",'
                            f'"{crop}\n","{crop.replace("000000.dcm", "000001.dcm")}\n"')
        return rows

    train = mass_rows("Mass-Training", [("P_00001", "LEFT", "CC", ["MALIGNANT"]),
                                        ("P_00001", "LEFT", "MLO", ["MALIGNANT"]),
                                        ("P_00004", "RIGHT", "MLO", ["BENIGN", "MALIGNANT"]),
                                        ("P_00009", "RIGHT", "CC", ["BENIGN_WITHOUT_CALLBACK"])], 0)
    test = mass_rows("Mass-Test", [("P_00016", "LEFT", "CC", ["BENIGN"]),
                                   ("P_00017", "LEFT", "MLO", ["MALIGNANT"])], 10)
    write_csv(root / "mass_case_description_train_set.csv", CBIS_MASS_HEADER, train)
    write_csv(root / "mass_case_description_test_set.csv", CBIS_MASS_HEADER, test)
    calc_img, calc_crops = _cbis_case(root, "Calc-Training", "P_00005", "RIGHT", "CC", 1, 20)
    write_csv(root / "calc_case_description_train_set.csv", CBIS_CALC_HEADER,
              [f'P_00005,3,RIGHT,CC,1,calcification,AMORPHOUS,CLUSTERED,3,MALIGNANT,3,"{calc_img}\n",'
               f'"{calc_crops[0]}\n","{calc_crops[0]}\n"'])
    calc_img2, calc_crops2 = _cbis_case(root, "Calc-Test", "P_00038", "LEFT", "CC", 1, 21)
    write_csv(root / "calc_case_description_test_set.csv", CBIS_CALC_HEADER,
              [f'P_00038,2,LEFT,CC,1,calcification,PUNCTATE,SEGMENTAL,2,BENIGN,2,"{calc_img2}\n",'
               f'"{calc_crops2[0]}\n","{calc_crops2[0]}\n"'])
    return root


ISIC_CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def write_isic(root: Path) -> Path:
    """ISIC_2019_Training_GroundTruth.csv (one-hot), ISIC_2019_Training_Metadata.csv, *.jpg images."""
    entries = [("ISIC_0000000", "NV", "HAM_0000118", 55, "female", "anterior torso"),
               ("ISIC_0000001", "NV", "HAM_0000118", 55, "female", "anterior torso"),
               ("ISIC_0000002_downsampled", "MEL", "", 60, "female", "upper extremity"),
               ("ISIC_0000004", "MEL", "MSK4_0011169", 80, "male", "posterior torso"),
               ("ISIC_0024306", "NV", "BCN_0000001", 45, "male", ""),
               ("ISIC_0053453", "BCC", "BCN_0003925", "", "", "head/neck"),
               ("ISIC_0053454", "SCC", "BCN_0001819", 85, "male", "head/neck")]
    gt, meta = [], []
    for k, (name, cls, lesion, age, sex, site) in enumerate(entries):
        gt.append(name + "," + ",".join("1.0" if c == cls else "0.0" for c in ISIC_CLASSES))
        meta.append(f"{name},{age},{site},{lesion},{sex}")
        jpg(root / "ISIC_2019_Training_Input" / f"{name}.jpg", img(1200 + k, (7, 9, 3)))
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", "image," + ",".join(ISIC_CLASSES), gt)
    write_csv(root / "ISIC_2019_Training_Metadata.csv", "image,age_approx,anatom_site_general,lesion_id,sex", meta)
    return root


PADCHEST_HEADER = ("ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
                   "ViewPosition_DICOM,Projection,MethodProjection,Labels,Localizations,LabelsLocalizationsBySentence,"
                   "labelCUIS,LocalizationsCUIS")


def write_padchest(root: Path) -> Path:
    """The PadChest CSV (Labels as Python list literals) and 16-bit PNGs in numbered folders."""
    entries = [  # image id, dir, date, patient, birth, sex, projection, labels
        ("216840111366964012283393834152009027111812180_00-133-140.png", 0, "20090127", "p1", "1933.0", "M", "PA",
         "['pleural effusion', 'cardiomegaly']"),
        ("216840111366964012283393834152009027111812181_00-133-141.png", 0, "20090127", "p1", "1933.0", "M", "L",
         "['pleural effusion', 'cardiomegaly']"),
        ("216840111366964012339356563862009068084200743_00-045-180.png", 1, "20090309", "p2", "1958.0", "F", "PA",
         "['normal']"),
        ("216840111366964012373310883942009152114636712_00-102-045.png", 1, "20090601", "p3", "2001.0", "F", "AP",
         "['pneumonia', ' cardiomegaly']"),
        ("216840111366964012487858717522009290121706066_00-136-167.png", 2, "20091017", "p4", "1990.0", "M",
         "AP_horizontal", "['pleural effusion', 'pneumonia', '']"),
        ("216840111366964012558082906712009327122220177_00-102-064.png", 2, "20091123", "p5", "1950.0", "F", "PA",
         ""),
        ("216840111366964012819207061112010307142602253_04-014-084.png", 3, "20101103", "p6", "1920.0", "M",
         "COSTAL", "['rib fracture']"),
    ]
    rows = []
    for k, (image, d, date, pid, birth, sex, proj, labels) in enumerate(entries):
        labels_cell = f'"{labels}"' if labels else ""
        rows.append(f'{image},{d},{date},study{k},{pid},{birth},{sex},POSTEROANTERIOR,{proj},Manual review of DICOM '
                    f'fields,{labels_cell},"[]","[]","[]","[]"')
        png(root / str(d) / image, img(1300 + k, (11, 9), "uint16", 65535))
    write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", PADCHEST_HEADER, rows)
    return root
