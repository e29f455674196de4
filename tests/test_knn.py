"""Chunked cosine top-k search, weighted kNN voting and ML-kNN against slow reference implementations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medprobe.errors import ConfigError
from medprobe.protocols.knn import cosine_topk, knn_predict
from medprobe.protocols.mlknn import mlknn_predict


pytestmark = pytest.mark.usefixtures("one_thread")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float64) @ b.T.astype(np.float64)


def reference_knn(xtr, ytr, xte, c, k, temperature):
    """Full similarity matrix, sort, exp-weighted votes of the k nearest."""
    sim = cosine(xte, xtr)
    out = np.zeros((len(xte), c))
    for i in range(len(xte)):
        nearest = np.argsort(-sim[i], kind="stable")[:k]
        for j in nearest:
            out[i, ytr[j]] += np.exp(sim[i, j] / temperature)
        out[i] /= out[i].sum()
    return out


def reference_mlknn(xtr, ytr, xte, k, s=1.0):
    """ML-kNN written the way the paper states it, with loops over samples and classes."""
    n, c = ytr.shape
    sim_tr = cosine(xtr, xtr)
    np.fill_diagonal(sim_tr, -np.inf)
    nn_tr = [np.argsort(-sim_tr[i], kind="stable")[:k] for i in range(n)]
    nn_te = [np.argsort(-row, kind="stable")[:k] for row in cosine(xte, xtr)]
    post = np.zeros((len(xte), c))
    for l in range(c):
        prior1 = (s + ytr[:, l].sum()) / (2 * s + n)
        c1, c0 = np.zeros(k + 1), np.zeros(k + 1)
        for i in range(n):
            delta = int(ytr[nn_tr[i], l].sum())
            if ytr[i, l]:
                c1[delta] += 1
            else:
                c0[delta] += 1
        for t in range(len(xte)):
            delta = int(ytr[nn_te[t], l].sum())
            p1 = prior1 * (s + c1[delta]) / (s * (k + 1) + c1.sum())
            p0 = (1 - prior1) * (s + c0[delta]) / (s * (k + 1) + c0.sum())
            post[t, l] = p1 / (p1 + p0)
    return post


def blobs(rng, n, c, d=12, spread=1.0):
    centres = rng.normal(size=(c, d)) * 3
    y = rng.integers(0, c, n)
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


# --------------------------------------------------------------------------- search
def test_chunked_topk_equals_full_sort():
    rng = np.random.default_rng(0)
    xtr, xq = rng.normal(size=(97, 8)).astype(np.float32), rng.normal(size=(23, 8)).astype(np.float32)
    sims, idx = cosine_topk(xtr, xq, 15, query_chunk=5, train_chunk=11)
    full = cosine(xq, xtr)
    want = np.argsort(-full, axis=1, kind="stable")[:, :15]
    np.testing.assert_array_equal(idx.numpy(), want)
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(full, want, 1), atol=1e-6)
    unchunked = cosine_topk(torch.from_numpy(xtr), torch.from_numpy(xq), 15)
    assert torch.equal(unchunked[1], idx)


def test_topk_excludes_own_row():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    _, idx = cosine_topk(x, x, 39, train_chunk=7, query_chunk=9, exclude=torch.arange(40))
    idx = idx.numpy()
    assert not (idx == np.arange(40)[:, None]).any()
    assert all(len(set(row)) == 39 for row in idx)  # every other sample exactly once


# --------------------------------------------------------------------------- kNN
@pytest.mark.parametrize("c", [2, 4])
def test_knn_matches_reference_for_every_k(c):
    rng = np.random.default_rng(2 + c)
    xtr, ytr = blobs(rng, 150, c, spread=2.0)
    xte, _ = blobs(rng, 31, c, spread=2.0)
    out = knn_predict(xtr, ytr, xte, num_classes=c, ks=(1, 5, 20), temperature=0.1, query_chunk=8, train_chunk=64)
    assert list(out) == [1, 5, 20]
    for k, probs in out.items():
        assert probs.shape == (31, c)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probs, reference_knn(xtr, ytr, xte, c, k, 0.1), atol=1e-5)


def test_knn_is_accurate_deterministic_and_chunk_independent():
    rng = np.random.default_rng(5)
    x, y = blobs(rng, 360, 3)
    xtr, ytr, xte, yte = x[:300], y[:300], x[300:], y[300:]
    a = knn_predict(torch.from_numpy(xtr), ytr, torch.from_numpy(xte), 3, ks=(10, 20))
    b = knn_predict(xtr, ytr, xte, 3, ks=(10, 20), query_chunk=7, train_chunk=50)
    c = knn_predict(xtr, ytr, xte, 3, ks=(10, 20))
    for k in (10, 20):
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
        np.testing.assert_array_equal(a[k], c[k])
        assert (a[k].argmax(1) == yte).mean() > 0.95


def test_k_larger_than_train_is_clipped_and_recorded():
    rng = np.random.default_rng(6)
    xtr, ytr = blobs(rng, 12, 2)
    xte, _ = blobs(rng, 5, 2)
    out = knn_predict(xtr, ytr, xte, 2, ks=(5, 200))
    assert list(out) == [5, 200] and out.effective_k == {5: 5, 200: 12}
    np.testing.assert_allclose(out[200], reference_knn(xtr, ytr, xte, 2, 12, 0.07), atol=1e-5)


def test_knn_errors_name_the_value():
    x, y = np.ones((4, 3), np.float32), np.array([0, 1, 0, 1])
    with pytest.raises(ConfigError, match=r"\[0, 5\]"):
        knn_predict(x, y, x, 2, ks=(0, 5))
    with pytest.raises(ConfigError, match="temperature must be > 0, got -0.1"):
        knn_predict(x, y, x, 2, temperature=-0.1)
    with pytest.raises(ConfigError, match="train has 3, queries have 4"):
        knn_predict(x, y, np.ones((2, 4), np.float32), 2)
    with pytest.raises(ConfigError, match=r"0\.\.1"):
        knn_predict(x, np.array([0, 1, 2, 0]), x, 2)


# --------------------------------------------------------------------------- ML-kNN
def multilabel_data(rng, n, c=4, d=10):
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, :c] + 0.5 * rng.normal(size=(n, c)) > 0.3).astype(int)
    return x, y


def test_mlknn_matches_slow_reference():
    rng = np.random.default_rng(7)
    xtr, ytr = multilabel_data(rng, 80)
    xte, _ = multilabel_data(rng, 17)
    out = mlknn_predict(xtr, ytr, xte, ks=(3, 10, 25), query_chunk=16, train_chunk=30)
    assert list(out) == [3, 10, 25]
    for k, post in out.items():
        assert post.shape == (17, 4)
        np.testing.assert_allclose(post, reference_mlknn(xtr, ytr, xte, k), atol=1e-6)
    smoother = mlknn_predict(xtr, ytr, xte, ks=(10,), smoothing=3.0)[10]
    np.testing.assert_allclose(smoother, reference_mlknn(xtr, ytr, xte, 10, s=3.0), atol=1e-6)


def test_mlknn_learns_and_clips_k():
    rng = np.random.default_rng(8)
    xtr, ytr = multilabel_data(rng, 400)
    xte, yte = multilabel_data(rng, 100)
    out = mlknn_predict(xtr, ytr, xte, ks=(20,))
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(yte, out[20], average="macro") > 0.8
    small = mlknn_predict(xtr[:6], ytr[:6], xte[:3], ks=(2, 100))
    assert small.effective_k == {2: 2, 100: 5}
    np.testing.assert_allclose(small[100], reference_mlknn(xtr[:6], ytr[:6], xte[:3], 5), atol=1e-6)


def test_mlknn_errors():
    x = np.ones((5, 3), np.float32)
    with pytest.raises(ConfigError, match="0/1"):
        mlknn_predict(x, np.full((5, 2), 2), x)
    with pytest.raises(ConfigError, match="smoothing must be > 0, got 0"):
        mlknn_predict(x, np.zeros((5, 2)), x, smoothing=0)
    with pytest.raises(ConfigError, match=r"\(N_train, C\)"):
        mlknn_predict(x, np.zeros(5), x)
