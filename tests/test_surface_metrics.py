"""Surface metrics (HD95, ASSD, NSD) and Dice, cross-checked against MONAI on random masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medprobe.errors import ConfigError
from medprobe.metrics import segmentation_metrics, surface_distances, union_bbox

torch = pytest.importorskip("torch")
monai_metrics = pytest.importorskip("monai.metrics")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation notices
NAMES = ["bg", "a", "b"]


def value(rows, metric, cls=None):
    return next(r for r in rows if r.metric == metric and r.cls == cls)


def blobs(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """A label map of smooth random blobs (several per class), away from and touching the border."""
    out = np.zeros(shape, dtype=np.int64)
    for c in range(1, num_classes):
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
        out[field > np.quantile(field, 0.85)] = c
    return out


def onehot(labels: np.ndarray, c: int) -> "torch.Tensor":
    return torch.from_numpy(np.stack([labels == k for k in range(c)])[None].astype(np.float32))


@pytest.mark.parametrize("seed,shape,spacing", [(0, (24, 30, 28), (2.5, 0.7, 1.1)), (1, (18, 40, 33), (0.5, 3.0, 1.0)),
                                                (2, (48, 52), (1.7, 0.6))])
def test_matches_monai_on_random_masks_with_anisotropic_spacing(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    truth = blobs(rng, shape, 3)
    pred = blobs(rng, shape, 3)
    pred[truth == 1] = np.where(rng.random((truth == 1).sum()) < 0.8, 1, pred[truth == 1])  # partly right
    tol = 1.5
    rows = segmentation_metrics(pred, truth, 3, NAMES, spacing=spacing, surface=("hd95", "assd", "nsd"),
                                tolerance_mm=tol)
    yp, yt = onehot(pred, 3), onehot(truth, 3)
    ref = {
        "dice": monai_metrics.compute_dice(yp, yt, include_background=False)[0],
        "hd95": monai_metrics.compute_hausdorff_distance(yp, yt, include_background=False, percentile=95,
                                                         spacing=list(spacing))[0],
        "assd": monai_metrics.compute_average_surface_distance(yp, yt, include_background=False, symmetric=True,
                                                               spacing=list(spacing))[0],
        "nsd": monai_metrics.compute_surface_dice(yp, yt, class_thresholds=[tol, tol], include_background=False,
                                                  spacing=list(spacing))[0],
    }
    for metric, values in ref.items():
        for k, name in enumerate(NAMES[1:]):
            ours = value(rows, metric, name).value
            assert ours == pytest.approx(float(values[k]), rel=1e-5, abs=1e-5), (metric, name)
    # the metrics depend on the spacing: isotropic spacing gives other distances
    iso = segmentation_metrics(pred, truth, 3, NAMES, surface=("hd95",))
    assert value(iso, "hd95", "a").value != pytest.approx(value(rows, "hd95", "a").value)


def test_bounding_box_is_exact_against_full_volume_distance_transform():
    rng = np.random.default_rng(5)
    a = np.zeros((40, 50, 45), bool)
    b = np.zeros_like(a)
    a[5:14, 10:30, 0:9] = True  # touches the array border
    b[8:20, 12:33, 2:12] = True
    b[30:33, 40:44, 30:35] = True  # a far-off second component
    a &= rng.random(a.shape) > 0.05
    sp = (1.3, 0.8, 2.1)
    d_ab, d_ba = surface_distances(a, b, sp)
    sa, sb = a & ~ndimage.binary_erosion(a), b & ~ndimage.binary_erosion(b)
    full_ab = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
    full_ba = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
    np.testing.assert_allclose(np.sort(d_ab), np.sort(full_ab), atol=1e-9)
    np.testing.assert_allclose(np.sort(d_ba), np.sort(full_ba), atol=1e-9)
    box = union_bbox(a, b)
    assert box is not None and box[0] == slice(4, 34)
    assert union_bbox(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) is None


def test_hand_computed_surface_metrics():
    truth, pred = np.zeros((10, 10), int), np.zeros((10, 10), int)
    truth[2:5, 2:5] = 1
    pred[2:5, 3:6] = 1  # shifted by one column
    rows = segmentation_metrics(pred, truth, 2, ["bg", "x"], surface=("hd95", "assd", "nsd"), tolerance_mm=0.5)
    # surfaces: 8 voxels each (3x3 ring); 5 of each lie on the other's ring (2 shared corners + middle cols)
    d_ab, d_ba = surface_distances(pred == 1, truth == 1)
    assert len(d_ab) == len(d_ba) == 8
    assert value(rows, "nsd", "x").value == pytest.approx(((d_ab <= 0.5).sum() + (d_ba <= 0.5).sum()) / 16)
    assert value(rows, "assd", "x").value == pytest.approx(np.concatenate([d_ab, d_ba]).mean())
    assert value(rows, "hd95", "x").value == pytest.approx(1.0)
    wide = segmentation_metrics(pred, truth, 2, ["bg", "x"], surface=("nsd",), tolerance_mm=1.0)
    assert value(wide, "nsd", "x").value == 1.0


@pytest.mark.parametrize("empty", ["one", "nan"])
def test_empty_mask_convention(empty):
    truth, pred = np.zeros((6, 6), int), np.zeros((6, 6), int)
    truth[1:3, 1:3], pred[1:3, 1:3] = 1, 1
    pred[4, 4] = 3  # class 3 predicted, absent from truth; class 2 absent from both
    rows = segmentation_metrics(pred, truth, 4, ["bg", "x", "y", "z"], surface=SURF, empty=empty)
    both = 1.0 if empty == "one" else math.nan
    for metric in ("dice", "jaccard", "nsd"):
        v = value(rows, metric, "y")
        assert (v.value == both) if empty == "one" else math.isnan(v.value)
        assert v.note == "empty truth and prediction"
        assert value(rows, metric, "z").value == 0.0
        mean = value(rows, metric)
        assert mean.value == pytest.approx((1 + 0 + (1 if empty == "one" else 0)) / (3 if empty == "one" else 2))
    for metric in ("hd95", "assd"):
        assert math.isnan(value(rows, metric, "y").value) and math.isnan(value(rows, metric, "z").value)
        assert value(rows, metric, "z").note == "empty truth"
        assert value(rows, metric).value == 0.0
    assert f"empty={empty}" in value(rows, "dice").note


SURF = ("hd95", "assd", "nsd")


def test_option_errors():
    a = np.zeros((4, 4), int)
    with pytest.raises(ConfigError, match="empty"):
        segmentation_metrics(a, a, 2, ["bg", "x"], empty="zero")
    with pytest.raises(ConfigError, match="surface metric"):
        segmentation_metrics(a, a, 2, ["bg", "x"], surface=("hd99",))
    with pytest.raises(ConfigError, match="spacing"):
        segmentation_metrics(a, a, 2, ["bg", "x"], surface=("hd95",), spacing=(1.0, 0.0))
    with pytest.raises(ConfigError, match="tolerance_mm"):
        segmentation_metrics(a, a, 2, ["bg", "x"], surface=("nsd",), tolerance_mm=-1)
