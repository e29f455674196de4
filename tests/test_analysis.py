"""Analyses: joint patch PCA, linear/minibatch CKA, CLS attention, patch correspondence, ranking, CLI errors."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from medprobe.analysis import (ImageSet, average_ranks, cka_between, cka_matrix, cls_attention, images_from_dataset,
                               images_from_files, linear_cka, patch_correspondence, pca_from_tokens, prepare)
from medprobe.analysis.attention import check_attention_support, last_layer_attention
from medprobe.analysis.correspondence import point_to_patch
from medprobe.analysis.images import _geometry
from medprobe.backbones import create_backbone
from medprobe.cli import main
from medprobe.errors import ConfigError


@pytest.fixture(scope="module")
def vit() -> object:
    torch.manual_seed(0)
    return create_backbone("dinov2_vits14", "random", tiny=True)


@pytest.fixture(scope="module")
def phantoms() -> ImageSet:
    return images_from_dataset("phantom", None, {"n": 8, "size": 32}, n=4)


# --------------------------------------------------------------------------- CKA
def _hand_cka(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def test_cka_matches_hand_computation_and_invariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    y = np.tanh(x @ rng.normal(size=(12, 7))) + 0.5 * rng.normal(size=(60, 7))
    ref = _hand_cka(x, y)
    assert 0.2 < ref < 0.95
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x @ q * 3.7 + 5.0, y) == pytest.approx(ref, rel=1e-10)  # rotation, scale, shift
    assert linear_cka(x, y * 0.01) == pytest.approx(ref, rel=1e-10)
    res = cka_matrix([x, y, x[:, :3]], [y, x], labels_a=["x", "y", "x3"], labels_b=["y", "x"])
    assert res.matrix.shape == (3, 2) and res.method == "full"
    assert res.matrix[0, 1] == pytest.approx(1.0) and res.matrix[1, 0] == pytest.approx(1.0)
    assert res.matrix[0, 0] == pytest.approx(ref, rel=1e-10)
    assert res.matrix[2, 1] == pytest.approx(_hand_cka(x[:, :3], x), rel=1e-10)


def test_minibatch_cka_is_close_to_full_on_large_n():
    rng = np.random.default_rng(1)
    n = 4000
    x = rng.normal(size=(n, 16))
    layers_b = [np.tanh(x @ rng.normal(size=(16, 10))) + s * rng.normal(size=(n, 10)) for s in (0.3, 1.0, 3.0)]
    full = cka_matrix([x, x[:, :4]], layers_b)
    mini = cka_matrix([x, x[:, :4]], layers_b, minibatch=200, seed=0)
    assert mini.method == "minibatch(k=200, batches=20)"
    assert np.abs(mini.matrix - full.matrix).max() < 0.02
    assert mini.matrix[0, 0] > mini.matrix[0, 1] > mini.matrix[0, 2]  # more noise, less similar
    same = cka_matrix([x], [x * 2 + 1], minibatch=100)
    assert same.matrix[0, 0] == pytest.approx(1.0, abs=1e-9)
    # without a shared dependence the unbiased estimate is near 0 (the biased full one is not, for small n)
    noise = cka_matrix([x], [rng.normal(size=(n, 10))], minibatch=200)
    assert abs(noise.matrix[0, 0]) < 0.02


def test_cka_bad_input():
    rng = np.random.default_rng(2)
    with pytest.raises(ConfigError, match="different sample counts.*100 samples.*90"):
        cka_matrix([rng.normal(size=(100, 4))], [rng.normal(size=(90, 4))])
    with pytest.raises(ConfigError, match=">= 4"):
        cka_matrix([rng.normal(size=(10, 4))], [rng.normal(size=(10, 4))], minibatch=3)
    with pytest.raises(ConfigError, match="NaN"):
        cka_matrix([np.full((5, 2), np.nan)], [rng.normal(size=(5, 2))])


def test_cka_before_and_after_fine_tuning(vit, phantoms):
    tuned = copy.deepcopy(vit)
    with torch.no_grad():  # "fine-tuning" that changed only the last block
        for p in tuned.model.blocks[-1].parameters():
            p.add_(0.5 * torch.randn_like(p))
    res = cka_between(vit, tuned, phantoms, image_size=28, token="mean")
    assert res.matrix.shape == (4, 4) and res.labels_a[0] == "block 0"
    assert np.allclose(np.diag(res.matrix)[:3], 1.0, atol=1e-6)  # untouched blocks are identical
    assert res.matrix[3, 3] < 0.999
    flat = cka_between(vit, vit, phantoms, image_size=28, token="flatten", minibatch=4)
    assert flat.method.startswith("minibatch") and np.allclose(np.diag(flat.matrix), 1.0, atol=1e-6)


# --------------------------------------------------------------------------- PCA
def _planted_tokens(sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """2 images, 6x6 grid, D=8: border = background (-5 e0), inside = foreground (+5 e0) with image A
    along +3 e1 and image B along +3 e2."""
    rng = np.random.default_rng(0)
    n, d, h, w = 2, 8, 6, 6
    fg = np.zeros((h, w), dtype=bool)
    fg[1:-1, 1:-1] = True
    tok = 0.2 * rng.normal(size=(n, h, w, d))
    tok[..., 0] += np.where(fg, 5.0, -5.0) * sign
    tok[0, fg, 1] += 3.0
    tok[1, fg, 2] += 3.0
    return tok.transpose(0, 3, 1, 2), np.broadcast_to(fg, (n, h, w))


def test_pca_is_fitted_jointly_with_background_threshold():
    tokens, fg = _planted_tokens()
    res = pca_from_tokens(torch.from_numpy(tokens), threshold=0.5)
    assert res.rgb.shape == (2, 6, 6, 3) and res.basis.components.shape == (3, 8)
    assert np.array_equal(res.foreground, fg)
    assert (res.rgb[~fg] == 0).all() and res.rgb.min() >= 0 and res.rgb.max() <= 1
    # one basis for all images: projecting each image alone reproduces its colours
    for i in range(2):
        assert np.allclose(res.project(tokens[i:i + 1])[0][fg[i]], res.rgb[i][fg[i]])
    # the two images lie on different sides of the shared first component -> different colours
    mean_a, mean_b = res.rgb[0][fg[0]].mean(0), res.rgb[1][fg[1]].mean(0)
    assert abs(mean_a[0] - mean_b[0]) > 0.6
    # fitting each image on its own (the classic mistake) loses that: both span the full colour range
    alone = [pca_from_tokens(tokens[i:i + 1], threshold=0.5) for i in range(2)]
    assert abs(alone[0].rgb[0][fg[0]][:, 0].mean() - alone[1].rgb[0][fg[1]][:, 0].mean()) < 0.3


def test_pca_background_orientation():
    tokens, fg = _planted_tokens(sign=-1.0)  # background now on the high side of PC1
    assert np.array_equal(pca_from_tokens(tokens).foreground, fg)  # auto: borders are background
    assert np.array_equal(pca_from_tokens(tokens, background="high").foreground, fg)
    assert np.array_equal(pca_from_tokens(tokens, background="low").foreground, ~fg)
    assert pca_from_tokens(tokens, background="none").foreground.all()
    with pytest.raises(ConfigError, match="threshold"):
        pca_from_tokens(tokens, threshold=1.5)
    with pytest.raises(ConfigError, match="foreground patches"):
        pca_from_tokens(tokens, threshold=0.999999)


# --------------------------------------------------------------------------- attention
def _check_maps(res, n, heads, grid):
    assert res.maps.shape == (n, heads, grid, grid)
    assert np.allclose(res.maps.sum(axis=(2, 3)), 1.0, atol=1e-5)
    assert (res.maps >= 0).all() and ((res.patch_mass > 0) & (res.patch_mass <= 1 + 1e-6)).all()


def test_attention_timm_matches_explicit_softmax(vit, phantoms):
    inputs = prepare(vit, phantoms, 56).inputs
    res = cls_attention(vit, inputs)
    _check_maps(res, 4, 2, 4)
    attn = vit.model.blocks[-1].attn
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.update(a=o.detach()))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            vit.forward_tokens(inputs)
    finally:
        attn.fused_attn = True
        handle.remove()
    assert torch.allclose(last_layer_attention(vit, inputs), seen["a"], atol=1e-6)


def test_attention_registers_transformers_and_open_clip(phantoms):
    reg = create_backbone("dinov2_vits14_reg", "random", tiny=True)
    _check_maps(cls_attention(reg, prepare(reg, phantoms, 28).inputs), 4, 2, 2)
    hf = create_backbone("rad_dino", "random", tiny=True)
    _check_maps(cls_attention(hf, prepare(hf, phantoms, 42).inputs), 4, 2, 3)
    assert hf.model.config._attn_implementation == "sdpa"  # restored after the eager pass
    clip = create_backbone("clip_vitl14", "random", tiny=True)
    inputs = prepare(clip, phantoms, 28).inputs
    _check_maps(cls_attention(clip, inputs), 4, 2, 2)
    mha = clip.model.transformer.resblocks[-1].attn
    seen = {}
    handle = mha.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    with torch.no_grad():
        clip.forward_tokens(inputs)
        handle.remove()
        x = seen["x"]
        ref = mha(x, x, x, need_weights=True, average_attn_weights=False)[1]
    assert torch.allclose(last_layer_attention(clip, inputs), ref, atol=1e-5)


def test_attention_bad_backbones():
    cnn = create_backbone("resnet18", "random", tiny=True)
    with pytest.raises(ConfigError, match="resnet18 is a CNN"):
        check_attention_support(cnn)
    sam_like = SimpleNamespace(name="sam_vitb16", is_vit=True, patch_size=16, has_cls_token=False, is_sam=True)
    with pytest.raises(ConfigError, match="sam_vitb16 has none"):
        check_attention_support(sam_like)


# --------------------------------------------------------------------------- correspondence
def test_correspondence_peaks_at_query_on_identical_images(vit):
    img = images_from_dataset("phantom", None, {"n": 2, "size": 64}, n=1)
    pair = ImageSet(img.images * 2, ["query", "same"], img.value_range)
    points = [(5, 5), (40, 20), (60, 60), (0.3, 0.7)]
    res, display = patch_correspondence(vit, pair, points[:3], image_size=56)
    assert res.similarity.shape == (3, 1, 4, 4) and display.shape == (2, 56, 56, 3)
    assert np.array_equal(res.best[:, 0], res.query_patches)
    assert np.array_equal(res.query_patches, [[0, 0], [1, 2], [3, 3]])
    for i, (r, c) in enumerate(res.query_patches):
        assert res.similarity[i, 0, r, c] == pytest.approx(1.0, abs=1e-6)
    frac, _ = patch_correspondence(vit, pair, points[3:], image_size=56, fraction=True)
    assert np.array_equal(frac.query_patches, [[2, 1]])


def test_point_mapping_through_centre_crop():
    geo = _geometry((40, 60), "shortest_edge+center_crop", 28)  # 40x60 -> 28x42, crop 7 px each side
    assert point_to_patch((30, 20), geo, 28, 14) == ((1, 1), pytest.approx((14.35, 14.35)))
    with pytest.raises(ConfigError, match="centre crop"):
        point_to_patch((2, 20), geo, 28, 14)
    with pytest.raises(ConfigError, match="outside the query image"):
        point_to_patch((60, 5), geo, 28, 14)


# --------------------------------------------------------------------------- ranking
def test_average_ranks_with_ties():
    scores = pd.DataFrame({
        "dataset": ["a"] * 3 + ["b"] * 3 + ["s"] * 3,
        "family": ["classification"] * 6 + ["segmentation"] * 3,
        "metric": ["auroc"] * 6 + ["dice"] * 3,
        "backbone": ["x", "y", "z"] * 3,
        "score": [0.8, 0.8, 0.8, 0.9, 0.7, 0.7, 0.5, 0.6, 0.7],
        "protocol": "p", "variant": "v"})
    r = average_ranks(scores).average.set_index("backbone")
    assert r["classification_rank"].to_dict() == {"x": 1.5, "y": 2.25, "z": 2.25}
    assert r["segmentation_rank"].to_dict() == {"x": 3.0, "y": 2.0, "z": 1.0}


# --------------------------------------------------------------------------- CLI
PHANTOM = ["--dataset", "phantom", "-o", "n=6", "-o", "size=32"]


def test_cli_writes_pictures_and_numbers(tmp_path, capsys):
    base = ["--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--image-size", "28"]
    assert main(["analyze", "pca", *base, "--n", "3", "--out", str(tmp_path / "pca")]) == 0
    assert np.load(tmp_path / "pca" / "pca_rgb.npy").shape == (3, 2, 2, 3)
    assert main(["analyze", "attention", *base, "--n", "2", "--out", str(tmp_path / "att")]) == 0
    assert np.load(tmp_path / "att" / "attention.npy").shape == (2, 2, 2, 2)
    assert main(["analyze", "correspondence", *base, "--indices", "0,1,2", "--point", "3,3", "--point", "30,30",
                 "--out", str(tmp_path / "corr")]) == 0
    assert np.load(tmp_path / "corr" / "correspondence.npy").shape == (2, 2, 2, 2)
    assert len(pd.read_csv(tmp_path / "corr" / "correspondence.csv")) == 4
    assert main(["analyze", "cka", *base, "--n", "6", "--out", str(tmp_path / "cka")]) == 0
    cka = pd.read_csv(tmp_path / "cka" / "cka.csv", index_col=0)
    assert cka.shape == (4, 4) and np.allclose(np.diag(cka.to_numpy()), 1.0)  # no model B: A vs itself
    for sub in ("pca", "att", "corr", "cka"):
        pngs = list((tmp_path / sub).glob("*.png"))
        assert len(pngs) == 1 and pngs[0].stat().st_size > 3000 and pngs[0].with_suffix(".json").is_file()
    assert "random" in capsys.readouterr().out


def test_cli_cka_from_feature_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    np.savez(tmp_path / "a.npz", first=x, second=x @ rng.normal(size=(5, 5)))
    np.savez(tmp_path / "b.npz", only=x[:, :2])
    np.savez(tmp_path / "c.npz", short=x[:20])
    assert main(["analyze", "cka", "--features", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                 "--out", str(tmp_path / "o")]) == 0
    m = pd.read_csv(tmp_path / "o" / "cka.csv", index_col=0)
    assert list(m.index) == ["first", "second"] and list(m.columns) == ["only"]
    assert m.loc["first", "only"] == pytest.approx(_hand_cka(x, x[:, :2]))
    assert main(["analyze", "cka", "--features", str(tmp_path / "a.npz"), str(tmp_path / "c.npz"),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "different sample counts" in capsys.readouterr().err


def test_cli_arch_overrides_build_the_checkpoint_architecture(tmp_path):
    base = ["--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--image-size", "28", "--n", "6"]
    assert main(["analyze", "cka", *base, "--arch", "depth=2", "--out", str(tmp_path / "cka")]) == 0
    assert pd.read_csv(tmp_path / "cka" / "cka.csv", index_col=0).shape == (2, 2)  # 2 blocks, not the tiny 4
    assert main(["analyze", "cka", *base, "--arch-b", "depth=3", "--out", str(tmp_path / "ab")]) == 0
    assert pd.read_csv(tmp_path / "ab" / "cka.csv", index_col=0).shape == (4, 3)


@pytest.mark.parametrize("args, expected", [
    (["attention", "--backbone", "resnet18", "--tiny", *PHANTOM], "resnet18 is a CNN"),
    (["pca", "--backbone", "resnet18", "--tiny", *PHANTOM], "needs a vision transformer with patch tokens"),
    (["correspondence", "--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--n", "2", "--image-size", "28",
      "--point", "99,3"], "outside the query image"),
    (["correspondence", "--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--n", "1", "--image-size", "28",
      "--point", "3,3"], "at least one target image"),
    (["pca", "--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--image-size", "30"], "multiple of"),
    (["pca", "--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--images", "x.png"], "either --dataset"),
    (["pca", "--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--indices", "0,99"], "out of range"),
    (["cka", "--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--minibatch", "2"], "--minibatch"),
    (["pca", "--backbone", "dinov2_vits14", "--tiny", *PHANTOM, "--arch", "blocks=2"], "do not fit backbone"),
])
def test_cli_user_errors(tmp_path, capsys, args, expected):
    assert main(["analyze", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


# --------------------------------------------------------------------------- real data (skips when absent)
def test_real_data_pca_and_correspondence(shared_data, vit):
    from medprobe.analysis.pca import patch_pca
    xr = images_from_dataset("medmnist", shared_data / "medmnist" / "pneumoniamnist.npz", split="test", n=4)
    assert xr.value_range == (0.0, 255.0) and xr.images[0].shape == (28, 28)
    mri = images_from_files([shared_data / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"],
                            slices=[70, 90], slice_axis=2)
    # axial slices in the radiological layout: rows anterior->posterior (233), columns right->left (197)
    assert mri.names[1].endswith("[slice 90]") and mri.images[0].shape == (233, 197)
    for imgs in (xr, mri):
        res, display = patch_pca(vit, imgs, image_size=56)
        assert res.rgb.shape == (len(imgs), 4, 4, 3) and display.shape == (len(imgs), 56, 56, 3)
        assert 0 < res.foreground.mean() < 1  # the background threshold removed something
        h, w = imgs.images[0].shape
        corr, _ = patch_correspondence(vit, imgs, [(w // 2, h // 2)], image_size=56)
        assert corr.similarity.shape == (1, len(imgs) - 1, 4, 4) and np.isfinite(corr.similarity).all()
        assert (np.abs(corr.similarity) <= 1 + 1e-6).all()


def test_results_never_import_analysis():
    """Layering: the report (medprobe.results) uses the ranking computation from results/, not from analysis/."""
    import ast
    from pathlib import Path

    import medprobe.results
    offenders = []
    for path in Path(medprobe.results.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("medprobe.analysis")]
    assert offenders == []
