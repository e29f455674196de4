"""kNN on nearly collinear features (random-init ViTs) must keep the exact neighbour order."""
import numpy as np
from sklearn.neighbors import NearestNeighbors

from medprobe.protocols.knn import cosine_topk


def test_neighbours_exact_when_cosines_round_to_one_in_float32():
    rng = np.random.default_rng(0)
    common = rng.normal(size=64).astype(np.float32) * 100
    train = (common + rng.normal(size=(300, 64)) * 1e-2).astype(np.float32)
    test = (common + rng.normal(size=(40, 64)) * 1e-2).astype(np.float32)
    norm = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)  # noqa: E731
    ref = NearestNeighbors(n_neighbors=10).fit(norm(train)).kneighbors(norm(test), return_distance=False)
    _, idx = cosine_topk(train, test, 10, query_chunk=16, train_chunk=64)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.numpy(), ref)])
    assert overlap > 0.95
