"""Missing multi-label targets (-1) everywhere a multi-label target is used, and the harmonised chest vocabulary."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neighbors import NearestNeighbors

import fixtures_public as FP
from medprobe.data import build_dataset
from medprobe.data.base import ArrayDataset, Record, TaskSpec
from medprobe.data.check import degenerate_splits, split_warnings, unlabelled_classes
from medprobe.data.harmonise import CHEST_FINDINGS, any_of, harmonise, resolve
from medprobe.errors import ConfigError
from medprobe.metrics import classification_metrics, metric_value
from medprobe.protocols.adapt.training import loss_fn, masked_bce
from medprobe.protocols.fewshot import sample_fewshot
from medprobe.protocols.linear import _loss, init_head, inverse_frequency_weights, linear_sweep
from medprobe.protocols.mlknn import mlknn_predict

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_missing(seed: int, n: int = 80, c: int = 4, rate: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.4).astype(np.int64)
    s = np.clip(y * 0.3 + rng.random((n, c)) * 0.7, 0, 1)
    y[rng.random((n, c)) < rate] = -1
    y[:4, 0] = [0, 1, 0, 1]  # every class keeps both values
    return y, s


def _rows(rows, metric):
    return {r.cls: r for r in rows if r.metric == metric}


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_score_each_class_on_its_labelled_samples(seed):
    y, s = _with_missing(seed)
    names = list("abcd")
    rows = classification_metrics(y, s, "multilabel", names)
    auroc, auprc = _rows(rows, "auroc"), _rows(rows, "auprc")
    recall, spec = [], []
    for j, c in enumerate(names):
        keep = y[:, j] >= 0
        yt, st = y[keep, j], s[keep, j]
        assert auroc[c].value == pytest.approx(roc_auc_score(yt, st))
        assert auprc[c].value == pytest.approx(average_precision_score(yt, st))
        pred = st >= 0.5
        recall.append((pred & (yt == 1)).sum() / (yt == 1).sum())
        spec.append((~pred & (yt == 0)).sum() / (yt == 0).sum())
    assert auroc[None].value == pytest.approx(np.mean([auroc[c].value for c in names]))
    assert _rows(rows, "recall")[None].value == pytest.approx(np.mean(recall))
    assert _rows(rows, "specificity")[None].value == pytest.approx(np.mean(spec))
    assert metric_value(y, s, "multilabel", "auroc") == pytest.approx(auroc[None].value)


def test_missing_is_not_negative():
    """Turning the missing targets into negatives changes the result (so masking is what is tested above)."""
    y, s = _with_missing(3)
    as_negative = np.where(y < 0, 0, y)
    masked, negative = metric_value(y, s, "multilabel", "auroc"), metric_value(as_negative, s, "multilabel", "auroc")
    assert masked != pytest.approx(negative)


def test_class_labelled_nowhere_is_undefined_with_note_and_left_out_of_macro():
    y, s = _with_missing(4, c=3)
    y[:, 2] = -1
    rows = classification_metrics(y, s, "multilabel", ["a", "b", "c"], bootstrap=20)
    auroc = _rows(rows, "auroc")
    assert np.isnan(auroc["c"].value) and "not labelled" in auroc["c"].note
    assert auroc[None].value == pytest.approx((auroc["a"].value + auroc["b"].value) / 2)
    assert "macro over 2 of 3" in auroc[None].note and "not labelled, missing targets): 'c'" in auroc[None].note
    assert auroc[None].ci_low is not None and np.isfinite(auroc[None].ci_low)
    acc = _rows(rows, "accuracy")[None]
    keep = y[:, :2] >= 0
    per = [((s[keep[:, j], j] >= 0.5) == y[keep[:, j], j]).mean() for j in range(2)]
    assert acc.value == pytest.approx(np.mean(per))


def test_missing_values_are_refused_outside_multilabel():
    with pytest.raises(ConfigError, match="0/1"):
        classification_metrics(np.array([0, 1, -1]), np.array([0.2, 0.8, 0.5]), "binary", ["n", "p"])
    with pytest.raises(ConfigError, match="-1 = missing"):
        classification_metrics(np.array([[0, 2]]), np.array([[0.2, 0.8]]), "multilabel", ["a", "b"])


# --------------------------------------------------------------------------- linear probe and adaptation loss
def test_linear_loss_is_bce_over_known_targets():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, 4)
    y = torch.from_numpy(_with_missing(5, n=10, c=4)[0]).float()
    known = y >= 0
    want = torch.stack([F.binary_cross_entropy_with_logits(logits[h][known], y[known]) for h in range(3)])
    assert torch.allclose(_loss(logits, y, "multilabel", None), want)
    pw = torch.tensor([1.0, 2.0, 0.5, 3.0])
    ref = torch.stack([(F.binary_cross_entropy_with_logits(logits[h], y.clamp_min(0), pos_weight=pw,
                                                           reduction="none")[known]).mean() for h in range(3)])
    assert torch.allclose(_loss(logits, y, "multilabel", pw), ref)
    assert torch.allclose(masked_bce(logits[0], y), want[0])
    assert torch.allclose(loss_fn("multilabel")(logits[0], y), want[0])


def test_inverse_frequency_weights_ignore_missing():
    y = torch.tensor([[1, -1], [0, -1], [0, 1], [-1, 0]], dtype=torch.float32)
    w = inverse_frequency_weights(y, "multilabel", 2)
    assert w.tolist() == [2.0, 1.0]  # class 0: 2 negatives / 1 positive; class 1: 1 / 1


def test_linear_sweep_never_learns_from_missing_targets():
    """A class missing for every sample gets no gradient: its head column stays at its initial value."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = np.stack([(x[:, 0] > 0), (x[:, 1] > 0), np.zeros(60, bool)], 1).astype(np.float32)
    y[:, 2] = -1
    y[::3, 1] = -1
    res = linear_sweep({"cls": torch.from_numpy(x)}, y, None, None, {"cls": torch.from_numpy(x)}, "multilabel", 3,
                       lrs=[0.01, 0.1], epochs=5, batch_size=16, seed=3)
    w0, b0 = init_head(3, "cls", 2, 8, 3)
    w, b = res.weights["cls"]
    assert torch.equal(w[:, :, 2], w0[:, :, 2]) and torch.equal(b[:, 2], b0[:, 2])
    assert not torch.equal(w[:, :, 1], w0[:, :, 1])
    keep = y[:, 1] >= 0
    assert roc_auc_score(y[keep, 1], res.test_scores[keep, 1]) > 0.9
    with pytest.raises(ConfigError, match="-1 \\(missing\\), 0, 1"):
        linear_sweep({"cls": torch.from_numpy(x)}, y - 1, None, None, {"cls": torch.from_numpy(x)}, "multilabel", 3,
                     lrs=[0.01], epochs=1)


