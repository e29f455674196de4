"""`medprobe score`: external label maps paired by name, geometry checked, recorded like medprobe's own runs."""
from __future__ import annotations

import sqlite3

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medprobe.cli import main
from medprobe.errors import DataError
from medprobe.metrics import segmentation_metrics
from medprobe.predictions import read_predictions
from medprobe.score import pair_files, score_folders

AFFINE = np.array([[0.8, 0, 0, -20], [0, 0.8, 0, 10], [0, 0, 2.5, 3], [0, 0, 0, 1.0]])


def write_cases(tmp_path, n=4, seed=0):
    rng = np.random.default_rng(seed)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    truths, preds = [], []
    for k in range(n):
        t = np.zeros((20, 18, 8), np.uint8)
        t[4 + k:12 + k, 5:13, 2:6] = 1
        t[8:11, 7:10, 3:5] = 2
        p = t.copy()
        p[ndimage.binary_dilation(t == 1) & (rng.random(t.shape) < 0.5)] = 1
        if k == n - 1:
            p[p == 2] = 1  # the last case misses class 2 entirely
        nib.save(nib.Nifti1Image(t, AFFINE), str(gt / f"case{k}.nii.gz"))
        nib.save(nib.Nifti1Image(p, AFFINE), str(pred / f"case{k}.nii.gz"))
        truths.append(t)
        preds.append(p)
    return pred, gt, truths, preds


def test_score_records_a_run_like_the_protocols(tmp_path, capsys):
    pred, gt, truths, preds = write_cases(tmp_path)
    out = tmp_path / "out"
    res = score_folders(pred, gt, out, labels=["background", "liver", "tumour"], tolerance_mm=1.0, bootstrap=200)
    # per case: exactly segmentation_metrics with the files' voxel spacing
    ref = segmentation_metrics(preds[1], truths[1], 3, ["background", "liver", "tumour"], spacing=(0.8, 0.8, 2.5),
                               surface=("hd95", "assd", "nsd"))
    ours = {(m.metric, m.cls): m.value for m in res.per_case["case1"]}
    assert {(m.metric, m.cls): m.value for m in ref} == pytest.approx(ours)
    dice = next(m for m in res.metrics if m.metric == "dice" and m.cls is None)
    assert dice.ci_low is not None and dice.ci_low <= dice.value <= dice.ci_high and "empty=one" in dice.note
    hd = next(m for m in res.metrics if m.metric == "hd95" and m.cls == "tumour")
    assert "undefined for 1/4 cases" in hd.note  # the case without a tumour prediction
    with sqlite3.connect(out / "results.db") as conn:
        row = conn.execute("SELECT status, protocol, backbone, weights, predictions, predictions_sha256 FROM runs "
                           "WHERE key = ?", (res.key,)).fetchone()
        n_metrics = conn.execute("SELECT count(*) FROM metrics WHERE run_key = ?", (res.key,)).fetchone()[0]
    assert row[:4] == ("done", "score", "pred", "external") and n_metrics > 10
    stored = read_predictions(out / row[4], row[5])
    assert stored.kind == "segmentation" and stored.splits["test"].keys == [f"case{k}" for k in range(4)]
    np.testing.assert_allclose(stored.splits["test"].columns["dice.liver"][1], ours[("dice", "liver")])
    assert (out / "score" / res.key / "per_case.csv").read_text().startswith("case,prediction,ground_truth,dice")
    # the key is derived from the inputs: same files -> same key (reused); another tolerance -> another run
    assert score_folders(pred, gt, out, labels=["background", "liver", "tumour"], bootstrap=200).reused
    other = score_folders(pred, gt, out, labels=["background", "liver", "tumour"], tolerance_mm=2.0, bootstrap=200)
    assert other.key != res.key and not other.reused


def test_score_cli_then_report(tmp_path, capsys):
    pred, gt, _, _ = write_cases(tmp_path, n=3, seed=1)
    out = tmp_path / "o"
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--labels", "bg", "liver",
                 "tumour", "--tolerance-mm", "1", "--bootstrap", "50"]) == 0
    text = capsys.readouterr().out
    assert "scored 3 cases" in text and "nsd" in text and "hd95" in text
    assert main(["report", str(out)]) == 0
    assert "score pred" in (out / "report.md").read_text()


def test_pairing_and_geometry_errors(tmp_path):
    pred, gt, truths, _ = write_cases(tmp_path, n=2)
    (pred / "case1.nii.gz").rename(pred / "other.nii.gz")
    with pytest.raises(DataError, match=r"no prediction in .* for 1 ground-truth case\(s\): case1\.nii\.gz.*"
                                        r"no ground truth .* other\.nii\.gz"):
        pair_files(pred, gt)
    (pred / "other.nii.gz").unlink()
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(truths[1], shifted), str(pred / "case1.nii.gz"))
    with pytest.raises(DataError, match=r"pred/case1\.nii\.gz and .*gt/case1\.nii\.gz: the prediction's grid differs"):
        score_folders(pred, gt, tmp_path / "o", bootstrap=0)
    # the same labels stored with flipped axes and the matching affine are the same grid
    flipped = AFFINE @ np.array([[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(truths[1][::-1]), flipped), str(pred / "case1.nii.gz"))
    res = score_folders(pred, gt, tmp_path / "o", bootstrap=0)
    assert next(m.value for m in res.per_case["case1"] if m.metric == "dice" and m.cls is None) == 1.0
    with pytest.raises(DataError, match="label 2 but --labels names only classes 0..1"):
        score_folders(pred, gt, tmp_path / "o2", labels=["bg", "liver"], bootstrap=0)
