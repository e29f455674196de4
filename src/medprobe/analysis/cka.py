"""Linear centered kernel alignment (CKA) between every pair of layers of two models.

Full CKA (Kornblith et al. 2019) with the linear kernel K = X X^T:
``CKA(X, Y) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)``, equal to
``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` for column-centred X_c, Y_c.

The minibatch variant (Nguyen et al. 2021) averages the *unbiased* HSIC estimator of
Song et al. (2012) over minibatches of k examples and forms CKA from the averages; it needs
memory for one minibatch only and converges to the population CKA as batches accumulate,
so it suits large sets (the biased full estimator would need n x n Gram matrices).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from medprobe.analysis.images import ImageSet, device_of, ensure_dir, prepare, write_caption
from medprobe.backbones.base import Backbone
from medprobe.errors import ConfigError

Token = Literal["cls", "mean", "flatten"]
FULL_CKA_MAX_N = 1024  # above this the CLI switches to the minibatch estimator by default


def _as_2d(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim < 2:
        raise ConfigError(f"{name}: features must be (n_samples, ...) with at least 2 dimensions, got shape "
                          f"{tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1).to(torch.float64)
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name}: features contain NaN or infinite values")
    return t


def _check_counts(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor], labels_a: Sequence[str],
                  labels_b: Sequence[str]) -> int:
    if not feats_a or not feats_b:
        raise ConfigError("CKA needs at least one layer in each feature set")
    counts = [(f"A/{lab}", f.shape[0]) for f, lab in zip(feats_a, labels_a)] + \
             [(f"B/{lab}", f.shape[0]) for f, lab in zip(feats_b, labels_b)]
    n = counts[0][1]
    bad = [(name, c) for name, c in counts if c != n]
    if bad:
        raise ConfigError(f"CKA compares representations of the same examples, but the feature sets have different "
                          f"sample counts: {counts[0][0]} has {n} samples, {bad[0][0]} has {bad[0][1]}. "
                          f"Extract both from the same images in the same order")
    return n


def linear_cka(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Full linear CKA between two representations (n, p) and (n, q) of the same n examples."""
    return float(cka_matrix([x], [y]).matrix[0, 0])