# --------------------------------------------------------------------------- ML-kNN
def _mlknn_reference(xtr, ytr, xte, k, s=1.0):
    """Loop-based ML-kNN with missing targets, with scikit-learn's cosine neighbours."""
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(xtr)
    tr_idx = nn.kneighbors(xtr, return_distance=False)
    tr_idx = np.array([[j for j in row if j != i][:k] for i, row in enumerate(tr_idx)])
    te_idx = nn.kneighbors(xte, n_neighbors=k, return_distance=False)
    out = np.zeros((len(xte), ytr.shape[1]))
    for l in range(ytr.shape[1]):
        lab = ytr[:, l] >= 0
        pos, neg = (ytr[:, l] == 1), (ytr[:, l] == 0)
        prior = (s + pos.sum()) / (2 * s + lab.sum())
        cnt = np.array([(ytr[row, l] == 1).sum() for row in tr_idx])
        c1 = np.array([(pos & (cnt == j)).sum() for j in range(k + 1)])
        c0 = np.array([(neg & (cnt == j)).sum() for j in range(k + 1)])
        for q, row in enumerate(te_idx):
            j = (ytr[row, l] == 1).sum()
            a = prior * (s + c1[j]) / (s * (k + 1) + c1.sum())
            b = (1 - prior) * (s + c0[j]) / (s * (k + 1) + c0.sum())
            out[q, l] = a / (a + b)
    return out


def test_mlknn_with_missing_targets_matches_reference():
    rng = np.random.default_rng(1)
    xtr, xte = rng.normal(size=(50, 6)), rng.normal(size=(12, 6))
    ytr = (rng.random((50, 3)) < 0.4).astype(np.int64)
    ytr[rng.random((50, 3)) < 0.3] = -1
    ytr[:, 2] = -1  # a class labelled nowhere: prior 1/2, flat likelihoods -> posterior 1/2
    got = mlknn_predict(xtr.astype(np.float32), ytr, xte.astype(np.float32), ks=[5])[5]
    np.testing.assert_allclose(got, _mlknn_reference(xtr, ytr, xte, 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, 2], 0.5)


