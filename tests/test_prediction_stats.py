"""Statistics on stored predictions against independent references (loops, scikit-learn, scipy, textbooks)."""
import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from medprobe.results import stats


def _binary(n=120, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    a = y * 0.8 + rng.normal(0, 0.7, n)
    b = y * 0.5 + 0.5 * a + rng.normal(0, 0.7, n)  # correlated with a, as two models on one test set
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return y, a, b


def _slow_delong(y, scores):
    """Structural components written out with explicit loops (DeLong et al. 1988)."""
    pos = [i for i in range(len(y)) if y[i] == 1]
    neg = [j for j in range(len(y)) if y[j] == 0]
    m, n = len(pos), len(neg)

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    v10, v01, aucs = [], [], []
    for s in scores:
        v10.append([sum(psi(s[i], s[j]) for j in neg) / n for i in pos])
        v01.append([sum(psi(s[i], s[j]) for i in pos) / m for j in neg])
        aucs.append(sum(v10[-1]) / m)
    k = len(scores)
    cov = np.zeros((k, k))
    for r in range(k):
        for c in range(k):
            s10 = sum((v10[r][i] - aucs[r]) * (v10[c][i] - aucs[c]) for i in range(m)) / (m - 1)
            s01 = sum((v01[r][j] - aucs[r]) * (v01[c][j] - aucs[c]) for j in range(n)) / (n - 1)
            cov[r, c] = s10 / m + s01 / n
    return np.array(aucs), cov


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_slow_structural_components(ties):
    y, a, b = _binary(70, seed=3, ties=ties)
    c = a + b
    auc, cov = stats.delong(y, np.vstack([a, b, c]))
    ref_auc, ref_cov = _slow_delong(y, [a, b, c])
    np.testing.assert_allclose(auc, ref_auc, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12)
    np.testing.assert_allclose(auc, [roc_auc_score(y, s) for s in (a, b, c)], atol=1e-12)
    # the paired test: z from the reference covariance, p from the normal distribution
    res = stats.delong_test(y, [a], [b])
    se = math.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    z = (ref_auc[0] - ref_auc[1]) / se
    assert res.z == pytest.approx(z, rel=1e-10)
    assert res.p == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-10)


def test_delong_seed_mean_contrast():
    y, a, b = _binary(60, seed=5)
    a2, b2 = a + np.random.default_rng(1).normal(0, 0.3, len(y)), b * 0.9
    res = stats.delong_test(y, [a, a2], [b, b2])
    auc, cov = _slow_delong(y, [a, a2, b, b2])
    c = np.array([0.5, 0.5, -0.5, -0.5])
    assert res.diff == pytest.approx(c @ auc, abs=1e-12)
    assert res.se == pytest.approx(math.sqrt(c @ cov @ c), rel=1e-10)
    assert res.auc_a == pytest.approx(auc[:2].mean()) and res.auc_b == pytest.approx(auc[2:].mean())


def test_delong_degenerate():
    y = np.ones(10, dtype=int)
    res = stats.delong_test(y, [np.arange(10.0)], [np.arange(10.0)[::-1]])
    assert math.isnan(res.p) and math.isnan(res.auc_a)
    y, a, _ = _binary(40)
    same = stats.delong_test(y, [a], [a])  # identical models: no difference, p = 1
    assert same.diff == 0 and same.p == 1.0


def test_paired_bootstrap_reuses_one_patient_resample_for_both_models():
    y, a, b = _binary(90, seed=2)
    pids = [f"p{i // 3}" for i in range(len(y))]  # 3 images per patient
    rs = stats.resampler(pids, 200, seed=7)
    assert rs.by_patient and rs.indices.shape == (200, 30)
    res = stats.paired_bootstrap(y, [a], [b], "binary", "auroc", rs)
    # independent recomputation of a few resamples: expand drawn patients to their images, score with sklearn
    members = {p: [i for i, q in enumerate(pids) if q == p] for p in sorted(set(pids))}
    patients = sorted(members)
    for bi in (0, 1, 57, 199):
        idx = [i for pi in rs.indices[bi] for i in members[patients[pi]]]
        if len(set(y[idx])) < 2:
            assert math.isnan(res.diffs[bi])
            continue
        want = roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx])
        assert res.diffs[bi] == pytest.approx(want, abs=1e-12)
    assert res.diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    lo, hi = np.percentile(res.diffs[~np.isnan(res.diffs)], [2.5, 97.5])
    assert (res.ci_low, res.ci_high) == pytest.approx((lo, hi))
    # reproducible: the same seed gives the same numbers, another seed other resamples
    again = stats.paired_bootstrap(y, [a], [b], "binary", "auroc", stats.resampler(pids, 200, seed=7))
    np.testing.assert_array_equal(again.diffs, res.diffs)
    other = stats.paired_bootstrap(y, [a], [b], "binary", "auroc", stats.resampler(pids, 200, seed=8))
    assert not np.array_equal(other.diffs, res.diffs)


