"""Unlabelled images for pretraining: any dataset adapter (labels ignored) or a folder of images,
or a weighted mixture of several.

A source gives, for an index, a (C, S, S) float tensor in [0, 1] (C = 1 grayscale, 3 RGB),
centre-cropped to a square and, when larger than ``image_size``, downscaled to it. Batches
are pure functions of (seed, step): the sample order of each epoch is a permutation drawn
from (seed, epoch) and each sample's views from (seed, step, position), so a resumed or
multi-process run sees exactly the same global batches as a single uninterrupted one.

With several sources (:class:`MixtureSampler`), the number of images each source gives to a
batch is drawn from a multinomial with the sources' weights (from (seed, step)); within a
source, images follow that source's own sequence of per-pass permutations. The sampler's
state, how many images each source has given before a step, is saved in every checkpoint.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medprobe.data.base import ImageDataset
from medprobe.data.preprocess import scale_intensity
from medprobe.errors import ConfigError, DataError
from medprobe.pretrain.augment import MultiCrop
from medprobe.pretrain.config import DataConfig, SourceConfig
from medprobe.pretrain.masking import batch_masks

FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".ima", ".npy")


def _is_dicom_without_extension(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def list_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; hidden files skipped; extension-less DICOM included)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        suffix = p.suffix.lower()
        if suffix in FOLDER_EXTENSIONS or (suffix == "" and _is_dicom_without_extension(p)):
            out.append(p)
    return out


class ImageSource:
    """Indexable unlabelled 2D images as square [0, 1] tensors."""

    def __init__(self, loaders: list, names: list[str], value_range: tuple[float, float] | None,
                 image_size: int, description: str) -> None:
        self._loaders = loaders
        self.names = names
        self.value_range = value_range
        self.image_size = int(image_size)
        self.description = description

    def __len__(self) -> int:
        return len(self._loaders)

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` as (C, S, S) in [0, 1], S <= image_size."""
        name = self.names[index]
        image = np.asarray(self._loaders[index](), dtype=np.float32)
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = image[..., :3]
        elif image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim != 2 and not (image.ndim == 3 and image.shape[-1] == 3):
            raise DataError(f"{name}: expected a 2D image (H, W) or (H, W, 3), got shape {image.shape}; "
                            f"pretraining takes 2D images only")
        if not np.isfinite(image).all():
            raise DataError(f"{name}: contains NaN or infinite pixel values")
        image = scale_intensity(image, self.value_range)
        t = torch.from_numpy(np.ascontiguousarray(image))
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        if t.shape[0] == 3 and torch.equal(t[0], t[1]) and torch.equal(t[0], t[2]):
            t = t[:1]  # an RGB-encoded grayscale image
        h, w = t.shape[-2:]
        side = min(h, w)
        t = t[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        if side > self.image_size:
            t = F.interpolate(t[None], size=(self.image_size,) * 2, mode="bilinear", align_corners=False,
                              antialias=True)[0].clamp_(0, 1)
        return t.contiguous()


def open_source(cfg: SourceConfig | DataConfig, image_size: int, where: str = "data") -> ImageSource:
    """Build the image source of ``cfg``; :class:`ConfigError` for an empty or missing source."""
    value_range = tuple(cfg.value_range) if cfg.value_range else None
    if cfg.folder is not None:
        from medprobe.data.readers import read_image
        folder = Path(cfg.folder).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{where}.folder {str(folder)!r} is not a folder")
        files = list_image_files(folder)
        if not files:
            raise ConfigError(f"{where}.folder {str(folder)!r} holds no images (looked recursively for "
                              f"{', '.join(FOLDER_EXTENSIONS)} and extension-less DICOM files)")
        loaders = [lambda p=p: read_image(p) for p in files]
        return ImageSource(loaders, [str(p) for p in files], value_range, image_size,
                           f"folder {folder} ({len(files)} images)")
    from medprobe.data.adapters import build_dataset
    dataset: ImageDataset = build_dataset(cfg.adapter, cfg.root, **cfg.options)
    if dataset.ndim != 2:
        raise ConfigError(f"{where}: adapter {cfg.adapter!r} gives {dataset.ndim}D volumes; pretraining takes 2D images")
    if cfg.split == "all":
        idx = list(range(len(dataset)))
    else:
        present = dataset.splits()
        if cfg.split not in present:
            raise ConfigError(f"{where}.split {cfg.split!r} is not in dataset {dataset.name!r} "
                              f"(splits: {', '.join(present) or 'none'}; or use 'all')")
        idx = [int(i) for i in dataset.indices(cfg.split)]
    if not idx:
        raise ConfigError(f"{where}: dataset {dataset.name!r} has no images in split {cfg.split!r}")
    if value_range is None:
        value_range = getattr(dataset, "value_range", None)
    loaders = [lambda i=i: dataset.load_image(i) for i in idx]
    names = [dataset.records[i].image_path or f"{dataset.name}:{dataset.records[i].key}" for i in idx]
    return ImageSource(loaders, names, value_range, image_size,
                       f"{cfg.adapter} {dataset.name} split {cfg.split} ({len(idx)} images)")


class MixedSource:
    """Several :class:`ImageSource` objects; images are addressed by (source, index)."""

    def __init__(self, sources: list[ImageSource], weights: list[float]) -> None:
        self.sources = sources
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]

    @property
    def sizes(self) -> list[int]:
        return [len(s) for s in self.sources]

    def __len__(self) -> int:
        return sum(self.sizes)

    def load(self, key: tuple[int, int] | int) -> torch.Tensor:
        s, i = key if isinstance(key, tuple) else (0, key)
        return self.sources[s].load(i)

    @property
    def description(self) -> str:
        return "; ".join(f"{s.description} weight {w:.3g}" for s, w in zip(self.sources, self.weights))


