"""The one-pass linear-probe sweep: accuracy, exact per-head learning rates, selection on val."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medprobe.errors import ConfigError
from medprobe.metrics import metric_value
from medprobe.protocols import linear
from medprobe.protocols.linear import DEFAULT_LRS, init_head, linear_sweep


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(task: str, n: int, seed: int = 0, c: int = 3, d: int = 16):
    """Linearly separable labels; two input variants (the second with extra noise dimensions)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, c))
    x = rng.normal(size=(n, d)).astype(np.float32)
    z = x @ w
    y = {"binary": (z[:, 0] > 0).astype(int), "multiclass": z.argmax(1), "multilabel": (z > 0).astype(int)}[task]
    noise = rng.normal(size=(n, 8)).astype(np.float32)
    return {"cls@1": torch.from_numpy(x), "cls+mean@1": torch.from_numpy(np.c_[x, noise])}, y


def split(x: dict[str, torch.Tensor], y: np.ndarray, a: int, b: int):
    return {v: t[a:b] for v, t in x.items()}, y[a:b]


NUM_CLASSES = {"binary": 2, "multiclass": 3, "multilabel": 3}


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_separable_data_reaches_high_test_auroc(task):
    x, y = make_data(task, 600)
    (xtr, ytr), (xva, yva), (xte, yte) = split(x, y, 0, 300), split(x, y, 300, 400), split(x, y, 400, 600)
    res = linear_sweep(xtr, ytr, xva, yva, xte, task, NUM_CLASSES[task], epochs=10, batch_size=64)
    assert metric_value(yte, res.test_scores, task, "auroc") > 0.95
    assert res.test_scores.shape == ((200,) if task == "binary" else (200, 3))
    assert res.val_scores.shape[0] == 100 and res.selected_on == "val"
    assert len(res.val_table) == 2 * len(DEFAULT_LRS) and res.epochs == 10
    assert res.steps == 10 * math.ceil(300 / 64)
    if task == "multiclass":
        np.testing.assert_allclose(res.test_scores.sum(1), 1.0, atol=1e-5)