def test_unique_patients_resample_samples():
    rs = stats.resampler([str(i) for i in range(25)], 10, seed=0)
    assert not rs.by_patient and rs.indices.shape == (10, 25)
    (w,) = list(rs.weight_blocks())
    np.testing.assert_array_equal(w.sum(1), 25)


def test_bootstrap_p_value_definition():
    d = np.array([-0.1, 0.2, 0.3, 0.4, np.nan, 0.1, 0.2, 0.05, 0.3, 0.2])
    # 9 valid; 1 at or below 0 -> 2 * (1 + 1) / 10
    assert stats.bootstrap_p(d) == pytest.approx(0.4)
    assert stats.bootstrap_p(np.zeros(5)) == 1.0


def _textbook_holm(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adj = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj


def test_holm_against_textbook_and_statsmodels():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = list(rng.random(rng.integers(1, 12)) ** 3)
        np.testing.assert_allclose(stats.holm(p), _textbook_holm(p), atol=1e-15)
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
    with_nan = stats.holm([0.01, float("nan"), 0.04])
    assert math.isnan(with_nan[1]) and list(with_nan[[0, 2]]) == pytest.approx([0.02, 0.04])
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        return
    p = list(rng.random(9))
    np.testing.assert_allclose(stats.holm(p), multipletests(p, method="holm")[1], atol=1e-12)


def test_ece_and_brier_against_sklearn():
    rng = np.random.default_rng(4)
    prob = rng.random(500) ** 1.5
    y = (rng.random(500) < prob ** 0.7).astype(int)
    for bins in (5, 10, 15):
        true, pred = calibration_curve(y, prob, n_bins=bins, strategy="uniform")
        edges = np.linspace(0, 1, bins + 1)
        counts = np.histogram(prob, edges)[0]
        counts = counts[counts > 0]
        assert stats.ece(y, prob, bins) == pytest.approx((counts * np.abs(true - pred)).sum() / len(y), abs=1e-12)
        p_pred, p_true, n = stats.reliability_bins(y, prob, bins)
        np.testing.assert_allclose(p_true[n > 0], true)
        np.testing.assert_allclose(p_pred[n > 0], pred)
    assert stats.brier(y, prob) == pytest.approx(brier_score_loss(y, prob), abs=1e-12)
    # multiclass: sum over classes of squared errors (scikit-learn's multiclass Brier, not halved)
    p3 = rng.dirichlet([1, 1, 1], 200)
    y3 = np.array([rng.choice(3, p=row) for row in p3])
    onehot = np.eye(3)[y3]
    assert stats.brier(onehot, p3) == pytest.approx(brier_score_loss(y3, p3, labels=[0, 1, 2], scale_by_half=False))


def test_youden_and_target_sensitivity_against_roc_curve():
    y, a, _ = _binary(150, seed=9, ties=True)
    fpr, tpr, thr = roc_curve(y, a, drop_intermediate=False)
    assert stats.choose_threshold(y, a, "youden") == thr[int(np.argmax(tpr - fpr))]
    for target in (0.5, 0.8, 0.95, 1.0):
        want = thr[int(np.flatnonzero(tpr >= target)[0])]
        assert stats.choose_threshold(y, a, "sensitivity", target) == want
    assert math.isnan(stats.choose_threshold(np.zeros(5), np.arange(5.0)))


def test_operating_point_wilson():
    y, a, _ = _binary(100, seed=1)
    op = stats.operating_point(y, a, 0.3)
    pred = a >= 0.3
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    assert op.sensitivity == tp / (tp + fn) and op.tp == tp and op.fn == fn
    n, ph, z = tp + fn, tp / (tp + fn), sps.norm.ppf(0.975)  # Wilson's formula written out
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    assert op.sensitivity_ci == pytest.approx((centre - half, centre + half), abs=1e-9)


def test_subgroups_and_gap():
    y, a, _ = _binary(200, seed=11)
    groups = np.array(["F", "M", ""] * 66 + ["F", "M"])
    groups = np.where(groups == "", "(missing)", groups)
    rs = stats.resampler([str(i) for i in range(200)], 300, seed=0)
    res = stats.subgroup_metrics(y, [a], "binary", "auroc", groups, rs, exclude_from_gap=["(missing)"])
    by = {g.group: g for g in res.groups}
    for g in ("F", "M", "(missing)"):
        m = groups == g
        assert by[g].value == pytest.approx(roc_auc_score(y[m], a[m]), abs=1e-12) and by[g].n == m.sum()
        assert by[g].ci_low < by[g].value < by[g].ci_high
    vals = {g: by[g].value for g in ("F", "M")}
    assert res.gap == pytest.approx(max(vals.values()) - min(vals.values()))
    assert res.worst == min(vals, key=vals.get) and res.best == max(vals, key=vals.get)
    assert 0 <= res.gap_ci[0] < res.gap_ci[1]  # max - min is biased up, so the point need not lie inside