def _full_rep(x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A layer for the full CKA: centred features (when narrower than n) or the centred Gram matrix,
    with the Frobenius norm of X_c^T X_c (= that of the Gram matrix)."""
    xc = x - x.mean(dim=0, keepdim=True)
    if xc.shape[1] < xc.shape[0]:
        return "feat", xc, torch.linalg.matrix_norm(xc.T @ xc)
    k = xc @ xc.T
    return "gram", k, torch.linalg.matrix_norm(k)


def _full_pair(a: tuple[str, torch.Tensor, torch.Tensor], b: tuple[str, torch.Tensor, torch.Tensor]) -> float:
    """<K_a, K_b>_F / (||K_a|| ||K_b||) for centred linear kernels, in whichever form is cheaper."""
    (ka, da, na), (kb, db, nb) = a, b
    if na <= 0 or nb <= 0:
        return 0.0
    if ka == "feat" and kb == "feat":
        hsic = (db.T @ da).square().sum()
    elif ka == "gram" and kb == "gram":
        hsic = (da * db).sum()
    elif ka == "gram":
        hsic = ((da @ db) * db).sum()  # tr(Y^T K Y)
    else:
        hsic = ((db @ da) * da).sum()
    return float(hsic / (na * nb))


class MinibatchCKA:
    """Accumulates unbiased HSIC statistics over minibatches for every (layer of A, layer of B) pair."""

    def __init__(self) -> None:
        self.cross: torch.Tensor | None = None
        self.self_a: torch.Tensor | None = None
        self.self_b: torch.Tensor | None = None
        self.batches = 0
        self.samples = 0

    @staticmethod
    def _stats(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ks, sums, rows = [], [], []
        for f in feats:
            k = f @ f.T
            k.fill_diagonal_(0.0)
            ks.append(k.reshape(-1))
            sums.append(k.sum())
            rows.append(k.sum(dim=1))
        return torch.stack(ks), torch.stack(sums), torch.stack(rows)

    @staticmethod
    def _hsic(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
        ka, sa, ra = a
        kb, sb, rb = b
        return (ka @ kb.T + torch.outer(sa, sb) / ((n - 1) * (n - 2)) - (ra @ rb.T) * (2.0 / (n - 2))) / (n * (n - 3))

    def update(self, feats_a: Sequence[np.ndarray | torch.Tensor], feats_b: Sequence[np.ndarray | torch.Tensor]) -> None:
        """Add one minibatch: the same n >= 4 examples represented by every layer of A and of B."""
        fa = [_as_2d(f, f"A/layer {i}") for i, f in enumerate(feats_a)]
        fb = [_as_2d(f, f"B/layer {i}") for i, f in enumerate(feats_b)]
        n = _check_counts(fa, fb, [str(i) for i in range(len(fa))], [str(i) for i in range(len(fb))])
        if n < 4:
            raise ConfigError(f"the unbiased minibatch CKA needs at least 4 examples per minibatch, got {n}")
        sa, sb = self._stats(fa), self._stats(fb)
        cross, self_a = self._hsic(sa, sb, n), torch.diagonal(self._hsic(sa, sa, n))
        self_b = torch.diagonal(self._hsic(sb, sb, n))
        if self.cross is None:
            self.cross, self.self_a, self.self_b = cross, self_a, self_b
        else:
            if cross.shape != self.cross.shape:
                raise ConfigError(f"minibatch has {cross.shape} layer pairs, earlier ones had {tuple(self.cross.shape)}")
            self.cross, self.self_a, self.self_b = self.cross + cross, self.self_a + self_a, self.self_b + self_b
        self.batches += 1
        self.samples += n

    def result(self) -> np.ndarray:
        """The CKA matrix (layers of A, layers of B) from the averaged HSIC estimates."""
        if self.cross is None:
            raise ConfigError("no minibatch was added")
        denom = torch.sqrt(torch.clamp(torch.outer(self.self_a, self.self_b), min=0.0))
        out = torch.where(denom > 0, self.cross / torch.where(denom > 0, denom, 1.0), torch.zeros_like(denom))
        return out.numpy()


@dataclass
class CKAResult:
    """CKA between every layer of A (rows) and every layer of B (columns)."""

    matrix: np.ndarray
    labels_a: list[str]
    labels_b: list[str]
    n: int
    method: str  # "full" or "minibatch(k=..., batches=...)"
    name_a: str = "A"
    name_b: str = "B"


def minibatches(n: int, size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Random minibatches of ``size`` indices out of n (a last batch smaller than 4 is dropped)."""
    if size < 4:
        raise ConfigError(f"the minibatch size of the unbiased CKA must be >= 4, got {size}")
    order = np.random.default_rng(seed).permutation(n)
    for s in range(0, n, size):
        batch = order[s:s + size]
        if len(batch) >= 4:
            yield np.sort(batch)


def cka_matrix(feats_a: Sequence[np.ndarray | torch.Tensor], feats_b: Sequence[np.ndarray | torch.Tensor], *,
               labels_a: Sequence[str] | None = None, labels_b: Sequence[str] | None = None,
               minibatch: int | None = None, seed: int = 0) -> CKAResult:
    """Linear CKA between every layer of A and of B; features are (n, ...) arrays of the same n examples.

    ``minibatch=None`` computes the full CKA; an integer k uses the unbiased minibatch estimator
    over random minibatches of k examples (seeded by ``seed``).
    """
    labels_a = list(labels_a or [f"layer {i}" for i in range(len(feats_a))])
    labels_b = list(labels_b or [f"layer {i}" for i in range(len(feats_b))])
    fa = [_as_2d(f, f"A/{lab}") for f, lab in zip(feats_a, labels_a)]
    fb = [_as_2d(f, f"B/{lab}") for f, lab in zip(feats_b, labels_b)]
    n = _check_counts(fa, fb, labels_a, labels_b)
    if minibatch:
        if n < 4:
            raise ConfigError(f"the unbiased minibatch CKA needs at least 4 examples, got {n}")
        acc = MinibatchCKA()
        for idx in minibatches(n, min(minibatch, n), seed):
            t = torch.from_numpy(idx)
            acc.update([f[t] for f in fa], [f[t] for f in fb])
        return CKAResult(acc.result(), labels_a, labels_b, n, f"minibatch(k={min(minibatch, n)}, "
                                                               f"batches={acc.batches})")
    if n < 2:
        raise ConfigError(f"CKA needs at least 2 examples, got {n}")
    ra, rb = [_full_rep(f) for f in fa], [_full_rep(f) for f in fb]
    matrix = np.array([[_full_pair(a, b) for b in rb] for a in ra])
    return CKAResult(matrix, labels_a, labels_b, n, "full")


# --------------------------------------------------------------------------- from backbones
@torch.no_grad()
def layer_representations(backbone: Backbone, inputs: torch.Tensor, token: Token = "cls",
                          batch_size: int = 32) -> list[torch.Tensor]:
    """One (n, d) representation per block of ``backbone``: the CLS (pooled) token, the mean patch
    token, or all patch tokens flattened (``token``)."""
    if token not in ("cls", "mean", "flatten"):
        raise ConfigError(f"token must be cls, mean or flatten, got {token!r}")
    blocks = list(range(backbone.num_blocks))
    dev = device_of(backbone)
    per_block: list[list[torch.Tensor]] = [[] for _ in blocks]
    for s in range(0, len(inputs), batch_size):
        out = backbone.forward_tokens(inputs[s:s + batch_size].to(dev), blocks=blocks)
        for j, b in enumerate(out.blocks):
            rep = b.cls if token == "cls" else b.mean_patch if token == "mean" else b.patch_grid.flatten(1)
            per_block[j].append(rep.float().cpu())
    return [torch.cat(p) for p in per_block]


def _subset(images: ImageSet, idx: Sequence[int]) -> ImageSet:
    return ImageSet([images.images[i] for i in idx], [images.names[i] for i in idx], images.value_range,
                    images.source)


def cka_between(backbone_a: Backbone, backbone_b: Backbone, images: ImageSet, *, image_size: int | None = None,
                image_size_b: int | None = None, token: Token = "cls", minibatch: int | None = None, seed: int = 0,
                batch_size: int = 32) -> CKAResult:
    """Layer-by-layer CKA of two backbones (or one before and after fine-tuning) on the same images.

    Each backbone sees the images with its own preprocessing. With ``minibatch`` the images are
    streamed in random minibatches, so memory does not grow with the number of images.
    """
    if len(images) < 2:
        raise ConfigError(f"CKA needs at least 2 images, got {len(images)}")
    size_b = image_size_b or image_size
    labels_a = [f"block {i}" for i in range(backbone_a.num_blocks)]
    labels_b = [f"block {i}" for i in range(backbone_b.num_blocks)]

    def reps(idx: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        sub = _subset(images, idx)
        ra = layer_representations(backbone_a, prepare(backbone_a, sub, image_size).inputs, token, batch_size)
        rb = layer_representations(backbone_b, prepare(backbone_b, sub, size_b).inputs, token, batch_size)
        return ra, rb

    if minibatch:
        acc = MinibatchCKA()
        k = min(minibatch, len(images))
        for idx in minibatches(len(images), k, seed):
            acc.update(*reps(idx))
        result = CKAResult(acc.result(), labels_a, labels_b, len(images), f"minibatch(k={k}, batches={acc.batches})")
    else:
        ra, rb = reps(range(len(images)))
        result = cka_matrix(ra, rb, labels_a=labels_a, labels_b=labels_b)
    result.name_a = f"{backbone_a.name} ({backbone_a.weights_tag})"
    result.name_b = f"{backbone_b.name} ({backbone_b.weights_tag})"
    return result


def load_feature_file(path: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """Layers from ``.npz`` (one (n, ...) array per key, in file order) or ``.npy`` (L, n, ...)."""
    from medprobe.errors import DataError
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: feature file not found")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.files)
                return [np.asarray(z[k]) for k in names], names
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
            if arr.ndim < 3:
                raise DataError(f"{p}: a .npy feature file must be (layers, n_samples, ...), got shape {arr.shape}")
            return list(arr), [f"layer {i}" for i in range(len(arr))]
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read features: {e}") from None
    raise DataError(f"{p}: feature files must be .npz (one array per layer) or .npy (layers, n, ...)")


# --------------------------------------------------------------------------- output
def plot_cka(result: CKAResult, path: Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    la, lb = len(result.labels_a), len(result.labels_b)
    fig, ax = plt.subplots(figsize=(min(10, 2.5 + 0.28 * lb), min(9, 2.0 + 0.28 * la)))
    im = ax.imshow(result.matrix, origin="lower", vmin=0, vmax=1, cmap="magma", aspect="auto")
    step_a, step_b = max(1, la // 12), max(1, lb // 12)
    ax.set_yticks(range(0, la, step_a), [result.labels_a[i] for i in range(0, la, step_a)], fontsize=7)
    ax.set_xticks(range(0, lb, step_b), [result.labels_b[i] for i in range(0, lb, step_b)], fontsize=7, rotation=45,
                  ha="right")
    ax.set_ylabel(result.name_a, fontsize=8)
    ax.set_xlabel(result.name_b, fontsize=8)
    fig.colorbar(im, ax=ax, label="linear CKA", fraction=0.046)
    import textwrap
    ax.set_title("\n".join(textwrap.wrap(title or f"linear CKA, {result.method}, n = {result.n}", 60)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_cka(result: CKAResult, out_dir: str | Path, *, title: str = "", stem: str = "cka") -> dict[str, Path]:
    """Write ``<stem>.png`` (heat map), ``<stem>.csv`` (labelled matrix) and ``<stem>.npy``."""
    import pandas as pd
    out = ensure_dir(out_dir)
    title = title or f"linear CKA: {result.name_a} vs {result.name_b} ({result.method}, n = {result.n})"
    files = {"png": plot_cka(result, out / f"{stem}.png", title), "npy": out / f"{stem}.npy",
             "csv": out / f"{stem}.csv"}
    np.save(files["npy"], result.matrix)
    pd.DataFrame(result.matrix, index=result.labels_a, columns=result.labels_b).to_csv(files["csv"])
    files["caption"] = write_caption(files["png"], title, "Linear CKA between every layer of model A (rows) and "
                                     "model B (columns); 1 = identical up to rotation and scale.",
                                     model_a=result.name_a, model_b=result.name_b, n=result.n, method=result.method)
    return files
