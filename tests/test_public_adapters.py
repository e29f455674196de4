"""Public-benchmark adapters: tiny real-format fixtures read back, splits, leakage guard, bad input."""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

import fixtures_public as F
from medprobe.data import build_dataset, get_adapter, list_adapters
from medprobe.data.adapters.candid_ptx import decode_rle, parse_rle
from medprobe.data.adapters.medmnist import MEDMNIST_SETS
from medprobe.data.metadata import AGE_BINS, age_bin, demographics, parse_age
from medprobe.errors import ConfigError, DataError

PUBLIC = ("nih_chestxray14", "chexpert", "montgomery", "shenzhen", "sarscov2_ct", "amos", "msd",
          "figshare_brain_tumor", "vindr_cxr", "rsna_pneumonia", "candid_ptx", "aptos2019", "cbis_ddsm", "isic2019",
          "padchest")


def by_key(ds):
    return {r.key: r for r in ds.records}


def patients_per_split(ds):
    out = defaultdict(set)
    for r in ds.records:
        out[r.split].add(r.patient_id)
    return out


def assert_patient_level(ds):
    per = patients_per_split(ds)
    splits = list(per)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not per[a] & per[b], (a, b)


# --------------------------------------------------------------------------- registry and docs
def test_all_public_adapters_registered_with_layout_docs():
    names = {i.name for i in list_adapters()}
    assert set(PUBLIC) <= names
    for name in PUBLIC:
        info = get_adapter(name)
        text = info.details
        for word in ("Task", "Modality", "Official split", "Licence", "Obtain", "Layout", "Splits:", "Leakage guard"):
            assert word in text, (name, word)
        assert info.summary and "split" in info.options() and "split_seed" in info.options()


