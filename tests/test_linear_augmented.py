"""``linear`` with ``mode: augmented``: online features of augmented images from the frozen backbone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medprobe.data.adapters import build_dataset
from medprobe.errors import ConfigError
from medprobe.features.extract import preprocessor_for
from medprobe.protocols.base import Unit, get_protocol
from medprobe.protocols.linear_augmented import variant_features

from test_segmentation import calls, make_ctx  # noqa: F401  (fixture and shared helper)

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = {"inputs": ["cls", "cls+mean"], "blocks": [1, 2], "lrs": [1e-3, 1e-2, 1e-1], "epochs": 2, "batch_size": 8}


def run(ctx, seed=0, **options):
    proto = get_protocol("linear")
    opts = proto.parse_options({**OPTIONS, **options}, "protocols.linear")
    return proto.run(Unit("linear", {}, seed), opts, ctx)


def auroc(result) -> float:
    return next(m.value for m in result.metrics if m.metric == "auroc" and m.cls is None)


@pytest.fixture
def dataset():
    return build_dataset("phantom", None, n=24, size=28, seed=0)


def test_online_features_match_the_feature_store(tmp_path, dataset):
    """Un-augmented online features are the store's features (same blocks, same concatenation)."""
    ctx = make_ctx(tmp_path, dataset)
    store = ctx.features(get_protocol("linear").feature_needs(get_protocol("linear").parse_options(OPTIONS, "p")))
    backbone = ctx.backbone().eval()
    pre = preprocessor_for(backbone, dataset, ctx.image_size)
    idx = dataset.indices("test")
    images = pre([dataset.load_image(int(i)) for i in idx], [str(i) for i in idx])
    online = variant_features(backbone, images, ["cls@2", "cls+mean@1"], "fp32")
    np.testing.assert_allclose(online["cls@2"].numpy(), store.features("test", "cls", 2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(online["cls+mean@1"].numpy(), store.features("test", "cls+mean", 1),
                               rtol=1e-4, atol=1e-4)


def test_augmented_mode_runs_without_the_store_differs_from_cached_and_is_seeded(tmp_path, dataset, calls):
    ctx = make_ctx(tmp_path / "a", dataset)
    ctx.features_fn = lambda needs: pytest.fail("augmented mode must not read the feature store")
    calls["n"] = 0
    aug = run(ctx, mode="augmented", epochs=3)
    n_train = len(dataset.indices("train"))
    assert aug.info["mode"] == "augmented" and aug.info["steps"] == 3 * int(np.ceil(n_train / 8))
    assert aug.info["heads"] == 2 * 2 * 3  # inputs x blocks x lrs, trained in one pass
    assert calls["n"] >= aug.info["steps"]  # the backbone ran on every training batch
    again = run(make_ctx(tmp_path / "b", dataset), mode="augmented", epochs=3)
    assert auroc(again) == auroc(aug)
    np.testing.assert_array_equal(again.predictions.splits["test"].columns["score"],
                                  aug.predictions.splits["test"].columns["score"])
    other = run(make_ctx(tmp_path / "c", dataset), seed=1, mode="augmented", epochs=3)
    cached = run(make_ctx(tmp_path / "d", dataset), epochs=3)
    assert not np.allclose(other.predictions.splits["test"].columns["score"],
                           aug.predictions.splits["test"].columns["score"])
    assert not np.allclose(cached.predictions.splits["test"].columns["score"],
                           aug.predictions.splits["test"].columns["score"])
    assert cached.predictions.splits["test"].keys == aug.predictions.splits["test"].keys


def test_augmented_mode_changes_the_unit_identity_and_rejects_bad_combinations():
    proto = get_protocol("linear")
    cached = proto.unit_options(proto.parse_options(OPTIONS, "p"), Unit("linear", {}, 0))
    aug = proto.unit_options(proto.parse_options({**OPTIONS, "mode": "augmented"}, "p"), Unit("linear", {}, 0))
    assert cached != aug and aug["mode"] == "augmented"
    for bad in ({"mode": "augmented", "solver": "sklearn_lbfgs"}, {"mode": "augmented", "folds": 3}):
        with pytest.raises(ConfigError):
            proto.parse_options({**OPTIONS, **bad}, "protocols.linear")