def open_sources(cfg: DataConfig, image_size: int) -> MixedSource:
    """All sources of ``cfg.data`` (one for the single-source form) with their normalised weights."""
    listed = cfg.source_list()
    where = ["data"] if cfg.sources is None else [f"data.sources[{i}]" for i in range(len(listed))]
    return MixedSource([open_source(c, image_size, w) for c, w in zip(listed, where)], [c.weight for c in listed])


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (deterministic, order-sensitive)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class Batch:
    """One process's share of a global batch (crop-major, as DINOv2's collate)."""

    globals: torch.Tensor  # (2 * b, 3, G, G): view 1 of every image, then view 2
    locals: torch.Tensor   # (n_local * b, 3, L, L), or (0, 3, L, L)
    masks: torch.Tensor    # (2 * b, N) bool, rows aligned with ``globals``
    step: int


class MixtureSampler:
    """Which (source, index) fills each position of the global batch of a step.

    One source: the order of each pass is a permutation drawn from (seed, pass). Several:
    the per-source counts of a step are multinomial(batch, weights) drawn from (seed, step),
    their positions shuffled; source s's q-th image is the (q mod n_s)-th of its permutation
    for pass q // n_s. :meth:`drawn` (the images each source gave before a step) is the state
    a resumed run restores (:meth:`state_dict` / :meth:`load_state_dict`).
    """

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int) -> None:
        self.sizes, self.weights = list(sizes), np.asarray(weights, dtype=np.float64)
        self.batch_size, self.seed = batch_size, seed
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._base = (0, np.zeros(len(sizes), dtype=np.int64))
        self._at = self._base

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            seed = _mix(self.seed, epoch, 1) if len(self.sizes) == 1 else _mix(self.seed, epoch, 7, source)
            self._perms[key] = np.random.default_rng(seed).permutation(self.sizes[source])
        return self._perms[key]

    def _layout(self, step: int) -> np.ndarray:
        """The source of each batch position of ``step``."""
        if len(self.sizes) == 1:
            return np.zeros(self.batch_size, dtype=np.int64)
        rng = np.random.default_rng(_mix(self.seed, step, 6))
        counts = rng.multinomial(self.batch_size, self.weights)
        return rng.permutation(np.repeat(np.arange(len(self.sizes)), counts))

    def drawn(self, step: int) -> np.ndarray:
        """Images each source gave to steps 0..step-1."""
        if len(self.sizes) == 1:
            return np.array([step * self.batch_size], dtype=np.int64)
        at_step, counts = self._at if self._at[0] <= step else self._base
        if at_step > step:
            at_step, counts = 0, np.zeros(len(self.sizes), dtype=np.int64)
        counts = counts.copy()
        for t in range(at_step, step):
            counts += np.bincount(self._layout(t), minlength=len(self.sizes))
        self._at = (step, counts)
        return counts.copy()

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(source, index) of every position of the global batch of ``step``."""
        layout = self._layout(step)
        q = self.drawn(step)
        out = []
        for s in layout.tolist():
            n = self.sizes[s]
            out.append((s, int(self._perm(s, int(q[s]) // n)[int(q[s]) % n])))
            q[s] += 1
        return out

    def state_dict(self, step: int) -> dict[str, list[int] | int]:
        return {"step": int(step), "drawn": [int(c) for c in self.drawn(step)], "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ConfigError(f"the data sources changed size since the checkpoint (was {state['sizes']} images, "
                              f"now {self.sizes}); use another output_dir or start over with --no-resume")
        self._base = (int(state["step"]), np.asarray(state["drawn"], dtype=np.int64))
        self._at = self._base


class BatchMaker:
    """Deterministic global batches, sliced for one process."""

    def __init__(self, source: ImageSource | MixedSource, augment: MultiCrop, batch_size: int, seed: int,
                 grid: tuple[int, int], mask_ratio: tuple[float, float], mask_probability: float,
                 mean: tuple[float, ...], std: tuple[float, ...], rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size {batch_size} must be divisible by the number of processes "
                              f"{world_size}")
        if not isinstance(source, MixedSource):
            source = MixedSource([source], [1.0])
        self.source, self.augment = source, augment
        self.batch_size, self.seed = batch_size, seed
        self.sampler = MixtureSampler(source.sizes, source.weights, batch_size, seed)
        self.grid, self.mask_ratio, self.mask_probability = grid, mask_ratio, mask_probability
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.rank, self.world_size = rank, world_size
        self.local = batch_size // world_size

    def indices(self, step: int) -> list[tuple[int, int]]:
        """(source, index) of the global batch of ``step``."""
        return self.sampler.indices(step)

    def _normalise(self, views: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack([v.expand(3, -1, -1) for v in views])
        return (x - self.mean) / self.std

    def make(self, step: int) -> Batch:
        idx = self.indices(step)
        lo = self.rank * self.local
        mine = range(lo, lo + self.local)
        g1, g2, locs = [], [], []
        for pos in mine:
            views = self.augment(self.source.load(idx[pos]), random.Random(_mix(self.seed, step, pos, 2)))
            g1.append(views.globals[0])
            g2.append(views.globals[1])
            locs.append(views.locals)
        n_local = len(locs[0]) if locs else 0
        local_views = [locs[i][j] for j in range(n_local) for i in range(len(locs))]  # crop-major
        h, w = self.grid
        all_masks = batch_masks(2 * self.batch_size, h, w, self.mask_ratio, self.mask_probability,
                                random.Random(_mix(self.seed, step, 3)))
        all_masks = all_masks.reshape(2, self.batch_size, h * w)[:, lo:lo + self.local].reshape(-1, h * w)
        size = self.augment.crops.local_size
        return Batch(globals=self._normalise(g1 + g2),
                     locals=self._normalise(local_views) if local_views else torch.zeros(0, 3, size, size),
                     masks=torch.from_numpy(np.ascontiguousarray(all_masks)), step=step)


class _Steps(torch.utils.data.Dataset):
    """Step ``start + i`` -> its batch (lets a DataLoader build batches in worker processes)."""

    def __init__(self, maker: BatchMaker, start: int, stop: int) -> None:
        self.maker, self.start, self.stop = maker, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> Batch:
        return self.maker.make(self.start + i)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # many tiny ops: one thread each avoids contention with the training process


def iterate_batches(maker: BatchMaker, start: int, stop: int, workers: int = 0) -> Iterator[Batch]:
    """Batches of steps ``start..stop-1``, built in ``workers`` background processes (0 = in this process).

    Every batch is a pure function of its step, so the number of workers never changes the result.
    """
    if workers <= 0:
        for step in range(start, stop):
            yield maker.make(step)
        return
    import multiprocessing
    context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None  # loaders need not pickle
    loader = torch.utils.data.DataLoader(_Steps(maker, start, stop), batch_size=None, shuffle=False,
                                         num_workers=workers, worker_init_fn=_worker_init, prefetch_factor=2,
                                         multiprocessing_context=context)
    yield from loader