# --------------------------------------------------------------------------- few-shot and data checks
def test_fewshot_draws_only_known_positives():
    y = np.array([[1, -1], [0, 1], [-1, -1], [0, 0], [1, 0]])
    for seed in range(5):
        chosen = sample_fewshot(y, ["a", "b", "c", "d", "e"], 1, seed, "multilabel")
        assert 1 in chosen  # the only known positive of class 1
        assert 3 in chosen and 2 not in chosen  # the no-positive draw: d (known negatives), never c (all missing)


def test_checks_skip_classes_no_record_labels():
    recs = [Record(f"r{i}", s, f"p{i}", (i % 2, -1), {}) for i, s in enumerate(["train"] * 4 + ["test"] * 2)]
    ds = ArrayDataset(np.zeros((6, 4, 4)), recs, TaskSpec("multilabel", ("a", "b")))
    assert unlabelled_classes(ds) == ["b"]
    assert split_warnings(ds) == []
    assert degenerate_splits("multilabel", ("a", "b"), {"train": {"a": 2}, "test": {"a": 1}}, {"train": 4, "test": 2})
    assert ds.labels().tolist()[0] == [0.0, -1.0]


# --------------------------------------------------------------------------- the vocabulary
def test_vocabulary_and_mapping_rules():
    assert len(CHEST_FINDINGS) == 18 and CHEST_FINDINGS[0] == "Atelectasis" and CHEST_FINDINGS[-1] == \
        "Enlarged Cardiomediastinum"
    assert [any_of(v) for v in ([0, 1], [0, 0], [0, -1], [1, -1], [])] == [1, 0, -1, 1, -1]
    v = harmonise({"x": 1, "y": 0}, {"Effusion": ("x",), "Fracture": ("y",)})
    assert v[CHEST_FINDINGS.index("Effusion")] == 1 and v[CHEST_FINDINGS.index("Fracture")] == 0
    assert sum(x == -1 for x in v) == 16
    assert resolve({"Fracture": ("Rib fracture", "Clavicle fracture")}, ["rib fracture"], case_insensitive=True) == {}


def _h(ds, finding):
    return ds.labels()[:, CHEST_FINDINGS.index(finding)]


def test_nih_harmonised(tmp_path):
    root = FP.write_nih(tmp_path)
    native, h = build_dataset("nih_chestxray14", root), build_dataset("nih_chestxray14", root, labels="harmonised")
    assert h.task.class_names == CHEST_FINDINGS and h.fingerprint() != native.fingerprint()
    for j, c in enumerate(native.task.class_names):
        np.testing.assert_array_equal(_h(h, c), native.labels()[:, j])
    for c in ("Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"):
        assert (_h(h, c) == -1).all()
    assert "labels=harmonised" in h.source
    with pytest.raises(ConfigError, match="native, harmonised"):
        build_dataset("nih_chestxray14", root, labels="torchxrayvision")


def test_chexpert_harmonised_and_uncertain_missing(tmp_path):
    root = FP.write_chexpert(tmp_path)
    h = {r.key: r for r in build_dataset("chexpert", root, labels="harmonised", uncertain="missing").records}
    r = next(v for k, v in h.items() if "patient00002" in k)
    lab = dict(zip(CHEST_FINDINGS, r.label))
    assert lab["Cardiomegaly"] == -1 and lab["Edema"] == 1 and lab["Atelectasis"] == 0 and lab["Effusion"] == 0
    assert lab["Nodule"] == -1 and lab["Infiltration"] == -1
    r3 = [v for k, v in h.items() if "patient00003" in k]
    assert len(r3) == 2
    assert any(dict(zip(CHEST_FINDINGS, v.label))["Effusion"] == 1 for v in r3)
    native = build_dataset("chexpert", root, uncertain="missing")  # native classes may carry -1 too
    assert (native.labels() == -1).any()


