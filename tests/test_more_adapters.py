"""MIMIC-CXR-JPG (labels, official split, sex/age linkage), SIIM-ACR pneumothorax and VinDr-RibCXR on fixture files
written in their release layouts."""
from __future__ import annotations

import numpy as np
import pytest

import fixtures_more as FM
from fixtures_public import CANDID_MASK
from medprobe.data import build_dataset, get_adapter
from medprobe.data.harmonise import CHEST_FINDINGS
from medprobe.errors import ConfigError, DataError

NEW = ("mimic_cxr_jpg", "siim_acr", "vindr_ribcxr", "btcv")


def by_key(ds):
    return {r.key: r for r in ds.records}


def test_new_adapters_are_documented():
    for name in NEW:
        info = get_adapter(name)
        for word in ("Task", "Modality", "Official split", "Licence", "Obtain", "Layout", "Splits:", "Leakage guard"):
            assert word in info.details, (name, word)
        assert "split" in info.options() and "split_seed" in info.options()


def test_mimic_cxr_jpg_labels_split_and_demographics(tmp_path):
    root, patients = FM.write_mimic_cxr_jpg(tmp_path / "mimic-cxr-jpg" / "2.0.0")
    ds = build_dataset("mimic_cxr_jpg", root, patients=str(patients))
    recs = by_key(ds)
    assert set(recs) == {"d1", "d3", "d4", "d5"}  # d2 is lateral; d6's study has no labeler row
    assert "no_label_row=1" in ds.source
    assert ds.task.class_names == ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
    assert recs["d1"].label == (0, 0, 0, 0, 0)
    assert recs["d3"].label == (0, 1, 0, 0, 1)  # Cardiomegaly uncertain -> 1 (U-Ones)
    assert recs["d4"].label == (1, 0, 0, 0, 0)
    assert {k: r.split for k, r in recs.items()} == {"d1": "train", "d3": "train", "d4": "test", "d5": "val"}
    assert recs["d1"].patient_id == recs["d3"].patient_id == "10000032"
    # age at the study = anchor_age + (study year - anchor_year)
    assert (recs["d1"].metadata["sex"], recs["d1"].metadata["age"]) == ("F", 52)
    assert recs["d3"].metadata["age"] == 55 and recs["d3"].metadata["age_bin"] == "40-60"
    assert (recs["d4"].metadata["sex"], recs["d4"].metadata["age"]) == ("M", 86)
    assert recs["d5"].metadata["age"] == 41 and recs["d3"].metadata["view"] == "AP"

    no_link = by_key(build_dataset("mimic_cxr_jpg", root))
    assert no_link["d1"].metadata["sex"] is None and no_link["d1"].metadata["age"] is None
    missing = by_key(build_dataset("mimic_cxr_jpg", root, uncertain="missing"))
    assert missing["d3"].label == (0, -1, 0, 0, 1)
    assert set(by_key(build_dataset("mimic_cxr_jpg", root, uncertain="ignore"))) == {"d1", "d4", "d5"}
    assert "d2" in by_key(build_dataset("mimic_cxr_jpg", root, views="all"))
    h = by_key(build_dataset("mimic_cxr_jpg", root, labels="harmonised"))
    lab = dict(zip(CHEST_FINDINGS, h["d4"].label))
    assert lab["Atelectasis"] == 1 and lab["Pneumothorax"] == 1 and lab["Effusion"] == 0 and lab["Mass"] == -1
    with pytest.raises(DataError, match="patients table not found"):
        build_dataset("mimic_cxr_jpg", root, patients=str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="negbio"):
        build_dataset("mimic_cxr_jpg", root, labeler="negbio")


