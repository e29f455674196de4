"""Unlabelled images for pretraining: any dataset adapter (labels ignored) or a folder of images.

A source gives, for an index, a (C, S, S) float tensor in [0, 1] (C = 1 grayscale, 3 RGB),
centre-cropped to a square and, when larger than ``image_size``, downscaled to it. Batches
are pure functions of (seed, step): the sample order of each epoch is a permutation drawn
from (seed, epoch) and each sample's views from (seed, step, position), so a resumed or
multi-process run sees exactly the same global batches as a single uninterrupted one.
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
from medprobe.pretrain.config import DataConfig
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


def open_source(cfg: DataConfig, image_size: int) -> ImageSource:
    """Build the image source of ``cfg``; :class:`ConfigError` for an empty or missing source."""
    value_range = tuple(cfg.value_range) if cfg.value_range else None
    if cfg.folder is not None:
        from medprobe.data.readers import read_image
        folder = Path(cfg.folder).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"data.folder {str(folder)!r} is not a folder")
        files = list_image_files(folder)
        if not files:
            raise ConfigError(f"data.folder {str(folder)!r} holds no images (looked recursively for "
                              f"{', '.join(FOLDER_EXTENSIONS)} and extension-less DICOM files)")
        loaders = [lambda p=p: read_image(p) for p in files]
        return ImageSource(loaders, [str(p) for p in files], value_range, image_size,
                           f"folder {folder} ({len(files)} images)")
    from medprobe.data.adapters import build_dataset
    dataset: ImageDataset = build_dataset(cfg.adapter, cfg.root, **cfg.options)
    if dataset.ndim != 2:
        raise ConfigError(f"data: adapter {cfg.adapter!r} gives {dataset.ndim}D volumes; pretraining takes 2D images")
    if cfg.split == "all":
        idx = list(range(len(dataset)))
    else:
        present = dataset.splits()
        if cfg.split not in present:
            raise ConfigError(f"data.split {cfg.split!r} is not in dataset {dataset.name!r} "
                              f"(splits: {', '.join(present) or 'none'}; or use 'all')")
        idx = [int(i) for i in dataset.indices(cfg.split)]
    if not idx:
        raise ConfigError(f"data: dataset {dataset.name!r} has no images in split {cfg.split!r}")
    if value_range is None:
        value_range = getattr(dataset, "value_range", None)
    loaders = [lambda i=i: dataset.load_image(i) for i in idx]
    names = [dataset.records[i].image_path or f"{dataset.name}:{dataset.records[i].key}" for i in idx]
    return ImageSource(loaders, names, value_range, image_size,
                       f"{cfg.adapter} {dataset.name} split {cfg.split} ({len(idx)} images)")


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


class BatchMaker:
    """Deterministic global batches, sliced for one process."""

    def __init__(self, source: ImageSource, augment: MultiCrop, batch_size: int, seed: int, grid: tuple[int, int],
                 mask_ratio: tuple[float, float], mask_probability: float, mean: tuple[float, ...],
                 std: tuple[float, ...], rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size {batch_size} must be divisible by the number of processes "
                              f"{world_size}")
        self.source, self.augment = source, augment
        self.batch_size, self.seed = batch_size, seed
        self.grid, self.mask_ratio, self.mask_probability = grid, mask_ratio, mask_probability
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.rank, self.world_size = rank, world_size
        self.local = batch_size // world_size
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng(_mix(self.seed, epoch, 1)).permutation(len(self.source)))
        return self._perm[1]

    def indices(self, step: int) -> list[int]:
        """Source indices of the global batch of ``step``."""
        n = len(self.source)
        out = []
        for p in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._order(p // n)[p % n]))
        return out

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
