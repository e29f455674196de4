"""ML-kNN (Zhang & Zhou, 2007): multi-label k-nearest neighbours with Bayesian label posteriors.

For class ``l`` and a sample whose k neighbours include ``j`` positives of ``l``, the posterior is
``P(H1) P(E_j | H1) / (P(H1) P(E_j | H1) + P(H0) P(E_j | H0))`` with smoothed priors
``P(H1) = (s + #positives) / (2s + N)`` and likelihoods
``P(E_j | H) = (s + c_H[j]) / (s (k + 1) + sum_j' c_H[j'])``, where ``c_H[j]`` counts the training
samples of hypothesis ``H`` (positive / negative for ``l``) with ``j`` positive leave-one-out
neighbours. Neighbours are cosine neighbours from one search shared by all ks.

Missing targets (``-1`` in the label matrix, e.g. a harmonised finding a dataset does not label):
for class ``l`` the prior and the counts ``c_H`` use only the training samples labelled for ``l``
(a missing target is neither a positive nor a negative), and the evidence ``j`` counts the
neighbours known to be positive. With no missing target this is exactly the estimator above.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from medprobe.errors import ConfigError
from medprobe.protocols.knn import ArrayLike, KNNPredictions, as_features, check_ks, cosine_topk


def _neighbour_counts(index: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(Q, C)`` number of positives per class among the neighbours ``index`` ``(Q, k)`` (sparse product)."""
    q, k = index.shape
    adjacency = sp.csr_matrix((np.ones(q * k, dtype=np.float32), index.ravel(), np.arange(0, q * k + 1, k)),
                              shape=(q, y.shape[0]))
    return np.rint(adjacency @ y).astype(np.int64)


def mlknn_predict(train_features: ArrayLike, train_Y: ArrayLike, test_features: ArrayLike,
                  ks: Sequence[int] = (10, 20, 100, 200), smoothing: float = 1.0, query_chunk: int = 1024,
                  train_chunk: int = 65536) -> KNNPredictions:
    """Posterior probability of every class for every test sample, ``{k: (N_test, C)}``.

    ``train_Y`` is the (N_train, C) 0/1 label matrix (``-1`` = missing, see the module notes). One cosine search (:func:`cosine_topk`)
    over the training set for the queries ``train ∪ test`` at ``k_max = min(max(ks), N_train - 1)``
    gives the training samples' leave-one-out neighbours (own row excluded) and the test
    samples' neighbours; each k uses the first k of them. A k above ``N_train - 1`` is clipped
    (``effective_k``). Vectorised over samples and classes; ``smoothing`` is ``s`` (Laplace, 1).
    Memory: the search's (see :func:`cosine_topk`) plus one copy of the features (the query set
    ``train ∪ test``) and ``(N_train + N_test) * (k_max + C)`` integers.
    """
    ks = check_ks(ks)
    if smoothing <= 0:
        raise ConfigError(f"smoothing must be > 0, got {smoothing}")
    xt, xq = as_features(train_features, "train features"), as_features(test_features, "test features")
    y = np.asarray(train_Y)
    if y.ndim != 2 or y.shape[0] != xt.shape[0]:
        raise ConfigError(f"train_Y must be a (N_train, C) 0/1 matrix with N_train={xt.shape[0]}, got shape {y.shape}")
    if not np.isin(y, (-1, 0, 1)).all():
        raise ConfigError(f"train_Y must hold 0/1 values (-1 = missing), got {np.unique(y)[:10].tolist()}")
    if xt.shape[0] < 2:
        raise ConfigError(f"ML-kNN needs at least 2 training samples (leave-one-out), got {xt.shape[0]}")
    if xt.shape[1] != xq.shape[1]:
        raise ConfigError(f"feature dimensions differ: train has {xt.shape[1]}, test has {xq.shape[1]}")
    n, c = y.shape
    negative = (y == 0).astype(np.float32)
    y = (y == 1).astype(np.float32)  # positives; a missing target is in neither y nor negative
    k_max = min(max(ks), n - 1)
    queries = torch.cat([xt, xq.to(xt.device, xt.dtype)])
    exclude = torch.cat([torch.arange(n), torch.full((xq.shape[0],), -1)])
    _, index = cosine_topk(xt, queries, k_max, query_chunk, train_chunk, exclude=exclude)
    index = index.cpu().numpy()
    prior = (smoothing + y.sum(0)) / (2 * smoothing + y.sum(0) + negative.sum(0))  # (C,), labelled samples only
    out = KNNPredictions()
    out.effective_k = {k: min(k, k_max) for k in ks}
    counts = np.zeros((index.shape[0], c), dtype=np.int64)
    done = 0
    for k in sorted(set(out.effective_k.values())):  # neighbour counts grow incrementally with k
        counts += _neighbour_counts(index[:, done:k], y)
        done = k
        train_counts, test_counts = counts[:n], counts[n:]
        # c_H[l, j]: training samples of class-l hypothesis H with j positive neighbours, via one bincount
        cell = (train_counts + (k + 1) * np.arange(c)).ravel()
        pos = np.bincount(cell, weights=y.ravel(), minlength=c * (k + 1)).reshape(c, k + 1)
        neg = np.bincount(cell, weights=negative.ravel(), minlength=c * (k + 1)).reshape(c, k + 1)
        like_pos = (smoothing + pos) / (smoothing * (k + 1) + pos.sum(1, keepdims=True))
        like_neg = (smoothing + neg) / (smoothing * (k + 1) + neg.sum(1, keepdims=True))
        classes = np.arange(c)
        a = prior * like_pos[classes, test_counts]       # (N_test, C)
        b = (1 - prior) * like_neg[classes, test_counts]
        posterior = (a / (a + b)).astype(np.float32)
        for requested, effective in out.effective_k.items():
            if effective == k:
                out[requested] = posterior
    return _ordered(out, ks)


def _ordered(out: KNNPredictions, ks: list[int]) -> KNNPredictions:
    """``out`` with keys in the requested order (and ``effective_k`` kept)."""
    ordered = KNNPredictions({k: out[k] for k in ks})
    ordered.effective_k = out.effective_k
    return ordered