def test_vindr_padchest_rsna_candid_harmonised(tmp_path):
    v = build_dataset("vindr_cxr", FP.write_vindr(tmp_path / "v"), labels="harmonised")
    by = {r.key: dict(zip(CHEST_FINDINGS, r.label)) for r in v.records}
    assert by["000434271f63a053c4128a0ba6352c7f"]["Cardiomegaly"] == 1
    assert by["0006e0a85696f6bb578e84fafa9a5607"]["Effusion"] == 1
    assert by["0005e8e3701dfb1dd93d53e2ff537b6e"]["Nodule"] == -1  # Nodule/Mass cannot be split
    assert by["00053190460d56c53cc3e57321387478"]["Fracture"] == 0  # rib and clavicle fracture both 0

    p = build_dataset("padchest", FP.write_padchest(tmp_path / "p"), labels="harmonised", split="systematic",
                      split_fractions="0.5,0.5", views="all")
    byp = {r.key[-14:]: dict(zip(CHEST_FINDINGS, r.label)) for r in p.records}
    assert byp["00-133-140.png"]["Effusion"] == 1 and byp["00-133-140.png"]["Cardiomegaly"] == 1
    assert byp["00-045-180.png"]["Effusion"] == 0 and byp["00-045-180.png"]["Lung Opacity"] == -1

    r = build_dataset("rsna_pneumonia", FP.write_rsna(tmp_path / "r"), labels="harmonised")
    native = build_dataset("rsna_pneumonia", tmp_path / "r")
    np.testing.assert_array_equal(_h(r, "Pneumonia"), native.labels())
    np.testing.assert_array_equal(_h(r, "Lung Opacity"), native.labels())
    with pytest.raises(ConfigError, match="task=binary"):
        build_dataset("rsna_pneumonia", tmp_path / "r", labels="harmonised", task="multiclass")

    root = FP.write_candid(tmp_path / "c")
    c = build_dataset("candid_ptx", root, labels="harmonised", task="classification")
    assert _h(c, "Pneumothorax").tolist() == build_dataset("candid_ptx", root, task="classification").labels().tolist()
    assert (_h(c, "Fracture") == -1).all()
    with pytest.raises(ConfigError, match="task=classification"):
        build_dataset("candid_ptx", root, labels="harmonised")


def test_tuberculosis_sets_refuse_harmonised(tmp_path):
    with pytest.raises(ConfigError, match="tuberculosis"):
        build_dataset("montgomery", FP.write_montgomery(tmp_path / "m"), labels="harmonised", task="classification")
    with pytest.raises(ConfigError, match="tuberculosis"):
        build_dataset("shenzhen", FP.write_shenzhen(tmp_path / "s"), labels="harmonised")
    assert len(build_dataset("shenzhen", tmp_path / "s", labels="native"))


def test_split_stratum_does_not_count_missing_as_positive():
    from medprobe.data.splits import _patient_stratum
    assert _patient_stratum([(0, -1), (-1, 0)]) == 0
    assert _patient_stratum([(0, -1), (1, 0)]) == 1


def test_manifest_multilabel_columns_accept_missing(tmp_path):
    rows = ["image,split,patient_id,a,b"]
    for k, (split, a, b) in enumerate([("train", 1, -1), ("train", 0, 1), ("test", 1, 0), ("test", 0, -1)]):
        FP.png(tmp_path / f"i{k}.png", FP.img(k))
        rows.append(f"i{k}.png,{split},p{k},{a},{b}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = build_dataset("manifest", tmp_path / "m.csv", labels=["a", "b"])
    assert ds.task.kind == "multilabel" and ds.labels().tolist() == [[1, -1], [0, 1], [1, 0], [0, -1]]
    (tmp_path / "m.csv").write_text("\n".join(rows[:-1] + ["i3.png,test,p3,0,2"]) + "\n")
    with pytest.raises(Exception, match="or -1 = missing"):
        build_dataset("manifest", tmp_path / "m.csv", labels=["a", "b"])


def test_calibration_views_use_labelled_samples_only():
    from medprobe.predictions import classification_predictions
    from medprobe.results.analyses import _positives, calibration_curves
    from medprobe.results import stats
    y, s = _with_missing(7, n=40, c=2)
    pred = classification_predictions("multilabel", ["a", "b"], {"test": ([f"k{i}" for i in range(40)],
                                                                          [f"p{i}" for i in range(40)], y, s)})
    for c, (name, mean_pred, observed, count) in enumerate(calibration_curves(pred, bins=5)):
        keep = y[:, c] >= 0
        assert count.sum() == keep.sum()
        ref = stats.reliability_bins(y[keep, c], s[keep, c], 5)
        np.testing.assert_allclose(observed, ref[1])
    assert _positives(np.array([[-1, 0], [0, 1], [-1, -1]]), "multilabel") == 1