def torch_reference(x, y, task, lr, epochs, batch_size, seed, weight_decay, pos_weight, variant):
    """One head trained the ordinary way: nn-style linear layer, torch.optim.SGD, CosineAnnealingLR."""
    mean, std = x.mean(0), x.std(0, unbiased=False)
    x = (x - mean) / std
    c_out = 1 if task == "binary" else 3
    w0, _ = init_head(seed, variant, 1, x.shape[1], c_out)
    w = w0[0].clone().requires_grad_()
    b = torch.zeros(c_out, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    gen = torch.Generator().manual_seed(seed)
    yt = torch.as_tensor(y)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            logits = x[idx] @ w + b
            if task == "multiclass":
                loss = F.cross_entropy(logits, yt[idx].long(), weight=pos_weight)
            else:
                target = yt[idx].float().view(len(idx), -1)
                loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return w.detach(), b.detach()


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_one_pass_sweep_equals_heads_trained_separately(task):
    x, y = make_data(task, 230, seed=1)
    y[:20] = y[:20] if task == "multilabel" else np.sort(y[:20])  # keep labels unbalanced but varied
    kw = dict(task=task, num_classes=NUM_CLASSES[task], epochs=3, batch_size=32, seed=5, weight_decay=1e-3,
              class_weighting=True)
    sweep = linear_sweep(x, y, None, None, x, lrs=(1e-3, 2e-2, 1e-1), **kw)
    alone = linear_sweep({"cls+mean@1": x["cls+mean@1"]}, y, None, None, {"cls+mean@1": x["cls+mean@1"]},
                         lrs=(2e-2,), **kw)
    w_sweep, b_sweep = sweep.weights["cls+mean@1"]
    w_alone, b_alone = alone.weights["cls+mean@1"]
    torch.testing.assert_close(w_sweep[1], w_alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_sweep[1], b_alone[0], rtol=1e-5, atol=1e-6)
    # and the explicit per-head update is exactly torch's SGD + cosine schedule for that lr
    yt = torch.as_tensor(y)
    if task == "multiclass":
        counts = torch.bincount(yt, minlength=3).float()
        weight = len(y) / (3 * counts)
    else:
        pos = yt.float().sum(0)
        weight = (len(y) - pos) / pos
    w_ref, b_ref = torch_reference(x["cls+mean@1"], y, task, 2e-2, 3, 32, 5, 1e-3, weight, "cls+mean@1")
    torch.testing.assert_close(w_sweep[1], w_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b_sweep[1], b_ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(w_sweep[0], w_sweep[1])  # the heads really have different learning rates


def test_heads_are_batched_in_one_pass(monkeypatch):
    calls = []
    original = linear._loss
    monkeypatch.setattr(linear, "_loss", lambda logits, *a: calls.append(logits.shape) or original(logits, *a))
    x, y = make_data("binary", 100)
    res = linear_sweep(x, y, None, None, x, "binary", 2, epochs=2, batch_size=25)
    assert res.steps == 8
    assert len(calls) == 8 * 2  # one loss per variant per mini-batch...
    assert all(shape[0] == len(DEFAULT_LRS) for shape in calls)  # ...computing all 13 heads at once


def test_best_head_is_chosen_on_val():
    x, y = make_data("binary", 500, seed=2)
    (xtr, ytr), (xva, yva), (xte, yte) = split(x, y, 0, 250), split(x, y, 250, 350), split(x, y, 350, 500)
    lrs = (1e-5, 1e-3, 1e-1)
    right = linear_sweep(xtr, ytr, xva, yva, xte, "binary", 2, lrs=lrs, epochs=3, batch_size=50)
    flipped = linear_sweep(xtr, ytr, xva, 1 - yva, xte, "binary", 2, lrs=lrs, epochs=3, batch_size=50)
    for res in (right, flipped):
        values = [v for _, _, v in res.val_table]
        assert res.best_val == max(values)
        assert (res.best_variant, res.best_lr, res.best_val) in res.val_table
        # the returned test scores are those of the chosen head
        w, b = res.weights[res.best_variant]
        mean, std = res.standardisation[res.best_variant]
        h = lrs.index(res.best_lr)
        logits = ((xte[res.best_variant] - mean) / std) @ w[h] + b[h]
        np.testing.assert_allclose(res.test_scores, torch.sigmoid(logits[:, 0]).numpy(), atol=1e-6)
    assert metric_value(yte, flipped.test_scores, "binary", "auroc") < metric_value(yte, right.test_scores, "binary",
                                                                                     "auroc")


def test_ties_go_to_the_smaller_lr_and_first_variant():
    x, y = make_data("binary", 200, seed=3)
    x["cls@1"][:, 0] += torch.from_numpy(np.where(y == 1, 4.0, -4.0).astype(np.float32))  # a wide margin
    x["cls+mean@1"][:, 0] = x["cls@1"][:, 0]
    res = linear_sweep(x, y, x, y, x, "binary", 2, lrs=(0.1, 0.05), epochs=5, batch_size=50, select_metric="accuracy")
    assert [v for _, _, v in res.val_table] == [1.0] * 4
    assert (res.best_variant, res.best_lr) == ("cls@1", 0.05)


def test_without_val_selects_on_train():
    x, y = make_data("multiclass", 150)
    for val, y_val in ((None, None), ({}, None), ({v: t[:0] for v, t in x.items()}, y[:0])):
        res = linear_sweep(x, y, val, y_val, x, "multiclass", 3, lrs=(1e-2, 1e-1), epochs=2, batch_size=50)
        assert res.selected_on == "train" and res.val_scores.shape == (0, 3)
        assert res.best_val == max(v for _, _, v in res.val_table)


def test_val_with_one_class_falls_back_to_train():
    x, y = make_data("binary", 200)
    xva, _ = split(x, y, 0, 20)
    res = linear_sweep(x, y, xva, np.zeros(20, int), x, "binary", 2, lrs=(1e-2,), epochs=1)
    assert res.selected_on == "train" and not math.isnan(res.best_val)


def test_deterministic_for_a_seed():
    x, y = make_data("multilabel", 120)
    kw = dict(task="multilabel", num_classes=3, lrs=(1e-2, 1e-1), epochs=2, batch_size=32)
    a = linear_sweep(x, y, None, None, x, seed=1, **kw)
    b = linear_sweep(x, y, None, None, x, seed=1, **kw)
    c = linear_sweep(x, y, None, None, x, seed=2, **kw)
    assert torch.equal(a.weights["cls@1"][0], b.weights["cls@1"][0])
    np.testing.assert_array_equal(a.test_scores, b.test_scores)
    assert not torch.equal(a.weights["cls@1"][0], c.weights["cls@1"][0])


def test_user_errors():
    x, y = make_data("binary", 40)
    with pytest.raises(ConfigError, match=r"\[0.1, 0.0\]"):
        linear_sweep(x, y, None, None, x, "binary", 2, lrs=(0.1, 0.0))
    with pytest.raises(ConfigError, match="epochs must be >= 1, got 0"):
        linear_sweep(x, y, None, None, x, "binary", 2, epochs=0)
    with pytest.raises(ConfigError, match="'f1'.*auroc"):
        linear_sweep(x, y, None, None, x, "binary", 2, select_metric="f1")
    with pytest.raises(ConfigError, match="'regression'.*multilabel"):
        linear_sweep(x, y, None, None, x, "regression", 2)
    with pytest.raises(ConfigError, match="kappa"):
        linear_sweep(x, np.c_[y, y], None, None, x, "multilabel", 2, select_metric="kappa")
    with pytest.raises(ConfigError, match="input variants"):
        linear_sweep(x, y, None, None, {"cls@1": x["cls@1"]}, "binary", 2)
    with pytest.raises(ConfigError, match="shape"):
        linear_sweep(x, y[:10], None, None, x, "binary", 2)
