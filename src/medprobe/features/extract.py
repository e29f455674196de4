"""Batched feature extraction into a :class:`FeatureStore` (computed once, then reused)."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medprobe import __version__
from medprobe.backbones.base import Backbone
from medprobe.data.base import ImageDataset
from medprobe.data.preprocess import Preprocessor
from medprobe.errors import ConfigError
from medprobe.features.store import FeatureStore, StoreWriter, open_store, store_key
from medprobe.runtime import autocast, default_device, resolve_precision

FORMAT_VERSION = 1


@dataclass
class ExtractResult:
    store: FeatureStore
    reused: bool
    seconds: float
    items: int

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


def preprocessor_for(backbone: Backbone, dataset: ImageDataset, image_size: int | None) -> Preprocessor:
    size = int(image_size or backbone.default_image_size)
    if backbone.patch_size and size % backbone.patch_size:
        raise ConfigError(f"image size {size} is not a multiple of {backbone.name}'s patch size {backbone.patch_size}; "
                          f"use e.g. {size - size % backbone.patch_size or backbone.patch_size}")
    return Preprocessor(backbone.preprocess, size, getattr(dataset, "value_range", None))


def iter_items(dataset: ImageDataset, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray, str]]:
    """Yield (owner position, 2D image, source) for every image, or every slice of every volume."""
    for pos, i in enumerate(indices):
        image = dataset.load_image(int(i))
        src = dataset.records[int(i)].image_path or dataset.records[int(i)].key
        if dataset.ndim == 3:
            for z in range(image.shape[0]):
                yield pos, image[z], f"{src}[slice {z}]"
        else:
            yield pos, image, src


def _batches(dataset: ImageDataset, indices: Sequence[int], pre: Preprocessor, batch_size: int
             ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    owners, images, sources = [], [], []
    for owner, image, src in iter_items(dataset, indices):
        owners.append(owner)
        images.append(image)
        sources.append(src)
        if len(images) == batch_size:
            yield np.asarray(owners), pre(images, sources)
            owners, images, sources = [], [], []
    if images:
        yield np.asarray(owners), pre(images, sources)


def prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``iterator`` in a background thread (reading and preprocessing overlap the forward)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:  # hand errors to the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def store_identity(backbone: Backbone, dataset: ImageDataset, pre: Preprocessor, blocks: Sequence[int],
                   patch_blocks: Sequence[int], precision: str) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "backbone": backbone.name, "weights": backbone.weights_tag,
            "tiny": bool(getattr(backbone, "tiny", False)), "overrides": getattr(backbone, "overrides", {}),
            "preprocess": pre.describe(), "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint(),
            "blocks": list(blocks), "patch_blocks": list(patch_blocks), "precision": precision}


def extract_features(backbone: Backbone, dataset: ImageDataset, cache_dir: str | Path, *,
                     image_size: int | None = None, last_blocks: int = 4, patch_blocks: Sequence[int] = (),
                     precision: str = "auto", batch_size: int = 64, device: torch.device | None = None,
                     progress: bool = True, force: bool = False) -> ExtractResult:
    """Embed every split of ``dataset`` with ``backbone`` and store the tokens.

    Stores CLS and mean-patch tokens of the last ``last_blocks`` blocks (and the patch grids
    of ``patch_blocks``, float16). An identical earlier call is reused unless ``force``.
    3D datasets are embedded slice by slice, in batches that span volumes.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    device = device or default_device()
    precision = resolve_precision(precision, device)
    pre = preprocessor_for(backbone, dataset, image_size)
    blocks = backbone.resolve_blocks(range(-min(last_blocks, backbone.num_blocks), 0))
    patch_blocks = backbone.resolve_blocks(patch_blocks)
    identity = store_identity(backbone, dataset, pre, blocks, patch_blocks, precision)
    final_dir = Path(cache_dir) / f"{backbone.name}-{store_key(identity)}"
    t0 = time.perf_counter()
    if not force:
        existing = open_store(final_dir)
        if existing is not None:
            return ExtractResult(existing, True, time.perf_counter() - t0, 0)

    splits = dataset.splits()
    meta = dict(identity, medprobe=__version__, volumetric=dataset.ndim == 3, task=dataset.task.kind,
                class_names=list(dataset.task.class_names), splits={})
    writer = StoreWriter(final_dir, meta)
    backbone = backbone.to(device).eval()
    wanted = sorted(set(blocks) | set(patch_blocks))
    n_items = 0
    try:
        bar = tqdm(total=None if dataset.ndim == 3 else len(dataset), unit="img", disable=not progress,
                   desc=f"extract {backbone.name}", dynamic_ncols=True)
        for split in splits:
            idx = dataset.indices(split)
            recs = [dataset.records[i] for i in idx]
            meta["splits"][split] = {"n": len(idx), "keys": [r.key for r in recs],
                                     "patient_ids": [r.patient_id for r in recs],
                                     "metadata": [r.metadata for r in recs]}
            if dataset.task.kind not in ("none", "segmentation"):
                writer.put(split, "labels", dataset.labels(idx))
            chunks: dict[str, list[np.ndarray]] = {}
            start = 0
            for owners, batch in prefetch(_batches(dataset, idx, pre, batch_size)):
                with torch.inference_mode(), autocast(precision, device):
                    out = backbone.forward_tokens(batch.to(device, non_blocking=True), blocks=wanted)
                values = {"item_owner": owners}
                for b in out.blocks:
                    if b.index in blocks:
                        values[f"cls.{b.index}"] = b.cls.float().cpu().numpy()
                        values[f"mean.{b.index}"] = b.mean_patch.float().cpu().numpy()
                    if b.index in patch_blocks:
                        values[f"patch.{b.index}"] = b.patch_grid.to(torch.float16).cpu().numpy()
                for name, v in values.items():
                    if dataset.ndim == 3:  # slice counts unknown up front: keep per split, then write
                        chunks.setdefault(name, []).append(v)
                    else:
                        if not writer.has(split, name):
                            writer.allocate(split, name, (len(idx), *v.shape[1:]), str(v.dtype))
                        writer.write(split, name, start, v)
                start += len(owners)
                n_items += len(owners)
                bar.update(len(owners))
            for name, parts in chunks.items():
                writer.put(split, name, np.concatenate(parts))
        bar.close()
        store = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ExtractResult(store, False, time.perf_counter() - t0, n_items)