def test_list_datasets_details_cli(capsys):
    from medprobe.cli import main
    assert main(["list", "datasets", "--details", "figshare_brain_tumor", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "figshare_brain_tumor" and "cjdata" in out["details"] and "v7.3" in out["details"]


def test_medmnist_table_covers_all_2d_and_3d_sets():
    two_d = {"pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
             "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"}
    three_d = {"organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d",
               "synapsemnist3d"}
    assert {k for k, s in MEDMNIST_SETS.items() if s.ndim == 2} == two_d
    assert {k for k, s in MEDMNIST_SETS.items() if s.ndim == 3} == three_d


# --------------------------------------------------------------------------- metadata
def test_age_bins_boundaries_and_parsing():
    assert [age_bin(a) for a in (0, 19.9, 20, 39.99, 40, 60, 79, 80, 95)] == \
        ["<20", "<20", "20-40", "20-40", "40-60", "60-80", "60-80", ">80", ">80"]
    assert age_bin(None) is None and age_bin(414) is None and age_bin(-1) is None and age_bin("n/a") is None
    assert AGE_BINS == ("<20", "20-40", "40-60", "60-80", ">80")
    assert parse_age("058Y") == 58 and parse_age("016M") == pytest.approx(16 / 12)
    assert parse_age("64days") == pytest.approx(64 / 365.25) and parse_age("45yrs") == 45
    assert parse_age("55.0") == 55 and parse_age("") is None and parse_age("old") is None
    assert demographics(sex="Female", age="070Y", view="pa", site=None) == \
        {"sex": "F", "age": 70, "age_bin": "60-80", "view": "PA", "site": None}
    assert demographics(sex="Unknown") == {"sex": None}


# --------------------------------------------------------------------------- NIH ChestX-ray14
def test_nih_official_split_labels_and_metadata(tmp_path):
    ds = build_dataset("nih_chestxray14", F.write_nih(tmp_path))
    assert len(ds) == 9 and ds.task.kind == "multilabel" and ds.task.num_classes == 14
    recs = by_key(ds)
    names = ds.task.class_names
    r = recs["00000001_001.png"]
    assert {names[i] for i, v in enumerate(r.label) if v} == {"Cardiomegaly", "Emphysema"}
    assert recs["00000002_000.png"].label == (0,) * 14  # No Finding
    assert r.patient_id == "1" and r.metadata == {"sex": "M", "age": 58, "age_bin": "40-60", "view": "PA",
                                                  "follow_up": 1}
    assert recs["00000003_000.png"].metadata["age_bin"] == "<20"
    assert recs["00000003_001.png"].metadata["age"] is None  # 414 years: a data-entry error
    assert {r.key for r in ds.records if r.split == "test"} == {"00000005_000.png", "00000005_001.png",
                                                               "00000006_000.png"}
    assert ds.split_policy == {"method": "official", "seed": 0, "val_fraction": 0.1}
    assert "split=official(val_fraction=0.1,seed=0)" in ds.source
    assert ds.value_range == (0.0, 255.0) and ds.load_image(0).shape == (12, 10)
    assert_patient_level(ds)
    big_val = build_dataset("nih_chestxray14", tmp_path, val_fraction=0.5)
    assert "val" in big_val.splits() and {r.split for r in big_val.records if r.patient_id in ("5", "6")} == {"test"}
    assert_patient_level(big_val)


def test_nih_systematic_and_stratified_splits_are_patient_level_and_recorded(tmp_path):
    F.write_nih(tmp_path)
    sys_ = build_dataset("nih_chestxray14", tmp_path, split="systematic", split_fractions="0.5,0.5")
    assert sys_.split_policy == {"method": "systematic", "seed": 0, "fractions": [0.5, 0.5]}
    assert set(sys_.splits()) == {"train", "test"}
    assert_patient_level(sys_)
    a = build_dataset("nih_chestxray14", tmp_path, split="stratified", split_seed=1)
    b = build_dataset("nih_chestxray14", tmp_path, split="stratified", split_seed=1)
    assert [r.split for r in a.records] == [r.split for r in b.records] and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != sys_.fingerprint()
    assert_patient_level(a)
    views = build_dataset("nih_chestxray14", tmp_path, views="AP")
    assert {r.metadata["view"] for r in views.records} == {"AP"} and len(views) == 3


def test_nih_leakage_guard_names_patients_and_splits(tmp_path):
    F.write_nih(tmp_path)
    lists = (tmp_path / "train_val_list.txt").read_text().splitlines()
    (tmp_path / "train_val_list.txt").write_text("\n".join(lists[:-1]) + "\n")  # 00000004_000 moved to test
    (tmp_path / "test_list.txt").write_text((tmp_path / "test_list.txt").read_text() + "00000004_000.png\n")
    assert len(build_dataset("nih_chestxray14", tmp_path)) == 9  # patient 4 wholly in test: fine
    (tmp_path / "test_list.txt").write_text((tmp_path / "test_list.txt").read_text() + "00000001_001.png\n")
    lines = [x for x in (tmp_path / "train_val_list.txt").read_text().splitlines() if x != "00000001_001.png"]
    (tmp_path / "train_val_list.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"patient-level leakage.*'1' in train, test"):
        build_dataset("nih_chestxray14", tmp_path)


def test_nih_bad_input_names_file_and_row(tmp_path):
    F.write_nih(tmp_path)
    csv_path = tmp_path / "Data_Entry_2017.csv"
    good = csv_path.read_text()
    csv_path.write_text(good.rstrip("\n")[:-30])  # truncated in the last row
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv row 10: \d field\(s\) but the header has 11 columns "
                                        r"\(truncated"):
        build_dataset("nih_chestxray14", tmp_path)
    csv_path.write_text(good.replace("Patient Gender,", "Gender,"))
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv: missing column\(s\) 'Patient Gender'"):
        build_dataset("nih_chestxray14", tmp_path)
    csv_path.write_text(good.replace("Cardiomegaly|Emphysema", "Cardiomegaly|Emphysemia"))
    with pytest.raises(DataError, match=r"row 3: Finding Labels .*unknown finding\(s\) 'Emphysemia'"):
        build_dataset("nih_chestxray14", tmp_path)
    csv_path.write_text(good)
    next(tmp_path.rglob("00000004_000.png")).unlink()
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv row 7: image 00000004_000\.png is listed but not "
                                        r"found"):
        build_dataset("nih_chestxray14", tmp_path)
    skipped = build_dataset("nih_chestxray14", tmp_path, missing="skip")
    assert len(skipped) == 8 and "missing=skip dropped 1" in skipped.source
    with pytest.raises(ConfigError, match="option split"):
        build_dataset("nih_chestxray14", tmp_path, split="random")
    with pytest.raises(ConfigError, match="split_fractions"):
        build_dataset("nih_chestxray14", tmp_path, split="systematic", split_fractions=[0.5, 0.6])


def test_many_problems_are_listed_together(tmp_path):
    F.write_nih(tmp_path)
    csv_path = tmp_path / "Data_Entry_2017.csv"
    text = csv_path.read_text().replace("Hernia|Pleural", "Hernya|Pleural").replace(",AP,", ",XX,", 1)
    csv_path.write_text(text)
    next(tmp_path.rglob("00000006_000.png")).unlink()
    with pytest.raises(DataError) as e:
        build_dataset("nih_chestxray14", tmp_path)
    msg = str(e.value)
    assert "3 problems" in msg and "row 5" in msg and "row 6" in msg and "row 10" in msg and "data check" in msg


# --------------------------------------------------------------------------- CheXpert
def test_chexpert_uncertainty_policies_views_and_official_split(tmp_path):
    root = F.write_chexpert(tmp_path)
    ones = build_dataset("chexpert", root)
    assert ones.task.class_names == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    assert len(ones) == 7  # the lateral image is left out
    key = "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"
    assert by_key(ones)[key].label == (0, 1, 0, 1, 0)
    assert by_key(build_dataset("chexpert", root, uncertain="zeros"))[key].label == (0, 0, 0, 1, 0)
    ignore = build_dataset("chexpert", root, uncertain="ignore")
    assert key not in by_key(ignore) and len(ignore) == 5 and "dropped_uncertain=2" in ignore.source
    assert {r.patient_id for r in ones.records if r.split == "test"} == {"patient64541", "patient64542"}
    r = by_key(ones)[key]
    assert r.patient_id == "patient00002" and r.metadata["sex"] == "M" and r.metadata["age_bin"] == ">80"
    assert r.metadata["view"] == "AP" and r.metadata["frontal_lateral"] == "Frontal"
    assert by_key(ones)["CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg"].metadata["sex"] is None
    lateral = build_dataset("chexpert", root, views="lateral", labels="all")
    assert len(lateral) == 1 and lateral.task.num_classes == 14 and lateral.records[0].metadata["view"] == "LATERAL"
    assert ones.load_image(0).shape == (12, 10)
    assert_patient_level(build_dataset("chexpert", root, split="systematic"))


def test_chexpert_bad_label_value_and_unknown_option(tmp_path):
    root = F.write_chexpert(tmp_path)
    (root / "valid.csv").write_text((root / "valid.csv").read_text().replace("AP,,,1.0,", "AP,,,2.0,", 1))
    with pytest.raises(DataError, match=r"valid\.csv row 2: column 'Cardiomegaly' has '2\.0'"):
        build_dataset("chexpert", root)
    with pytest.raises(ConfigError, match="unknown CheXpert observation"):
        build_dataset("chexpert", root, labels=["Cardiomegalie"])


# --------------------------------------------------------------------------- Montgomery / Shenzhen
def test_montgomery_masks_classes_and_metadata(tmp_path):
    root = F.write_montgomery(tmp_path)
    ds = build_dataset("montgomery", root)
    assert ds.task.class_names == ("background", "lungs") and len(ds) == 6
    mask = ds.load_mask(0)
    assert mask.shape == ds.load_image(0).shape == (12, 10) and set(np.unique(mask)) == {0, 1}
    assert mask[2:9, 1:4].all() and mask[2:9, 6:9].all() and mask.sum() == 42
    lr = build_dataset("montgomery", root, masks="left_right")
    m = lr.load_mask(0)
    assert (m[2:9, 6:9] == 1).all() and (m[2:9, 1:4] == 2).all()
    r = by_key(ds)["MCUCXR_0002_0"]
    assert r.patient_id == "MCUCXR_0002" and r.metadata["sex"] == "M" and r.metadata["age"] == 40
    assert r.metadata["age_bin"] == "40-60" and r.metadata["tuberculosis"] == 0
    cls = build_dataset("montgomery", root, task="classification")
    assert cls.task.kind == "binary" and [r.label for r in cls.records] == [1, 0, 1, 0, 1, 0]
    assert ds.split_policy["method"] == "systematic"
    (root / "ManualMask" / "rightMask" / "MCUCXR_0003_1.png").unlink()
    with pytest.raises(DataError, match=r"MCUCXR_0003_1\.png: right-lung mask MCUCXR_0003_1\.png is listed but not"):
        build_dataset("montgomery", root)


def test_shenzhen_readings_masks_and_missing_mask_folder(tmp_path):
    root = F.write_shenzhen(tmp_path)
    ds = build_dataset("shenzhen", root)
    recs = by_key(ds)
    assert recs["CHNCXR_0002_0"].metadata["sex"] == "F" and recs["CHNCXR_0002_0"].metadata["age_bin"] == "<20"
    assert recs["CHNCXR_0004_0"].metadata["sex"] == "F" and recs["CHNCXR_0004_0"].metadata["age"] == 32
    assert recs["CHNCXR_0006_0"].metadata["age"] == 70 and recs["CHNCXR_0001_1"].label == 1
    seg = build_dataset("shenzhen", root, task="segmentation")
    assert len(seg) == 4 and "no_mask=2" in seg.source
    assert set(np.unique(seg.load_mask(0))) == {0, 1}
    other = tmp_path / "elsewhere"
    (root / "mask").rename(other)
    with pytest.raises(DataError, match="no lung mask folder found"):
        build_dataset("shenzhen", root, task="segmentation")
    assert len(build_dataset("shenzhen", root, task="segmentation", mask_dir=str(other))) == 4


# --------------------------------------------------------------------------- SARS-CoV-2 CT
def test_sarscov2_slices_volumes_and_patient_grouping(tmp_path):
    root = F.write_sarscov2(tmp_path)
    ds = build_dataset("sarscov2_ct", root)
    assert ds.task.class_names == ("non-COVID", "COVID") and len(ds) == 18
    assert by_key(ds)["COVID/Patient (2)/3.png"].patient_id == "COVID/Patient (2)"
    assert by_key(ds)["COVID/Patient (2)/3.png"].label == 1
    assert_patient_level(ds)
    vol = build_dataset("sarscov2_ct", root, unit="volume")
    assert vol.ndim == 3 and len(vol) == 6 and vol.load_image(0).shape == (3, 9, 11)
    first = vol.load_image(0)
    from medprobe.data.readers import read_image
    assert np.array_equal(first[2], read_image(root / "non-COVID" / "Patient (1)" / "3.png"))
    F.png(root / "COVID" / "Patient (1)" / "4.png", F.img(1, (5, 5)))
    with pytest.raises(DataError, match=r"4\.png: slice shape \(5, 5\) differs"):
        build_dataset("sarscov2_ct", root, unit="volume").load_image(3)


def test_sarscov2_flat_folders_need_allow_flat(tmp_path):
    root = F.write_sarscov2(tmp_path, flat=True)
    with pytest.raises(DataError, match="patient-level split is impossible.*allow_flat=true"):
        build_dataset("sarscov2_ct", root)
    ds = build_dataset("sarscov2_ct", root, allow_flat=True)
    assert len(ds) == 6 and "allow_flat(6 flat slices" in ds.source
    with pytest.raises(ConfigError, match="unit=volume needs patient sub-folders"):
        build_dataset("sarscov2_ct", root, unit="volume", allow_flat=True)


# --------------------------------------------------------------------------- Decathlon / AMOS
@pytest.mark.parametrize("task,classes", [("Task09_Spleen", ("background", "spleen")),
                                          ("Task04_Hippocampus", ("background", "Anterior", "Posterior")),
                                          ("Task02_Heart", ("background", "left atrium"))])
def test_msd_tasks(tmp_path, task, classes):
    root = F.write_msd(tmp_path, task)
    ds = build_dataset("msd", root)
    assert ds.task.kind == "segmentation" and ds.task.class_names == classes and ds.ndim == 3 and len(ds) == 5
    image, mask = ds.load_image(0), ds.load_mask(0)
    # NIfTI (8, 7, 4) in RAS -> canonical axial layout SPL: D = S (4), H = P (7), W = L (8)
    assert image.shape == mask.shape == (4, 7, 8)
    assert build_dataset("msd", root, orientation="file").load_image(0).shape == (4, 8, 7)  # D = third axis
    assert set(np.unique(mask)) == set(range(len(classes)))
    assert np.allclose(np.linalg.norm(ds.affine(0)[:3, :3], axis=0), [3.0, 1.5, 1.5])  # voxel sizes in D, H, W
    assert ds.records[0].patient_id == ds.records[0].key and "_99" not in " ".join(by_key(ds))
    assert_patient_level(ds)
    with pytest.raises(ConfigError, match="no official split"):
        build_dataset("msd", root, split="official")


def test_msd_multichannel_and_bad_json(tmp_path):
    root = F.write_msd(tmp_path, "Task01_BrainTumour", n=3, channels=4)
    ds = build_dataset("msd", root, channel=2)
    assert ds.load_image(0).shape == (4, 7, 8) and ds.records[0].metadata["modality"] == "t1gd"
    assert np.allclose(ds.load_image(0) - build_dataset("msd", root, channel=0).load_image(0), 20)
    with pytest.raises(ConfigError, match="4 modalities"):
        build_dataset("msd", root, channel=4)
    text = (root / "dataset.json").read_text()
    (root / "dataset.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match=r"dataset\.json: invalid JSON at line \d+"):
        build_dataset("msd", root)
    (root / "dataset.json").write_text(text)
    (root / "imagesTr" / "braintumour_2.nii.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match=r"braintumour_2\.nii\.gz: cannot read.*listed in .*training\[0\]"):
        build_dataset("msd", root).load_image(0)


def test_amos_official_split_modality_and_labels(tmp_path):
    root = F.write_amos(tmp_path)
    ds = build_dataset("amos", root)
    assert ds.task.num_classes == 16 and ds.task.class_names[8] == "arota"
    assert sorted(by_key(ds)) == ["amos_0001", "amos_0004", "amos_0005", "amos_0006", "amos_0008", "amos_0013"]
    assert {r.key for r in ds.records if r.split == "test"} == {"amos_0008", "amos_0013"}
    assert {r.metadata["modality"] for r in ds.records} == {"CT"}
    assert set(np.unique(ds.load_mask(0))) == {0, 1, 15} and ds.load_image(0).shape == (3, 6, 6)
    both = build_dataset("amos", root, modality="all", val_fraction=0.5)
    assert by_key(both)["amos_0507"].metadata["modality"] == "MRI" and "val" in both.splits()
    assert len(build_dataset("amos", root, modality="mri")) == 1
    (root / "labelsVa" / "amos_0013.nii.gz").unlink()
    with pytest.raises(DataError, match=r"validation\[1\]: label map amos_0013\.nii\.gz is listed but not found"):
        build_dataset("amos", root)


# --------------------------------------------------------------------------- Figshare brain tumor
def test_figshare_mat_v73_read_back_exactly(tmp_path):
    root = F.write_figshare(tmp_path)
    ds = build_dataset("figshare_brain_tumor", root)
    assert sorted((int(r.key) for r in ds.records)) == [1, 2, 3, 4, 5, 6]
    recs = by_key(ds)
    assert [recs[str(k)].label for k in range(1, 7)] == [0, 0, 1, 2, 1, 2]
    assert recs["3"].patient_id == "MR029870" and recs["1"].patient_id == "100360"
    i = ds.records.index(recs["4"])
    assert np.array_equal(ds.load_image(i), F.img(404, (12, 10), "int16", 900).astype(np.float32))
    seg = build_dataset("figshare_brain_tumor", root, task="segmentation")
    m = seg.load_mask(i)
    assert m.shape == (12, 10) and m[3:7, 2:5].all() and m.sum() == 12
    assert_patient_level(ds)


def test_figshare_corrupt_and_incomplete_mat_files(tmp_path):
    root = F.write_figshare(tmp_path)
    bad = root / "brainTumorDataPublic_1" / "2.mat"
    bad.write_bytes(bad.read_bytes()[:700])
    import h5py
    with h5py.File(root / "brainTumorDataPublic_767" / "5.mat", "r+") as f:
        del f["cjdata/PID"]
    with pytest.raises(DataError) as e:
        build_dataset("figshare_brain_tumor", root)
    msg = str(e.value)
    assert "2 problems" in msg and "2.mat: not a readable MATLAB v7.3 (HDF5) .mat file" in msg
    assert "5.mat: cjdata has no field 'PID'" in msg


def test_figshare_without_h5py_names_the_extra(tmp_path, monkeypatch):
    root = F.write_figshare(tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    with pytest.raises(ConfigError, match=r'h5py, which is not installed; install it with: pip install "medprobe\[h5\]"'):
        build_dataset("figshare_brain_tumor", root)


# --------------------------------------------------------------------------- VinDr-CXR
def test_vindr_radiologist_aggregation_split_and_dicom_tags(tmp_path):
    root = F.write_vindr(tmp_path)
    ds = build_dataset("vindr_cxr", root)
    names = ds.task.class_names
    assert "No finding" not in names and len(names) == 27
    r = by_key(ds)["000434271f63a053c4128a0ba6352c7f"]
    assert {names[i] for i, v in enumerate(r.label) if v} == {"Cardiomegaly"}  # Pneumonia: 1 of 3
    anyv = by_key(build_dataset("vindr_cxr", root, aggregate="any"))["000434271f63a053c4128a0ba6352c7f"]
    assert {names[i] for i, v in enumerate(anyv.label) if v} == {"Cardiomegaly", "Pneumonia"}
    assert {r.key for r in ds.records if r.split == "test"} == {"002a34c58c5b758217ed1f584ccbcfe9",
                                                              "004f33259ee4aef671c2b95d54e4be68"}
    glob = build_dataset("vindr_cxr", root, labels="global")
    assert glob.task.class_names == ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases")
    assert by_key(glob)["002a34c58c5b758217ed1f584ccbcfe9"].label == (0, 0, 0, 1, 0)
    tags = by_key(build_dataset("vindr_cxr", root, read_dicom_tags=True))
    assert tags["00053190460d56c53cc3e57321387478"].metadata["sex"] == "F"
    assert tags["00053190460d56c53cc3e57321387478"].metadata["age_bin"] == "40-60"
    assert tags["002a34c58c5b758217ed1f584ccbcfe9"].metadata["sex"] is None  # "O"
    assert ds.load_image(0).shape == (10, 10)


def test_vindr_bad_vote_value(tmp_path):
    root = F.write_vindr(tmp_path)
    p = root / "annotations" / "image_labels_train.csv"
    lines = p.read_text().splitlines()
    lines[3] = lines[3].replace(",0,", ",2,", 1)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"image_labels_train\.csv row 4: column '.*' has '2'; expected 0 or 1"):
        build_dataset("vindr_cxr", root)


# --------------------------------------------------------------------------- RSNA pneumonia
def test_rsna_targets_boxes_classes_and_tags(tmp_path):
    root = F.write_rsna(tmp_path)
    ds = build_dataset("rsna_pneumonia", root)
    recs = by_key(ds)
    assert len(ds) == 6 and recs["00436515-870c-4b36-a041-de91049b9ab4"].label == 1
    assert recs["00436515-870c-4b36-a041-de91049b9ab4"].metadata == {"boxes": 2}
    multi = by_key(build_dataset("rsna_pneumonia", root, task="multiclass", read_dicom_tags=True))
    assert multi["00322d4d-1c29-4943-afc9-b6754be640eb"].label == 0
    assert multi["0004cfab-14fd-4e49-80ba-63a80b6bddd6"].label == 1
    assert multi["0004cfab-14fd-4e49-80ba-63a80b6bddd6"].metadata["age"] == 30
    assert multi["00313ee0-9eaa-42f4-b0ab-c148ed3241cd"].metadata["view"] == "AP"
    p = root / "stage_2_train_labels.csv"
    p.write_text(p.read_text().replace("562.0,152.0,256.0,453.0,1", ",,,,0"))
    with pytest.raises(DataError, match=r"stage_2_train_labels\.csv row 6: Target 0 for 00436515.*contradicts"):
        build_dataset("rsna_pneumonia", root)


# --------------------------------------------------------------------------- CANDID-PTX
def test_rle_decoding_of_a_known_mask():
    assert np.array_equal(decode_rle(parse_rle(F.CANDID_RLE_RELATIVE), F.CANDID_SHAPE, "relative"), F.CANDID_MASK)
    assert np.array_equal(decode_rle(parse_rle(F.CANDID_RLE_ABSOLUTE), F.CANDID_SHAPE, "absolute"), F.CANDID_MASK)
    assert parse_rle("-1") == [] and parse_rle("1 2 3") is None and parse_rle("1 0") is None
    with pytest.raises(ValueError, match="beyond the 6 x 5 image"):
        decode_rle([25, 10], F.CANDID_SHAPE)


def test_candid_masks_targets_and_patients(tmp_path):
    root = F.write_candid(tmp_path)
    ds = build_dataset("candid_ptx", root)
    uids = [f"1.2.826.0.1.3680043.8.498.1000{k}" for k in range(6)]
    i = ds.records.index(by_key(ds)[uids[3]])
    assert np.array_equal(ds.load_mask(i), F.CANDID_MASK.astype(np.int64))
    assert ds.load_mask(ds.records.index(by_key(ds)[uids[1]])).sum() == 0
    assert by_key(ds)[uids[3]].patient_id == "P2" and by_key(ds)[uids[2]].patient_id == "P2"
    assert_patient_level(ds)
    cls = by_key(build_dataset("candid_ptx", root, target="chest_tube", task="classification"))
    assert [cls[u].label for u in uids] == [0, 1, 0, 0, 0, 0]
    rib = build_dataset("candid_ptx", root, target="rib_fracture")
    assert rib.load_mask(rib.records.index(by_key(rib)[uids[4]])).sum() == F.CANDID_MASK.sum()
    absolute = F.write_candid(tmp_path / "abs", rle=F.CANDID_RLE_ABSOLUTE)
    ds2 = build_dataset("candid_ptx", absolute, rle="absolute")
    assert np.array_equal(ds2.load_mask(ds2.records.index(by_key(ds2)[uids[0]])), F.CANDID_MASK)


def test_candid_bad_rle(tmp_path):
    root = F.write_candid(tmp_path)
    p = root / "Pneumothorax_reports.csv"
    p.write_text(p.read_text().replace(F.CANDID_RLE_RELATIVE, "7 3 3", 1))
    with pytest.raises(DataError, match=r"Pneumothorax_reports\.csv row 2: EncodedPixels is not an RLE"):
        build_dataset("candid_ptx", root)
    p.write_text(p.read_text().replace("7 3 3", "7 3 3 40", 1))
    ds = build_dataset("candid_ptx", root)
    with pytest.raises(DataError, match=r"row 2: RLE does not fit image .*try rle=absolute"):
        ds.load_mask(0)


# --------------------------------------------------------------------------- APTOS / ISIC / CBIS / PadChest
def test_aptos_grades_and_bad_grade(tmp_path):
    root = F.write_aptos(tmp_path)
    ds = build_dataset("aptos2019", root)
    assert ds.task.kind == "multiclass" and ds.task.num_classes == 5 and [r.label for r in ds.records] == \
        [k % 5 for k in range(10)]
    assert ds.load_image(0).shape == (8, 9, 3) and "kappa" in get_adapter("aptos2019").details
    p = root / "train.csv"
    p.write_text(p.read_text().replace(",4\n", ",5\n", 1))
    with pytest.raises(DataError, match=r"train\.csv row 6: diagnosis '5' outside 0\.\.4"):
        build_dataset("aptos2019", root)


def test_isic_one_hot_lesion_groups_and_metadata(tmp_path):
    root = F.write_isic(tmp_path)
    ds = build_dataset("isic2019", root)
    recs = by_key(ds)
    assert ds.task.class_names == ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
    assert recs["ISIC_0000002_downsampled"].label == 0 and recs["ISIC_0053454"].label == 7
    assert recs["ISIC_0000000"].patient_id == recs["ISIC_0000001"].patient_id == "HAM_0000118"
    assert recs["ISIC_0000002_downsampled"].patient_id == "ISIC_0000002_downsampled"
    assert recs["ISIC_0000004"].metadata == {"sex": "M", "age": 80, "age_bin": ">80", "anatom_site": "posterior torso",
                                             "lesion_id": "MSK4_0011169"}
    assert recs["ISIC_0053453"].metadata["age"] is None
    assert_patient_level(ds)
    p = root / "ISIC_2019_Training_GroundTruth.csv"
    lines = p.read_text().splitlines()
    lines[2] = lines[2][:-3] + "1.0"  # UNK = 1 as well
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"row 3: 2 classes set \(UNK=1\)"):
        build_dataset("isic2019", root)


def test_cbis_images_rois_and_official_split(tmp_path):
    root = F.write_cbis(tmp_path)
    ds = build_dataset("cbis_ddsm", root)
    recs = by_key(ds)
    assert len(ds) == 6 and recs["Mass-Training_P_00004_RIGHT_MLO"].label == 1  # benign + malignant
    assert recs["Mass-Training_P_00009_RIGHT_CC"].label == 0  # BENIGN_WITHOUT_CALLBACK
    assert {r.patient_id for r in ds.records if r.split == "test"} == {"P_00016", "P_00017"}
    assert recs["Mass-Training_P_00001_LEFT_MLO"].metadata["view"] == "MLO" and ds.load_image(0).shape == (16, 12)
    roi = build_dataset("cbis_ddsm", root, unit="roi", abnormality="both")
    assert len(roi) == 9 and all(roi.load_image(i).shape == (5, 4) for i in range(len(roi)))
    assert by_key(roi)["Calc-Training_P_00005_RIGHT_CC_1#1"].metadata["breast_density"] == 3
    assert_patient_level(roi)
    p = root / "mass_case_description_train_set.csv"
    p.write_text(p.read_text().replace("BENIGN_WITHOUT_CALLBACK", "BENIGN_WITHOUT_CALLBAC"))
    with pytest.raises(DataError, match=r"mass_case_description_train_set\.csv row 6: pathology"):
        build_dataset("cbis_ddsm", root)


def test_padchest_labels_views_age_and_bad_literal(tmp_path):
    root = F.write_padchest(tmp_path)
    ds = build_dataset("padchest", root, min_count=1)
    assert ds.task.class_names == ("cardiomegaly", "pleural effusion", "pneumonia")
    recs = by_key(ds)
    assert len(ds) == 4 and "no_labels=1" in ds.source  # PA/AP/AP_horizontal; the empty Labels row is counted
    r = recs["216840111366964012373310883942009152114636712_00-102-045.png"]
    assert r.label == (1, 0, 1) and r.metadata["age"] == 8 and r.metadata["age_bin"] == "<20"
    assert r.patient_id == "p3" and r.metadata["view"] == "AP" and r.metadata["sex"] == "F"
    assert ds.load_image(0).shape == (11, 9) and ds.value_range is None
    every = build_dataset("padchest", root, views="all", labels=["pneumonia", "normal"])
    assert len(every) == 5 and every.task.class_names == ("pneumonia", "normal")
    assert_patient_level(every)
    p = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    p.write_text(p.read_text().replace("['normal']", "['normal'"))
    with pytest.raises(DataError, match=r"row 4: Labels \"\['normal'\" is not a list"):
        build_dataset("padchest", root, min_count=1)


def test_padchest_unbalanced_quote_at_end_is_reported(tmp_path):
    root = F.write_padchest(tmp_path)
    p = root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    p.write_text(p.read_text()[:-25])  # cut inside the last row's quoted fields
    with pytest.raises(DataError, match=r"csv line 8 \(after row 7\): malformed CSV \(unexpected end of data\)"):
        build_dataset("padchest", root, min_count=1)


def test_every_adapter_fails_clearly_on_an_empty_folder(tmp_path):
    for name in PUBLIC:
        with pytest.raises(DataError) as e:
            build_dataset(name, tmp_path)
        assert str(tmp_path) in str(e.value), name
    with pytest.raises(ConfigError, match="needs a root"):
        build_dataset("nih_chestxray14")
    assert not Path(tmp_path / "x").exists()
