"""Classification metrics against scikit-learn, the vectorised bootstrap, segmentation metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from medprobe.errors import ConfigError, MedprobeError
from medprobe.metrics import classification_metrics, mean_sd, metric_value, segmentation_metrics


def value(rows, metric, cls=None):
    (row,) = [r for r in rows if r.metric == metric and r.cls == cls]
    return row


def tied_scores(rng, shape, decimals=1):
    """Scores rounded to create many ties."""
    return np.round(rng.random(shape), decimals)


# --------------------------------------------------------------------------- against scikit-learn
@pytest.mark.parametrize("seed,n", [(0, 50), (1, 333), (2, 1000)])
def test_binary_matches_sklearn(seed, n):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(tied_scores(rng, n) + 0.3 * y, 0, 1)
    rows = classification_metrics(y, s, "binary", ["normal", "disease"])
    pred = (s >= 0.5).astype(int)
    expected = {"auroc": skm.roc_auc_score(y, s), "auprc": skm.average_precision_score(y, s),
                "accuracy": skm.accuracy_score(y, pred), "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
                "kappa": skm.cohen_kappa_score(y, pred, weights="quadratic"), "recall": skm.recall_score(y, pred),
                "specificity": skm.recall_score(y, pred, pos_label=0)}
    for metric, want in expected.items():
        assert value(rows, metric).value == pytest.approx(want, abs=1e-12), metric
    # binary: one per-class row (the positive class) equal to the aggregate
    assert value(rows, "auroc", "disease").value == value(rows, "auroc").value
    assert value(rows, "auprc", "disease").value == value(rows, "auprc").value
    assert not [r for r in rows if r.cls == "normal"]
    two_columns = classification_metrics(y, np.stack([1 - s, s], 1), "binary", ["normal", "disease"])
    assert [r.value for r in two_columns] == [r.value for r in rows]


@pytest.mark.parametrize("seed,n,c", [(0, 60, 3), (1, 400, 5), (2, 1500, 4)])
def test_multiclass_matches_sklearn(seed, n, c):
    rng = np.random.default_rng(seed)
    y = np.r_[np.arange(c), rng.integers(0, c, n - c)]  # every class present
    s = np.round(rng.dirichlet(np.ones(c), n), 1) + np.eye(c)[y] * 0.2
    s = s / s.sum(1, keepdims=True)
    names = [f"c{i}" for i in range(c)]
    rows = classification_metrics(y, s, "multiclass", names)
    onehot = label_binarize(y, classes=range(c))
    pred = s.argmax(1)
    assert value(rows, "auroc").value == pytest.approx(skm.roc_auc_score(onehot, s, average="macro"), abs=1e-12)
    assert value(rows, "auroc").value == pytest.approx(skm.roc_auc_score(y, s, multi_class="ovr"), abs=1e-9)
    assert value(rows, "auprc").value == pytest.approx(skm.average_precision_score(onehot, s, average="macro"),
                                                       abs=1e-12)
    for i, name in enumerate(names):
        assert value(rows, "auroc", name).value == pytest.approx(skm.roc_auc_score(onehot[:, i], s[:, i]), abs=1e-12)
        assert value(rows, "auprc", name).value == pytest.approx(
            skm.average_precision_score(onehot[:, i], s[:, i]), abs=1e-12)
    specificity = np.mean([skm.recall_score(y != i, pred != i) for i in range(c)])
    expected = {"accuracy": skm.accuracy_score(y, pred), "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
                "kappa": skm.cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(c))),
                "recall": skm.recall_score(y, pred, average="macro"), "specificity": specificity}
    for metric, want in expected.items():
        assert value(rows, metric).value == pytest.approx(want, abs=1e-12), metric


@pytest.mark.parametrize("seed,n,c", [(0, 80, 3), (1, 700, 6)])
def test_multilabel_matches_sklearn(seed, n, c):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(int)
    y[:2] = [[1] * c, [0] * c]  # every class has positives and negatives
    s = np.clip(tied_scores(rng, (n, c)) + 0.25 * y, 0, 1)
    names = [f"finding{i}" for i in range(c)]
    rows = classification_metrics(y, s, "multilabel", names)
    pred = (s >= 0.5).astype(int)
    assert value(rows, "auroc").value == pytest.approx(skm.roc_auc_score(y, s, average="macro"), abs=1e-12)
    assert value(rows, "auprc").value == pytest.approx(skm.average_precision_score(y, s, average="macro"), abs=1e-12)
    for i, name in enumerate(names):
        assert value(rows, "auroc", name).value == pytest.approx(skm.roc_auc_score(y[:, i], s[:, i]), abs=1e-12)
    expected = {
        "accuracy": np.mean([skm.accuracy_score(y[:, i], pred[:, i]) for i in range(c)]),
        "balanced_accuracy": np.mean([skm.balanced_accuracy_score(y[:, i], pred[:, i]) for i in range(c)]),
        "recall": skm.recall_score(y, pred, average="macro"),
        "specificity": np.mean([skm.recall_score(y[:, i], pred[:, i], pos_label=0) for i in range(c)]),
    }
    for metric, want in expected.items():
        assert value(rows, metric).value == pytest.approx(want, abs=1e-12), metric
    assert not [r for r in rows if r.metric == "kappa"]


def test_metric_value_equals_full_computation():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 200)
    s = rng.dirichlet(np.ones(4), 200)
    rows = classification_metrics(y, s, "multiclass", list("abcd"))
    for metric in ("auroc", "auprc", "accuracy", "kappa"):
        assert metric_value(y, s, "multiclass", metric) == value(rows, metric).value


# --------------------------------------------------------------------------- degenerate inputs
def test_absent_class_is_nan_with_note_and_excluded_from_macro():
    rng = np.random.default_rng(4)
    y = rng.choice([0, 1, 3], 300)  # class 2 ("effusion") absent
    s = rng.dirichlet(np.ones(4), 300)
    names = ["normal", "nodule", "effusion", "mass"]
    rows = classification_metrics(y, s, "multiclass", names, bootstrap=50)
    for metric in ("auroc", "auprc"):
        absent = value(rows, metric, "effusion")
        assert math.isnan(absent.value) and "'effusion' absent from y_true" in absent.note
        present = [value(rows, metric, n).value for n in ("normal", "nodule", "mass")]
        macro = value(rows, metric)
        assert macro.value == pytest.approx(np.mean(present))
        assert "'effusion'" in macro.note and "3 of 4" in macro.note
        assert macro.ci_low <= macro.value <= macro.ci_high
    assert "'effusion'" in value(rows, "recall").note
    assert not math.isnan(value(rows, "kappa").value)


def test_single_class_binary_never_crashes():
    rng = np.random.default_rng(5)
    s = rng.random(40)
    rows = classification_metrics(np.zeros(40, int), s, "binary", ["normal", "pneumonia"], bootstrap=100)
    auroc = value(rows, "auroc")
    assert math.isnan(auroc.value) and "'pneumonia' absent from y_true" in auroc.note
    assert math.isnan(auroc.ci_low) and math.isnan(auroc.ci_high)
    assert math.isnan(value(rows, "recall").value)
    assert value(rows, "specificity").value == pytest.approx(np.mean(s < 0.5))
    assert value(rows, "accuracy").value == pytest.approx(np.mean(s < 0.5))
    all_positive = classification_metrics(np.ones(40, int), s, "binary", ["normal", "pneumonia"])
    assert "'normal' absent from y_true" in value(all_positive, "auroc").note
    assert value(all_positive, "auprc").value == pytest.approx(1.0)  # precision is 1 at every threshold
    assert math.isnan(value(all_positive, "specificity").value)


def test_all_classes_undefined_multilabel():
    y = np.zeros((30, 3), int)
    rows = classification_metrics(y, np.random.default_rng(6).random((30, 3)), "multilabel", ["a", "b", "c"])
    macro = value(rows, "auroc")
    assert math.isnan(macro.value) and macro.note.startswith("undefined for every class")
    assert all(math.isnan(value(rows, "auroc", c).value) for c in "abc")
    assert not math.isnan(value(rows, "specificity").value)


def test_multilabel_class_without_negatives_has_note():
    rng = np.random.default_rng(7)
    y = (rng.random((50, 2)) < 0.5).astype(int)
    y[:, 1] = 1
    rows = classification_metrics(y, rng.random((50, 2)), "multilabel", ["a", "b"])
    assert math.isnan(value(rows, "auroc", "b").value) and "no negatives" in value(rows, "auroc", "b").note
    assert value(rows, "auroc").value == value(rows, "auroc", "a").value
    assert value(rows, "auprc", "b").value == pytest.approx(1.0)


# --------------------------------------------------------------------------- bootstrap
def test_ci_contains_point_and_shrinks_with_n():
    widths = []
    for n in (100, 3000):
        rng = np.random.default_rng(8)
        y = rng.integers(0, 2, n)
        s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y - 0.6)))
        rows = classification_metrics(y, s, "binary", ["neg", "pos"], bootstrap=300, seed=1)
        for r in rows:
            assert r.ci_low <= r.value <= r.ci_high, r
        widths.append({r.metric: r.ci_high - r.ci_low for r in rows if r.cls is None})
    for metric in ("auroc", "auprc", "accuracy", "balanced_accuracy", "kappa", "recall", "specificity"):
        assert widths[1][metric] < 0.5 * widths[0][metric], metric


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_vectorised_bootstrap_equals_loop(task):
    rng = np.random.default_rng(9)
    n, c, b, alpha = 70, 3, 25, 0.1
    if task == "binary":
        y, s, names = rng.integers(0, 2, n), tied_scores(rng, n), ["neg", "pos"]
    elif task == "multiclass":
        y, s, names = rng.integers(0, c, n), np.round(rng.dirichlet(np.ones(c), n), 1), list("abc")
    else:
        y, s, names = (rng.random((n, c)) < 0.2).astype(int), tied_scores(rng, (n, c)), list("abc")
    rows = classification_metrics(y, s, task, names, bootstrap=b, seed=11, alpha=alpha)
    idx = np.random.default_rng(11).integers(0, n, (b, n))  # the same index matrix the bootstrap draws
    loop = [classification_metrics(y[i], s[i], task, names) for i in idx]
    for j, r in enumerate(rows):
        samples = np.array([resample[j].value for resample in loop])
        assert all(resample[j].metric == r.metric and resample[j].cls == r.cls for resample in loop)
        lo, hi = np.nanpercentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        assert r.ci_low == pytest.approx(lo, abs=1e-12) and r.ci_high == pytest.approx(hi, abs=1e-12), r


def test_bootstrap_is_deterministic_per_seed():
    rng = np.random.default_rng(10)
    y, s = rng.integers(0, 2, 200), rng.random(200)
    a = classification_metrics(y, s, "binary", ["n", "p"], bootstrap=100, seed=3)
    b = classification_metrics(y, s, "binary", ["n", "p"], bootstrap=100, seed=3)
    c = classification_metrics(y, s, "binary", ["n", "p"], bootstrap=100, seed=4)
    assert a == b
    assert [r.ci_low for r in a] != [r.ci_low for r in c]
    assert all(r.ci_low is None and r.ci_high is None for r in classification_metrics(y, s, "binary", ["n", "p"]))


# --------------------------------------------------------------------------- errors and helpers
def test_user_errors_name_the_bad_value():
    y, s = np.array([0, 1, 1]), np.array([0.2, 0.7, 0.9])
    with pytest.raises(ConfigError, match="'multi'.*binary, multiclass, multilabel"):
        classification_metrics(y, s, "multi", ["a", "b"])
    with pytest.raises(ConfigError, match="3 samples but scores has 2"):
        classification_metrics(y, s[:2], "binary", ["a", "b"])
    with pytest.raises(ConfigError, match="class index 3"):
        classification_metrics(np.array([0, 3]), np.full((2, 3), 1 / 3), "multiclass", list("abc"))
    with pytest.raises(ConfigError, match="0/1"):
        classification_metrics(np.array([0, 2, 1]), s, "binary", ["a", "b"])
    with pytest.raises(MedprobeError, match="1 non-finite"):
        classification_metrics(y, np.array([0.2, np.nan, 0.9]), "binary", ["a", "b"])
    with pytest.raises(ConfigError, match="kappa"):
        metric_value(np.eye(3, dtype=int), np.eye(3), "multilabel", "kappa")
    assert math.isnan(metric_value(y, np.array([0.2, np.inf, 0.9]), "binary", "auroc"))  # selection: NaN, no error


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_sd([0.7]) == (0.7, 0.0)
    assert mean_sd([1.0, float("nan"), 3.0]) == pytest.approx((2.0, math.sqrt(2)))
    m, sd = mean_sd([float("nan")])
    assert math.isnan(m) and math.isnan(sd)


# --------------------------------------------------------------------------- segmentation
def test_segmentation_hand_computed():
    target = np.array([[0, 1, 1, 0],
                       [0, 1, 1, 0],
                       [0, 0, 0, 0]])
    pred = np.array([[0, 1, 0, 0],
                     [0, 1, 1, 1],
                     [0, 0, 0, 3]])
    rows = segmentation_metrics(pred, target, 4, ["bg", "liver", "spleen", "kidney"])
    # liver: tp 3, fp 1, fn 1 → dice 6/8, jaccard 3/5; spleen: both empty → 1; kidney: empty truth → 0
    assert value(rows, "dice", "liver").value == pytest.approx(0.75)
    assert value(rows, "jaccard", "liver").value == pytest.approx(0.6)
    spleen = value(rows, "dice", "spleen")
    assert spleen.value == 1.0 and spleen.note == "empty truth and prediction"
    kidney = value(rows, "jaccard", "kidney")
    assert kidney.value == 0.0 and "empty truth" in kidney.note
    assert value(rows, "dice").value == pytest.approx((0.75 + 1 + 0) / 3)
    assert value(rows, "jaccard").value == pytest.approx((0.6 + 1 + 0) / 3)
    assert value(rows, "dice_jaccard_mean").value == pytest.approx(((0.75 + 1) / 3 + 1.6 / 3) / 2)
    assert not [r for r in rows if r.cls == "bg"]
    with_bg = segmentation_metrics(pred, target, 4, ["bg", "liver", "spleen", "kidney"], include_background=True)
    assert value(with_bg, "dice", "bg").value == pytest.approx(2 * 6 / (8 + 7))  # bg: 8 true, 7 predicted, 6 shared


def test_segmentation_matches_sklearn_on_3d_volume():
    rng = np.random.default_rng(12)
    target = rng.integers(0, 3, (6, 7, 8))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 3, target.shape))
    rows = segmentation_metrics(pred, target, 3, ["bg", "a", "b"])
    f1 = skm.f1_score(target.ravel(), pred.ravel(), labels=[1, 2], average=None)
    jac = skm.jaccard_score(target.ravel(), pred.ravel(), labels=[1, 2], average=None)
    assert [value(rows, "dice", c).value for c in "ab"] == pytest.approx(f1)
    assert [value(rows, "jaccard", c).value for c in "ab"] == pytest.approx(jac)
    assert value(rows, "dice_jaccard_mean").value == pytest.approx((f1.mean() + jac.mean()) / 2)


def test_hd95():
    target, pred = np.zeros((8, 8), int), np.zeros((8, 8), int)
    target[0, 0], pred[3, 4] = 1, 1
    rows = segmentation_metrics(pred, target, 3, ["bg", "lesion", "other"], hd95=True)
    assert value(rows, "hd95", "lesion").value == pytest.approx(5.0)
    other = value(rows, "hd95", "other")
    assert math.isnan(other.value) and other.note == "empty truth and prediction"
    assert value(rows, "hd95").value == pytest.approx(5.0) and "'other'" in value(rows, "hd95").note
    spaced = segmentation_metrics(pred, target, 3, ["bg", "lesion", "other"], hd95=True, spacing=(2.0, 1.0))
    assert value(spaced, "hd95", "lesion").value == pytest.approx(math.sqrt(6 ** 2 + 4 ** 2))
    identical = segmentation_metrics(target, target, 2, ["bg", "lesion"], hd95=True)
    assert value(identical, "hd95", "lesion").value == 0.0


def test_segmentation_errors():
    a = np.zeros((4, 4), int)
    with pytest.raises(ConfigError, match="shapes differ"):
        segmentation_metrics(a, np.zeros((4, 5), int), 2, ["bg", "x"])
    with pytest.raises(ConfigError, match=r"values in 0\.\.1"):
        segmentation_metrics(a + 2, a, 2, ["bg", "x"])
    with pytest.raises(ConfigError, match=r"values in 0\.\.1"):
        segmentation_metrics(a + 0.5, a, 2, ["bg", "x"])
    float_mask = segmentation_metrics(a, np.eye(4), 2, ["bg", "x"])  # whole-number float masks (NIfTI) are fine
    assert value(float_mask, "dice", "x").value == 0.0
    with pytest.raises(ConfigError, match="2 class names"):
        segmentation_metrics(a, a, 3, ["bg", "x"])