def test_siim_acr_masks_labels_and_harmonised(tmp_path):
    root = FM.write_siim(tmp_path, "7 3 3 2 13 2")  # train-rle.csv: stage 1, relative RLE
    seg = build_dataset("siim_acr", root, split="systematic", split_fractions="0.5,0.5")
    recs = list(seg.records)
    assert len(recs) == 6 and seg.task.class_names == ("background", "pneumothorax") and "rle=relative" in seg.source
    i1 = next(i for i, r in enumerate(recs) if r.key.endswith(".1001.1517875166.1"))
    i4 = next(i for i, r in enumerate(recs) if r.key.endswith(".1004.1517875166.4"))
    i0 = next(i for i, r in enumerate(recs) if r.key.endswith(".1000.1517875166.0"))
    np.testing.assert_array_equal(seg.load_mask(i1), CANDID_MASK)
    want = CANDID_MASK.copy()
    want[0, 0] = 1  # the image's second mask row
    np.testing.assert_array_equal(seg.load_mask(i4), want)
    assert not seg.load_mask(i0).any()
    cls = build_dataset("siim_acr", root, task="classification")
    assert sorted(r.label for r in cls.records) == [0, 0, 0, 0, 1, 1]
    tags = by_key(build_dataset("siim_acr", root, task="classification", read_dicom_tags=True))
    assert len({r.patient_id for r in tags.values()}) == 3 and {r.metadata["sex"] for r in tags.values()} == {"M", "F"}
    h = build_dataset("siim_acr", root, task="classification", labels="harmonised")
    col = h.labels()[:, CHEST_FINDINGS.index("Pneumothorax")]
    assert sorted(col.tolist()) == [0, 0, 0, 0, 1, 1] and (np.delete(h.labels(), CHEST_FINDINGS.index(
        "Pneumothorax"), axis=1) == -1).all()
    with pytest.raises(ConfigError, match="task=classification"):
        build_dataset("siim_acr", root, labels="harmonised")
    (root / "train-rle.csv").rename(root / "other.csv")
    with pytest.raises(DataError, match="train-rle.csv"):
        build_dataset("siim_acr", root)


def test_vindr_ribcxr_rib_masks(tmp_path):
    root = FM.write_vindr_rib(tmp_path)
    ds = build_dataset("vindr_ribcxr", root)
    assert ds.task.class_names == ("background",) + FM.RIBS
    assert {r.split for r in ds.records} == {"train", "test"} and len(ds) == 6
    recs = list(ds.records)
    for i, r in enumerate(recs):
        want = np.zeros(FM.RIB_SHAPE, dtype=np.int64)
        for c, name in enumerate(FM.RIBS, start=1):
            if name == "R10" and r.key == "train/VinDr_RibCXR_train_000.png":
                continue  # "None": not visible
            x0, y0, x1, y1 = FM.rib_box(name)
            want[y0:y1 + 1, x0:x1 + 1] = c
        np.testing.assert_array_equal(ds.load_mask(i), want)
    merged = build_dataset("vindr_ribcxr", tmp_path / "data", ribs="merged")  # root may be data/ itself
    assert merged.task.class_names == ("background", "rib")
    assert set(np.unique(merged.load_mask(0)).tolist()) == {0, 1}
    with_val = build_dataset("vindr_ribcxr", root, val_fraction=0.5)
    assert "val" in {r.split for r in with_val.records}
    bad = tmp_path / "data" / "train" / "Vindr_RibCXR_train_mask.json"
    bad.write_text(bad.read_text().replace('"None"', '"nothing"'))
    with pytest.raises(DataError, match="rib R10"):
        build_dataset("vindr_ribcxr", root)


def test_btcv_organs_and_transunet_split(tmp_path):
    root = FM.write_btcv(tmp_path / "btcv")
    ds = build_dataset("btcv", root, orientation="file")
    recs = by_key(ds)
    assert set(recs) == {f"img{c:04d}" for c in FM.BTCV_CASES}
    assert {k: r.split for k, r in recs.items()} == {"img0001": "test", "img0002": "test", "img0005": "train",
                                                     "img0006": "train", "img0007": "train"}
    assert ds.ndim == 3 and ds.task.num_classes == 14 and ds.task.class_names[8] == "aorta"
    raw = ds.load_mask(0)
    assert set(np.unique(raw).tolist()) == {0, 4, 5, 8, 13}
    t = build_dataset("btcv", root, orientation="file", organs="transunet")
    assert t.task.class_names == ("background", "aorta", "gallbladder", "left kidney", "right kidney", "liver",
                                  "pancreas", "spleen", "stomach")
    mapped = t.load_mask(0)
    np.testing.assert_array_equal(mapped == 1, raw == 8)  # aorta
    np.testing.assert_array_equal(mapped == 2, raw == 4)  # gallbladder
    assert not mapped[(raw == 5) | (raw == 13)].any()  # esophagus, adrenal gland -> background
    canon = build_dataset("btcv", root / "RawData")  # canonical orientation; root may be RawData itself
    assert canon.load_image(0).ndim == 3 and canon.load_mask(0).shape == canon.load_image(0).shape
    assert "val" in {r.split for r in build_dataset("btcv", root, val_fraction=0.34).records}
    (root / "RawData" / "Training" / "label" / "label0006.nii.gz").unlink()
    with pytest.raises(DataError, match="label0006"):
        build_dataset("btcv", root)
