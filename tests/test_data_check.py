"""`medprobe data check`: counts, missing/unreadable files, bad rows, labels, leakage; exit codes."""
import json
import re

import numpy as np
import pytest

import fixtures_public as F
import medprobe.data.adapters as adapters
from medprobe.cli import main
from medprobe.data import register_adapter
from medprobe.data.base import ArrayDataset, Record, TaskSpec
from medprobe.data.check import check_dataset
from medprobe.errors import DataError


def run(capsys, *argv):
    code = main(["data", "check", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_dataset_exits_0_with_counts(tmp_path, capsys):
    F.write_nih(tmp_path)
    code, out, _ = run(capsys, "nih_chestxray14", "--root", str(tmp_path), "-o", "val_fraction=0.5")
    assert code == 0, out
    assert "OK: no problems found" in out and "files read: 9" in out
    assert "split policy: method=official, seed=0, val_fraction=0.5" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert lines["images"][-1] == "9" and lines["patients"][-1] == "6"
    assert lines["Hernia"][-1] == "2" and lines["Cardiomegaly"][-1] == "2"


def test_all_problems_are_listed_with_file_and_row(tmp_path, capsys):
    F.write_nih(tmp_path)
    csv_path = tmp_path / "Data_Entry_2017.csv"
    csv_path.write_text(csv_path.read_text().replace("Mass|Nodule", "Mass|Nodul").rstrip("\n")[:-20])
    next(tmp_path.rglob("00000002_000.png")).unlink()
    next(tmp_path.rglob("00000005_001.png")).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, _ = run(capsys, "nih_chestxray14", "--root", str(tmp_path))
    assert code == 1
    problems = [line for line in out.splitlines() if re.match(r"\s+\d+\. ", line)]
    assert len(problems) == 4, out
    assert any("row 4: image 00000002_000.png is listed but not found" in p for p in problems)
    assert any("row 7: Finding Labels 'Mass|Nodul'" in p for p in problems)
    assert any("row 10:" in p and "truncated" in p for p in problems)
    assert any("00000005_001.png" in p and "listed in" in p and "row 9" in p for p in problems)
    assert "FAILED: 4 problem(s)" in out and "images" in out  # counts of the usable rows are still shown


def test_leakage_and_unreadable_files_in_a_manifest(tmp_path, capsys):
    for i in range(4):
        F.png(tmp_path / f"im{i}.png", F.img(i, (6, 6)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "m.csv").write_text("image,split,label,patient_id\nim0.png,train,0,p1\nim1.png,test,1,p1\n"
                                    "im2.png,train,1,p2\nim3.png,val,0,p3\nbad.png,test,0,p4\n")
    code, out, _ = run(capsys, "manifest", "--root", str(tmp_path / "m.csv"))
    assert code == 1
    assert "patient-level leakage" in out and "'p1' in train, test" in out
    assert "bad.png: not a readable image" in out and "FAILED: 2 problem(s)" in out


def test_segmentation_masks_are_read_and_checked(tmp_path, capsys):
    root = F.write_montgomery(tmp_path)
    for side in ("leftMask", "rightMask"):
        F.png(root / "ManualMask" / side / "MCUCXR_0004_0.png", np.zeros((5, 5), np.uint8))
    code, out, _ = run(capsys, "montgomery", "--root", str(root), "-o", "masks=left_right")
    assert code == 1 and "files read: 12" in out
    assert "MCUCXR_0004_0.png: mask shape (5, 5) differs from" in out
    assert "per class (cases containing it):" in out


def test_corrupt_mat_and_dicom_files_are_named(tmp_path, capsys):
    fig = F.write_figshare(tmp_path / "fig")
    (fig / "brainTumorDataPublic_767" / "6.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 200)
    code, out, _ = run(capsys, "figshare_brain_tumor", "--root", str(fig))
    assert code == 1 and "6.mat: not a readable MATLAB v7.3 (HDF5) .mat file" in out and "files read: 5" in out
    vindr = F.write_vindr(tmp_path / "vindr")
    target = vindr / "train" / "0005e8e3701dfb1dd93d53e2ff537b6e.dicom"
    target.write_bytes(target.read_bytes()[:-60])  # pixel data cut short
    code, out, _ = run(capsys, "vindr_cxr", "--root", str(vindr))
    assert code == 1 and "0005e8e3701dfb1dd93d53e2ff537b6e.dicom" in out and "image_labels_train.csv row" in out


def test_json_report_and_no_read(tmp_path, capsys):
    F.write_aptos(tmp_path)
    next(tmp_path.rglob("*.png")).write_bytes(b"garbage")
    code, out, _ = run(capsys, "aptos2019", "--root", str(tmp_path), "--json", "--no-read")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["files_read"] == 0
    totals = {c: sum(s["classes"].get(c, 0) for s in report["splits"].values()) for c in report["class_names"]}
    assert totals == {"No DR": 2, "Mild": 2, "Moderate": 2, "Severe": 2, "Proliferative DR": 2}
    assert sum(s["images"] for s in report["splits"].values()) == 10 and report["patients"] == 10
    code, out, _ = run(capsys, "aptos2019", "--root", str(tmp_path), "--json")
    assert code == 1 and len(json.loads(out)["problems"]) == 1


def test_command_mistakes_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "nih_chestxray", "--root", str(tmp_path))
    assert code == 2 and "Did you mean 'nih_chestxray14'" in err
    F.write_aptos(tmp_path)
    code, _, err = run(capsys, "aptos2019", "--root", str(tmp_path), "-o", "split=random")
    assert code == 2 and "option split" in err
    code, out, _ = run(capsys, "aptos2019", "--root", str(tmp_path / "absent"))
    assert code == 1 and "absent: not found" in out


def test_out_of_range_labels_are_reported():
    @register_adapter("bad_labels_test_adapter", "labels out of range", "test adapter " * 20)
    def build(root):
        recs = [Record("a", "train", "p1", 0), Record("b", "test", "p2", 5), Record("c", "test", "p3", None)]
        return ArrayDataset(np.zeros((3, 4, 4)), recs, TaskSpec("binary", ("no", "yes")))
    try:
        report = check_dataset("bad_labels_test_adapter", None)
    finally:
        adapters._REGISTRY.pop("bad_labels_test_adapter")
    assert not report.ok and len(report.problems) == 2
    assert "label 5 of b is out of range; expected an integer class 0..1" in report.problems[0]
    assert "label None of c" in report.problems[1] and report.files_read == 3


@pytest.mark.parametrize("writer,name,options", [(F.write_chexpert, "chexpert", {}),
                                                 (F.write_sarscov2, "sarscov2_ct", {"unit": "volume"}),
                                                 (F.write_amos, "amos", {}),
                                                 (F.write_rsna, "rsna_pneumonia", {"task": "multiclass"}),
                                                 (F.write_candid, "candid_ptx", {}),
                                                 (F.write_cbis, "cbis_ddsm", {"unit": "roi"}),
                                                 (F.write_isic, "isic2019", {}),
                                                 (F.write_padchest, "padchest", {"min_count": 1}),
                                                 (F.write_shenzhen, "shenzhen", {"task": "segmentation"})])
def test_fixtures_pass_the_check(tmp_path, writer, name, options):
    root = writer(tmp_path)
    report = check_dataset(name, root, options)
    assert report.ok, report.problems
    assert report.files_read >= sum(s["images"] for s in report.splits.values()) > 0


def _manifest(tmp_path, rows, header="image,split,label", name="m.csv"):
    path = tmp_path / name
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_missing_and_corrupt_files_are_listed_together_with_their_rows(tmp_path, capsys):
    for i in range(3):
        F.png(tmp_path / f"im{i}.png", F.img(i, (6, 6)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = _manifest(tmp_path, ["im0.png,train,0", "im1.png,train,1", "gone.png,test,0", "im2.png,test,1",
                                "bad.png,test,0"])
    code, out, _ = run(capsys, "manifest", "--root", str(path))
    assert code == 1
    problems = [line for line in out.splitlines() if re.match(r"\s+\d+\. ", line)]
    assert len(problems) == 2, out
    assert "m.csv: row 4: image gone.png is listed but not found" in problems[0]
    assert "bad.png: not a readable image" in problems[1] and "[listed in" in problems[1] and "m.csv row 6]" in problems[1]
    assert "files read: 3" in out and re.search(r"images +2 +2 +4", out)  # the other rows were all read


def test_nan_label_is_refused_naming_the_row(tmp_path, capsys):
    for i in range(4):
        F.png(tmp_path / f"im{i}.png", F.img(i, (6, 6)))
    path = _manifest(tmp_path, ["im0.png,train,0", "im1.png,train,1", "im2.png,test,nan", "im3.png,test,1"])
    with pytest.raises(DataError, match=r"m\.csv: row 4: label 'nan' in column 'label' is a missing value"):
        adapters.build_dataset("manifest", path)
    code, out, _ = run(capsys, "manifest", "--root", str(path))
    assert code == 1 and "row 4: label 'nan'" in out and "3 classes" not in out and "2 classes: 0, 1" in out
    names = _manifest(tmp_path, ["im0.png,train,benign", "im1.png,train,NaN", "im2.png,test,malignant",
                                 "im3.png,test,benign"], name="n.csv")
    with pytest.raises(DataError, match=r"n\.csv: row 3: label 'NaN'"):
        adapters.build_dataset("manifest", names)


def test_degenerate_splits_are_flagged(tmp_path, capsys):
    from medprobe.data.check import split_warnings
    for i in range(6):
        F.png(tmp_path / f"im{i}.png", F.img(i, (6, 6)))
    path = _manifest(tmp_path, ["im0.png,train,a", "im1.png,train,a", "im2.png,val,a", "im3.png,val,b",
                                "im4.png,test,a", "im5.png,test,b"])
    ds = adapters.build_dataset("manifest", path, class_names=["a", "b", "c"])
    warnings = split_warnings(ds)
    assert warnings[0] == "class 'c' has no image in any split (train: 2, val: 2, test: 2 images)"
    assert warnings[1].startswith("split 'train' (2 images) has no image of class 'b': a probe trained on it")
    assert len(warnings) == 2
    code, out, _ = run(capsys, "manifest", "--root", str(path), "-o", "class_names=[a, b, c]")
    assert code == 0 and "warnings (2):" in out and "- class 'c' has no image in any split" in out
    assert "OK: no problems found (2 warning(s) above)" in out
    ok = adapters.build_dataset("manifest", path, class_names=["a", "b"])
    assert [w for w in split_warnings(ok) if "train" not in w] == []
    # multi-label: a class without a positive in a split, or positive everywhere
    recs = [Record(f"k{i}", s, f"p{i}", lab) for i, (s, lab) in
            enumerate([("train", (1, 0)), ("train", (1, 1)), ("test", (1, 0)), ("test", (1, 0))])]
    ml = ArrayDataset(np.zeros((4, 4, 4)), recs, TaskSpec("multilabel", ("x", "y")))
    assert split_warnings(ml) == ["split 'train' (2 images): every image is positive for 'x': a probe cannot learn it",
                                  "split 'test' (2 images) has no positive image for class 'y': metrics on it cannot "
                                  "measure it",
                                  "split 'test' (2 images): every image is positive for 'x': metrics cannot measure it"]
