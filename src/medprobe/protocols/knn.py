"""Weighted k-nearest-neighbour classification on frozen features (DINOv2's kNN evaluation).

One chunked cosine top-k search at the largest k serves every k: the neighbours come out
sorted by similarity, so the prediction for k uses the first k of them.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medprobe.errors import ConfigError
from medprobe.runtime import default_device

ArrayLike = torch.Tensor | np.ndarray


class KNNPredictions(dict):
    """``{requested k: probabilities (N_test, C)}``; ``effective_k[k]`` is the k actually used
    (``min(k, number of training samples)``)."""

    effective_k: dict[int, int]


def as_features(x: ArrayLike, what: str) -> torch.Tensor:
    """``x`` as a 2-D floating-point tensor (no copy for float tensors/arrays), or a ConfigError naming ``what``."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim != 2:
        raise ConfigError(f"{what} must be a 2-D array (samples, dims), got shape {tuple(t.shape)}")
    return t if t.is_floating_point() else t.float()


def check_ks(ks: Sequence[int]) -> list[int]:
    """The requested ks as ints, or a ConfigError when one is < 1 or none is given."""
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"k: every k must be an integer >= 1, got {list(ks)}")
    return ks


@torch.no_grad()
def cosine_topk(train: ArrayLike, queries: ArrayLike, k: int, query_chunk: int = 1024, train_chunk: int = 65536,
                exclude: torch.Tensor | None = None, device: str | torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar training rows of every query, sorted by decreasing similarity.

    Returns ``(similarities, indices)``, both ``(N_query, k)``. Queries are processed
    ``query_chunk`` at a time; for each, the training set is scanned ``train_chunk`` rows at a
    time (converted to float32 and normalised on the fly, so the inputs are never copied) and a
    running top-k is merged with each chunk's top-k: the full similarity matrix never exists.
    Peak memory beyond the inputs, in 8-byte words, is about
    ``query_chunk * train_chunk`` (similarity block) ``+ train_chunk * D`` (normalised chunk)
    ``+ query_chunk * (D + 6 k)`` (query chunk, merge buffers) ``+ 3 * N_query * k`` (outputs):
    with the defaults and D = 1536, 512 MiB + 768 MiB + ~22 MiB, whatever the training-set size.
    ``exclude[i]`` (optional, ``(N_query,)`` int, -1 for none) is a training index that query
    ``i`` may not return (its own row, for leave-one-out). Deterministic for fixed inputs.
    ``device``: where the search runs (default: the GPU when there is one); the inputs stay where
    they are and move a chunk at a time; the results come back on the CPU.
    """
    xt, xq = as_features(train, "train features"), as_features(queries, "query features")
    n_train = xt.shape[0]
    if xt.shape[1] != xq.shape[1]:
        raise ConfigError(f"feature dimensions differ: train has {xt.shape[1]}, queries have {xq.shape[1]}")
    if query_chunk < 1 or train_chunk < 1:
        raise ConfigError(f"query_chunk and train_chunk must be >= 1, got {query_chunk} and {train_chunk}")
    available = n_train - (1 if exclude is not None else 0)
    if not 1 <= k <= available:
        raise ConfigError(f"k must be between 1 and {available} (training samples available), got {k}")
    dev = default_device() if device is None else torch.device(device)
    # float64: features of some models (e.g. random-init ViTs) are nearly collinear, with cosine
    # similarities equal to 1 within float32 rounding, which would scramble the neighbour order
    sims = torch.empty(xq.shape[0], k, dtype=torch.float64)
    index = torch.empty(xq.shape[0], k, dtype=torch.long)
    for q0 in range(0, xq.shape[0], query_chunk):
        q = F.normalize(xq[q0:q0 + query_chunk].to(dev).double(), dim=1)
        best_s = torch.full((q.shape[0], 0), -torch.inf, dtype=torch.float64, device=dev)
        best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=dev)
        for t0 in range(0, n_train, train_chunk):
            sim = q @ F.normalize(xt[t0:t0 + train_chunk].to(dev).double(), dim=1).T
            if exclude is not None:
                own = exclude[q0:q0 + query_chunk].to(dev) - t0
                rows = torch.nonzero((own >= 0) & (own < sim.shape[1])).squeeze(1)
                sim[rows, own[rows]] = -torch.inf
            chunk_s, chunk_i = sim.topk(min(k, sim.shape[1]), dim=1)
            merged_s, order = torch.cat([best_s, chunk_s], 1).sort(dim=1, descending=True, stable=True)
            best_s = merged_s[:, :k]
            best_i = torch.cat([best_i, chunk_i + t0], 1).gather(1, order[:, :k])
        sims[q0:q0 + query_chunk], index[q0:q0 + query_chunk] = best_s.cpu(), best_i.cpu()
    return sims, index


@torch.no_grad()
def knn_predict(train_features: ArrayLike, train_labels: ArrayLike, test_features: ArrayLike, num_classes: int,
                ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07, query_chunk: int = 1024,
                train_chunk: int = 65536, device: str | torch.device | None = None) -> KNNPredictions:
    """Class probabilities of the test samples by temperature-weighted voting of the k nearest neighbours.

    Cosine similarity on L2-normalised features; one search at ``k_max = min(max(ks), N_train)``
    (see :func:`cosine_topk` for the chunking and its peak memory; voting adds
    ``query_chunk * k_max * C`` words, the outputs ``N_test * C * len(ks)``). Neighbour ``j``
    votes for its label with weight ``exp(sim_j / temperature)``; the votes of the first ``k``
    neighbours are summed per class and normalised to sum to 1 per row. ``train_labels`` are class indices
    ``0..num_classes-1`` (binary: 0/1 with ``num_classes=2``). Returns ``{k: (N_test, C)}`` for the
    requested ks; a k above the training-set size uses all training samples (``effective_k``).
    """
    ks = check_ks(ks)
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    xt = as_features(train_features, "train features")
    y = torch.as_tensor(np.asarray(train_labels)).long().view(-1)
    if y.shape[0] != xt.shape[0]:
        raise ConfigError(f"train features have {xt.shape[0]} rows but train labels have {y.shape[0]}")
    if num_classes < 2 or y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(f"train labels must be class indices in 0..{num_classes - 1} (num_classes={num_classes}), "
                          f"got values {torch.unique(y)[:10].tolist()}")
    k_max = min(max(ks), xt.shape[0])
    sims, index = cosine_topk(xt, test_features, k_max, query_chunk, train_chunk, device=device)
    out = KNNPredictions({k: np.empty((sims.shape[0], num_classes), dtype=np.float32) for k in ks})
    out.effective_k = {k: min(k, k_max) for k in ks}
    for q0 in range(0, sims.shape[0], query_chunk):  # voting in query chunks: (chunk, k_max, C) at a time
        s = sims[q0:q0 + query_chunk]
        weight = torch.exp((s - s[:, :1]) / temperature)  # the row maximum cancels in the normalisation
        votes = torch.zeros(s.shape[0], k_max, num_classes, dtype=s.dtype, device=s.device)
        votes.scatter_(2, y[index[q0:q0 + query_chunk]].unsqueeze(2), weight.unsqueeze(2))
        cumulative = votes.cumsum(1)
        for k in ks:
            p = cumulative[:, out.effective_k[k] - 1]
            out[k][q0:q0 + query_chunk] = (p / p.sum(1, keepdim=True)).float().cpu().numpy()
    return out
