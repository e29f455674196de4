"""Linear sweep and kNN: the device path (GPU when there is one, chunked) gives the CPU's numbers."""
import numpy as np
import pytest
import torch

from medprobe.protocols import linear
from medprobe.protocols.knn import knn_predict
from medprobe.protocols.linear import linear_sweep

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _data(n=300, d=24, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, d)).astype(np.float32) + y[:, None] * 0.5
    return {"cls@1": x[:200], "cls@2": x[:200, :12]}, y[:200], {"cls@1": x[200:], "cls@2": x[200:, :12]}, y[200:]


def _sweep(device, **kw):
    xtr, ytr, xte, yte = _data()
    return linear_sweep(xtr, ytr, xte, yte, xte, "multiclass", 3, lrs=(1e-3, 1e-2, 1e-1), epochs=3, batch_size=32,
                        device=device, **kw)


def test_chunked_scoring_equals_one_pass(monkeypatch):
    whole = _sweep("cpu")
    monkeypatch.setattr(linear, "PREDICT_CHUNK", 7)
    chunked = _sweep("cpu")
    assert (chunked.best_variant, chunked.best_lr) == (whole.best_variant, whole.best_lr)
    np.testing.assert_array_equal(chunked.test_scores, whole.test_scores)
    assert chunked.val_table == whole.val_table


@cuda
def test_linear_sweep_on_gpu_matches_cpu(monkeypatch):
    cpu = _sweep("cpu")
    for budget in (linear.DEVICE_BUDGET, 0):  # features on the GPU whole, then a batch at a time
        monkeypatch.setattr(linear, "DEVICE_BUDGET", budget)
        gpu = _sweep("cuda")
        assert (gpu.best_variant, gpu.best_lr) == (cpu.best_variant, cpu.best_lr)
        np.testing.assert_allclose(gpu.test_scores, cpu.test_scores, atol=1e-4)
        assert gpu.weights["cls@1"][0].device.type == "cpu"


@cuda
def test_knn_on_gpu_matches_cpu():
    xtr, ytr, xte, _ = _data()
    cpu = knn_predict(xtr["cls@1"], ytr, xte["cls@1"], 3, ks=(5, 20), device="cpu")
    gpu = knn_predict(xtr["cls@1"], ytr, xte["cls@1"], 3, ks=(5, 20), device="cuda", train_chunk=64, query_chunk=16)
    for k in (5, 20):
        np.testing.assert_allclose(gpu[k], cpu[k], atol=1e-6)
