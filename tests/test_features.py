import numpy as np
import pytest
import torch

from medprobe.backbones import create_backbone
from medprobe.backbones.registry import get_spec
from medprobe.data.base import ArrayDataset, Record, TaskSpec
from medprobe.data.preprocess import Preprocessor
from medprobe.errors import ConfigError, DataError
from medprobe.features import extract_features, open_store


def _dataset(n=24, size=32, ndim=2, seed=0, nan_at=None):
    rng = np.random.default_rng(seed)
    shape = (n, size, size) if ndim == 2 else (n, 5 + seed, size, size)
    images = rng.random(shape, dtype=np.float32) * 255
    if nan_at is not None:
        images[nan_at, 0, 0] = np.nan
    splits = ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
    recs = [Record(f"img{i}", splits[i], f"p{i}", int(i % 2), {"sex": "MF"[i % 2]}) for i in range(n)]
    return ArrayDataset(images, recs, TaskSpec("binary", ("neg", "pos")), name="arr", ndim=ndim)


@pytest.fixture(scope="module")
def vit():
    return create_backbone("dinov2_vits14", "random", tiny=True)


def test_extract_then_reuse(tmp_path, vit):
    ds = _dataset()
    first = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=2, precision="fp32", batch_size=5,
                             progress=False)
    assert not first.reused and first.items == len(ds)
    store = first.store
    assert store.splits == ["train", "val", "test"]
    assert store.stored_blocks == [2, 3]
    assert store.features("train", "cls", 1).shape == (12, vit.embed_dim)
    assert store.features("train", "cls", 2).shape == (12, 2 * vit.embed_dim)
    assert store.features("test", "cls+mean", 1).shape == (6, 2 * vit.embed_dim)
    np.testing.assert_array_equal(store.labels("val"), [0, 1, 0, 1, 0, 1])
    assert store.metadata("train", "sex")[:2] == ["M", "F"]
    second = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=2, precision="fp32", batch_size=5,
                              progress=False)
    assert second.reused and second.store.path == store.path
    # the stored tokens equal a direct forward pass of the same images
    pre = Preprocessor(vit.preprocess, 28)
    with torch.inference_mode():
        out = vit.forward_tokens(pre([ds.load_image(i) for i in ds.indices("train")]), blocks=[-1])
    np.testing.assert_allclose(store.tokens("train", "cls", 3), out.cls.numpy(), rtol=1e-4, atol=1e-5)


def test_key_changes_with_settings(tmp_path, vit):
    ds = _dataset()
    a = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=1, precision="fp32", progress=False)
    b = extract_features(vit, ds, tmp_path, image_size=42, last_blocks=1, precision="fp32", progress=False)
    c = extract_features(vit, _dataset(seed=1), tmp_path, image_size=28, last_blocks=1, precision="fp32", progress=False)
    assert len({a.store.path, b.store.path, c.store.path}) == 3


def test_damaged_store_is_rebuilt(tmp_path, vit):
    ds = _dataset()
    store = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=1, precision="fp32", progress=False).store
    f = store.path / "train" / "cls.3.npy"
    data = bytearray(f.read_bytes())
    f.write_bytes(bytes(data[:-4]))  # truncated: seen by the cheap check on every open
    assert open_store(store.path) is None  # detected and removed
    again = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=1, precision="fp32", progress=False)
    assert not again.reused and not again.store.verify()
    data[-4:] = b"\x00\x00\x80\x7f"  # same size, other bytes: only the full verification reads them
    f.write_bytes(bytes(data))
    assert open_store(again.store.path) is not None and again.store.check() == []
    assert again.store.verify() == ["train/cls.3"]
    assert open_store(again.store.path, full=True) is None
    third = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=1, precision="fp32", progress=False)
    assert not third.reused and third.store.verify() == []


def test_cache_verify_command(tmp_path, vit, capsys):
    from medprobe.cli import main
    store = extract_features(vit, _dataset(), tmp_path, image_size=28, last_blocks=1, precision="fp32",
                             progress=False).store
    assert main(["cache", "verify", str(tmp_path)]) == 0
    assert "1 of 1 store(s) intact" in capsys.readouterr().out
    f = store.path / "val" / "mean.3.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["cache", "verify", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "val/mean.3" in out and "train/" not in out
    assert main(["cache", "verify", str(tmp_path), "--delete-damaged"]) == 1
    assert not store.path.exists()
    assert main(["cache", "verify", str(tmp_path / "nothing")]) == 2


def test_store_with_more_blocks_is_reused(tmp_path, vit):
    ds = _dataset()
    big = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=3, patch_blocks=[-1, 1], precision="fp32",
                           progress=False)
    small = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=2, patch_blocks=[3], precision="fp32",
                             progress=False)
    assert small.reused and small.store.path == big.store.path
    assert small.store.block_index(2) == [2, 3]
    more = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=4, precision="fp32", progress=False)
    assert not more.reused  # a store keeping fewer blocks never stands in for more
    other = extract_features(vit, ds, tmp_path, image_size=42, last_blocks=1, precision="fp32", progress=False)
    assert not other.reused  # nor one that differs in anything else


def test_interrupted_extraction_leaves_no_store(tmp_path, vit):
    ds = _dataset(nan_at=20)
    with pytest.raises(DataError, match="NaN"):
        extract_features(vit, ds, tmp_path, image_size=28, precision="fp32", batch_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []  # the temporary folder was removed, nothing half-written remains


def test_volumes_are_embedded_by_slice_and_pooled(tmp_path, vit):
    ds = _dataset(n=8, ndim=3)
    store = extract_features(vit, ds, tmp_path, image_size=28, last_blocks=1, precision="fp32", batch_size=7,
                             progress=False).store
    assert store.meta["volumetric"]
    assert store.array("train", "cls.3").shape[0] == 4 * 5  # 4 volumes x 5 slices, batches spanning volumes
    pooled = store.features("train", "cls", 1, pooling="mean")
    assert pooled.shape == (4, vit.embed_dim)
    np.testing.assert_allclose(pooled[1], store.tokens("train", "cls", 3)[5:10].mean(0), rtol=1e-5)
    assert store.features("train", "cls", 1, pooling="max").shape == (4, vit.embed_dim)


def test_bad_image_size_and_blocks(tmp_path, vit):
    with pytest.raises(ConfigError, match="multiple of"):
        extract_features(vit, _dataset(), tmp_path, image_size=30, progress=False)
    store = extract_features(vit, _dataset(), tmp_path, image_size=28, last_blocks=1, precision="fp32",
                             progress=False).store
    with pytest.raises(ConfigError, match="re-extract"):
        store.features("train", "cls", 4)


def test_preprocessing_follows_each_backbone():
    img = np.linspace(0, 4095, 40 * 50, dtype=np.float32).reshape(40, 50)  # 12-bit radiograph units
    clip = Preprocessor(get_spec("clip_vitl14").preprocess, 28)
    x = clip([img])
    assert x.shape == (1, 3, 28, 28)  # shortest edge resized, centre-cropped
    dino = Preprocessor(get_spec("dinov2_vits14").preprocess, 28)
    y = dino([img])
    assert not torch.allclose(x, y)  # different mean/std
    raw = (y[0] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1))
    torch.testing.assert_close(raw[0], raw[1])  # grayscale repeated to 3 channels
    assert raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4
    rgb = np.random.default_rng(0).random((20, 20, 3), dtype=np.float32)
    assert dino([rgb], ["rgb.png"]).shape == (1, 3, 28, 28)
    with pytest.raises(DataError, match="bad.png"):
        dino([np.full((8, 8), np.inf, dtype=np.float32)], ["bad.png"])
