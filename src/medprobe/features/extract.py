"""Batched feature extraction into a :class:`FeatureStore` (computed once, then reused).

Images are read, decoded and resized in DataLoader worker processes (default: one per CPU
available), batches arrive in order (pinned, copied without blocking when on CUDA), and the
tokens are appended to the store, whose progress is committed every ``commit_every`` items:
a rerun after a kill continues from the last commit and ends with the same store.
"""
from __future__ import annotations

import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medprobe import __version__
from medprobe.backbones.base import Backbone
from medprobe.data.base import ImageDataset
from medprobe.data.preprocess import Preprocessor
from medprobe.errors import ConfigError, MedprobeError
from medprobe.features.store import STORE_FORMAT, FeatureStore, StoreWriter, find_store, open_store, store_key
from medprobe.progress import ProgressBar
from medprobe.runtime import autocast, default_device, resolve_precision

FORMAT_VERSION = STORE_FORMAT
COMMIT_EVERY = 2048


@dataclass
class ExtractResult:
    store: FeatureStore
    reused: bool
    seconds: float
    items: int
    resumed_from: int = 0  # items already committed by an interrupted earlier run

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


def preprocessor_for(backbone: Backbone, dataset: ImageDataset, image_size: int | None) -> Preprocessor:
    size = int(image_size or backbone.default_image_size)
    if backbone.patch_size and size % backbone.patch_size:
        raise ConfigError(f"image size {size} is not a multiple of {backbone.name}'s patch size {backbone.patch_size}; "
                          f"use e.g. {size - size % backbone.patch_size or backbone.patch_size}")
    return Preprocessor(backbone.preprocess, size, getattr(dataset, "value_range", None))


def default_workers() -> int:
    """DataLoader workers: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- the input pipeline
class _Items(torch.utils.data.Dataset):
    """Positions in one split -> prepared inputs; runs in the workers.

    2D: one (3, S, S) image per position. 3D: all slices of one volume, (D, 3, S, S).
    A :class:`MedprobeError` is returned, not raised, so that the main process re-raises it
    with its own message (the DataLoader would wrap it in a worker traceback).
    """

    def __init__(self, dataset: ImageDataset, indices: Sequence[int], pre: Preprocessor) -> None:
        self.dataset, self.indices, self.pre = dataset, np.asarray(indices, dtype=np.int64), pre

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int) -> tuple[int, torch.Tensor | MedprobeError]:
        i = int(self.indices[pos])
        try:
            image = self.dataset.load_image(i)
            rec = self.dataset.records[i]
            src = rec.image_path or rec.key
            if self.dataset.ndim == 3:
                return pos, torch.stack([self.pre.prepare(image[z], f"{src}[slice {z}]")
                                         for z in range(image.shape[0])])
            return pos, self.pre.prepare(image, src)
        except MedprobeError as e:
            return pos, e


def _collate(items: list[tuple[int, Any]]) -> tuple[np.ndarray, torch.Tensor] | MedprobeError:
    for _, x in items:
        if isinstance(x, MedprobeError):
            return x
    return np.asarray([p for p, _ in items], dtype=np.int64), torch.stack([x for _, x in items])


def _first(item: Any) -> Any:
    return item


def input_batches(dataset: ImageDataset, indices: Sequence[int], pre: Preprocessor, batch_size: int, *,
                  start: int = 0, end: int | None = None, workers: int | None = None, pin_memory: bool = False
                  ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """2D images ``indices[start:end]`` as (positions, (B, 3, S, S) inputs), in order.

    Batches are aligned on ``start + k * batch_size``: a run resumed at a multiple of
    ``batch_size`` sees the same batches as an uninterrupted one.
    """
    workers = default_workers() if workers is None else int(workers)
    batches = _Batches(start, len(indices) if end is None else end, batch_size)
    loader = torch.utils.data.DataLoader(_Items(dataset, indices, pre), batch_sampler=batches, collate_fn=_collate,
                                         num_workers=_useful(workers, len(batches)), pin_memory=pin_memory)
    return _raise_errors(loader)


class _Batches:
    """Position batches ``[start + k b, start + (k + 1) b)`` up to ``end``, made on the fly (O(batch) memory)."""

    def __init__(self, start: int, end: int, batch_size: int) -> None:
        self.start, self.end, self.batch_size = start, max(start, end), batch_size

    def __len__(self) -> int:
        return math.ceil((self.end - self.start) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.start, self.end, self.batch_size):
            yield list(range(i, min(i + self.batch_size, self.end)))


def volume_batches(dataset: ImageDataset, indices: Sequence[int], pre: Preprocessor, batch_size: int, *,
                   first_volume: int = 0, end_volume: int | None = None, skip_slices: int = 0,
                   workers: int | None = None, pin_memory: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Slices of the volumes ``indices[first_volume:end_volume]`` (less the first ``skip_slices``) in batches."""
    workers = default_workers() if workers is None else int(workers)
    items = _Items(dataset, indices, pre)
    end = len(items) if end_volume is None else end_volume
    kwargs: dict[str, Any] = dict(num_workers=_useful(workers, end - first_volume), pin_memory=pin_memory)
    loader = torch.utils.data.DataLoader(items, batch_size=None, sampler=range(first_volume, end),
                                         collate_fn=_first, **kwargs)
    return _rebatch(loader, batch_size, skip_slices)


def _useful(workers: int, tasks: int) -> int:
    """Worker processes worth starting for ``tasks`` batches or volumes (none for a single one)."""
    return min(workers, tasks) if tasks > 1 else 0


def _raise_errors(loader: Any) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    for batch in loader:
        if isinstance(batch, MedprobeError):
            raise batch
        yield batch


def _rebatch(loader: Any, batch_size: int, skip: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Volumes' slices -> batches of ``batch_size`` slices (spanning volumes), O(volume + batch) memory."""
    owners: list[np.ndarray] = []
    parts: list[torch.Tensor] = []
    held = 0
    for pos, slices in loader:
        if isinstance(slices, MedprobeError):
            raise slices
        if skip:
            slices, skip = slices[skip:], 0
        while len(slices):
            take = min(batch_size - held, len(slices))
            owners.append(np.full(take, pos, dtype=np.int64))
            parts.append(slices[:take])
            slices, held = slices[take:], held + take
            if held == batch_size:
                yield np.concatenate(owners), torch.cat(parts)
                owners, parts, held = [], [], 0
    if held:
        yield np.concatenate(owners), torch.cat(parts)


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


# --------------------------------------------------------------------------- identity
def store_identity(backbone: Backbone, dataset: ImageDataset, pre: Preprocessor, blocks: Sequence[int],
                   patch_blocks: Sequence[int], precision: str) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "backbone": backbone.name, "weights": backbone.weights_tag,
            "tiny": bool(getattr(backbone, "tiny", False)), "overrides": getattr(backbone, "overrides", {}),
            "preprocess": pre.describe(), "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint(),
            "blocks": list(blocks), "patch_blocks": list(patch_blocks), "precision": precision}


def _base_key(identity: dict[str, Any]) -> str:
    """Digest of everything but the blocks kept: stores differing only there share a name prefix."""
    return store_key({k: v for k, v in identity.items() if k not in ("blocks", "patch_blocks")})[:12]


def store_name(backbone_name: str, identity: dict[str, Any]) -> str:
    return f"{backbone_name}-{_base_key(identity)}-{store_key(identity)[:8]}"


# --------------------------------------------------------------------------- extraction
def extract_features(backbone: Backbone, dataset: ImageDataset, cache_dir: str | Path, *,
                     image_size: int | None = None, last_blocks: int = 4, patch_blocks: Sequence[int] = (),
                     precision: str = "auto", batch_size: int = 64, device: torch.device | None = None,
                     progress: bool = True, force: bool = False, workers: int | None = None,
                     commit_every: int = COMMIT_EVERY, log: Callable[[str], None] | None = None) -> ExtractResult:
    """Embed every split of ``dataset`` with ``backbone`` and store the tokens.

    Stores CLS and mean-patch tokens of the last ``last_blocks`` blocks (and the patch grids
    of ``patch_blocks``, float16). An earlier store with the same identity, or one keeping a
    superset of these blocks and grids, is reused unless ``force``. An extraction killed
    midway is continued from its last commit (every ``commit_every`` items, rounded up to
    whole batches). 3D datasets are embedded slice by slice, in batches that span volumes.
    ``workers``: DataLoader worker processes (default: the CPUs available; 0 = in-process).

    Under ``torch.distributed`` (e.g. ``torchrun``) every process calls this: each embeds its
    shard of every split (whole batches, or whole volumes) into a part store, then process 0
    merges the parts, in order and with the same chunking, into the one store and all return it.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if commit_every < 1:
        raise ConfigError(f"commit_every must be >= 1, got {commit_every}")
    rank, world = _distributed()
    if device is None:
        device = default_device()
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    precision = resolve_precision(precision, device)
    pre = preprocessor_for(backbone, dataset, image_size)
    blocks = backbone.resolve_blocks(range(-min(last_blocks, backbone.num_blocks), 0))
    patch_blocks = sorted(set(backbone.resolve_blocks(patch_blocks)))
    identity = store_identity(backbone, dataset, pre, blocks, patch_blocks, precision)
    cache_dir = Path(cache_dir)
    name = store_name(backbone.name, identity)
    t0 = time.perf_counter()
    if not force:
        existing = find_store(cache_dir, name, identity, prefix=f"{backbone.name}-{_base_key(identity)}-")
        _barrier(world)  # every process has looked before process 0 may write
        if existing is not None:
            return ExtractResult(existing, True, time.perf_counter() - t0, 0)

    splits = dataset.splits()
    meta = dict(identity, medprobe=__version__, volumetric=dataset.ndim == 3, task=dataset.task.kind,
                class_names=list(dataset.task.class_names), splits={s: _split_meta(dataset, s) for s in splits})
    say = log or (print if progress and rank == 0 else (lambda msg: None))
    job = _Job(backbone.to(device).eval(), dataset, pre, blocks, patch_blocks, precision, device, batch_size,
               batch_size * math.ceil(commit_every / batch_size), workers, progress and rank == 0)
    if world == 1:
        store, n_items, resumed_from = job.run(StoreWriter(cache_dir / name, meta, log=say), None, say)
        return ExtractResult(store, False, time.perf_counter() - t0, n_items, resumed_from)

    part_dir = cache_dir / f"{name}.part-{rank}-of-{world}"
    part = open_store(part_dir)
    n_items = resumed_from = 0
    if part is None:
        part, n_items, resumed_from = job.run(StoreWriter(part_dir, meta, log=say), (rank, world), say)
    _barrier(world)
    if rank == 0:
        parts = [FeatureStore(cache_dir / f"{name}.part-{r}-of-{world}") for r in range(world)]
        merge_parts(parts, StoreWriter(cache_dir / name, meta, log=say, resume=False), dataset, job.chunk)
        for p in parts:
            shutil.rmtree(p.path, ignore_errors=True)
    _barrier(world)
    return ExtractResult(FeatureStore(cache_dir / name), False, time.perf_counter() - t0, n_items, resumed_from)


def _distributed() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _split_meta(dataset: ImageDataset, split: str) -> dict[str, Any]:
    recs = [dataset.records[i] for i in dataset.indices(split)]
    return {"n": len(recs), "keys": [r.key for r in recs], "patient_ids": [r.patient_id for r in recs],
            "metadata": [r.metadata for r in recs]}


def shard_range(n: int, batch_size: int, rank: int, world: int, whole_items: bool) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of one process's shard: whole batches (2D) or whole volumes (3D)."""
    unit = 1 if whole_items else batch_size
    units = math.ceil(n / unit)
    return min(n, rank * units // world * unit), min(n, (rank + 1) * units // world * unit)


@dataclass
class _Job:
    """What one extraction computes; :meth:`run` fills a writer (the store, or one process's part)."""

    backbone: Backbone
    dataset: ImageDataset
    pre: Preprocessor
    blocks: list[int]
    patch_blocks: list[int]
    precision: str
    device: torch.device
    batch_size: int
    chunk: int
    workers: int | None
    progress: bool

    def run(self, writer: StoreWriter, shard: tuple[int, int] | None, say: Callable[[str], None]
            ) -> tuple[FeatureStore, int, int]:
        dataset, splits = self.dataset, self.dataset.splits()
        volumetric = dataset.ndim == 3
        resumed_from = sum(writer.committed(s)["items"] for s in splits) if writer.resumed else 0
        if writer.resumed:
            say(f"continuing the interrupted extraction of {writer.final_dir.name} from item {resumed_from} "
                f"(last commit)")
        wanted = sorted(set(self.blocks) | set(self.patch_blocks))
        pin = self.device.type == "cuda"
        n_items = 0
        bar = ProgressBar(None if volumetric else len(dataset), f"extract {self.backbone.name}", unit="img",
                          enabled=self.progress, initial=0 if volumetric else resumed_from)
        try:
            for split in splits:
                idx = dataset.indices(split)
                lo, hi = (0, len(idx)) if shard is None else \
                    shard_range(len(idx), self.batch_size, *shard, whole_items=volumetric)
                state = writer.committed(split)
                if state["done"]:
                    continue
                if shard is None and dataset.task.kind not in ("none", "segmentation") \
                        and not writer.has(split, "labels"):
                    writer.put(split, "labels", dataset.labels(idx))  # (merged stores get them from the merge)
                done = state["items"]
                if volumetric:
                    first_volume, skip = _volume_cursor(writer, split, done) if done else (lo, 0)
                    batches = volume_batches(dataset, idx, pre=self.pre, batch_size=self.batch_size,
                                             first_volume=first_volume, end_volume=hi, skip_slices=skip,
                                             workers=self.workers, pin_memory=pin)
                else:
                    batches = input_batches(dataset, idx, self.pre, self.batch_size, start=lo + done, end=hi,
                                            workers=self.workers, pin_memory=pin)
                last_commit, check_space = done, True
                for owners, batch in batches:
                    with torch.inference_mode(), autocast(self.precision, self.device):
                        out = self.backbone.forward_tokens(batch.to(self.device, non_blocking=True), blocks=wanted)
                    values = {"item_owner": owners}
                    for b in out.blocks:
                        if b.index in self.blocks:
                            values[f"cls.{b.index}"] = b.cls.float().cpu().numpy()
                            values[f"mean.{b.index}"] = b.mean_patch.float().cpu().numpy()
                        if b.index in self.patch_blocks:
                            values[f"patch.{b.index}"] = b.patch_grid.to(torch.float16).cpu().numpy()
                    if check_space:  # 2D: the rest of the store is known; 3D: the next chunk
                        row_bytes = sum(v[:1].nbytes for v in values.values())
                        later = splits[splits.index(split) + 1:]
                        ahead = self.chunk if volumetric else hi - lo - done + \
                            sum(len(dataset.indices(s)) for s in later) // (1 if shard is None else shard[1])
                        writer.require_space(ahead * row_bytes)
                        check_space = False
                    for key, v in values.items():
                        writer.append(split, key, v)
                    done += len(owners)
                    n_items += len(owners)
                    bar.update(len(owners))
                    if done - last_commit >= self.chunk:
                        writer.commit(split, done)
                        last_commit = done
                        check_space = volumetric
                writer.commit(split, done, done=True)
            bar.close()
            store = writer.finish()
        except MedprobeError:
            writer.abort()  # a bad input or a full disk: nothing half-written is kept
            raise
        except BaseException:
            writer.release()  # interrupted (Ctrl-C, a crash): keep the committed chunks for a rerun
            raise
        return store, n_items, resumed_from


def merge_parts(parts: Sequence[FeatureStore], writer: StoreWriter, dataset: ImageDataset, chunk: int) -> FeatureStore:
    """Concatenate the part stores of a distributed extraction, in rank order, into ``writer``'s store.

    Rows are appended and committed ``chunk`` at a time, as one process would have done, so the
    merged store equals the single-process one.
    """
    try:
        for split in dataset.splits():
            idx = dataset.indices(split)
            if dataset.task.kind not in ("none", "segmentation"):
                writer.put(split, "labels", dataset.labels(idx))
            names: list[str] = []
            for p in parts:
                names += [k.split("/", 1)[1] for k in p.meta["arrays"]
                          if k.startswith(f"{split}/") and k.split("/", 1)[1] not in names]
            pieces = {n: [p.array(split, n) for p in parts if f"{split}/{n}" in p.meta["arrays"]] for n in names}
            total = sum(len(a) for a in pieces.get("item_owner", []))
            for start in range(0, total, chunk):
                for n in names:
                    writer.append(split, n, _rows(pieces[n], start, min(start + chunk, total)))
                if start + chunk < total:
                    writer.commit(split, start + chunk)
            writer.commit(split, total, done=True)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _rows(arrays: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the concatenation of ``arrays`` (read from their memory maps)."""
    out, offset = [], 0
    for a in arrays:
        lo, hi = max(start - offset, 0), min(stop - offset, len(a))
        if lo < hi:
            out.append(np.asarray(a[lo:hi]))
        offset += len(a)
    return np.concatenate(out)


def _volume_cursor(writer: StoreWriter, split: str, done: int) -> tuple[int, int]:
    """(first volume to read, slices of it already stored) after ``done`` committed slices."""
    if not done:
        return 0, 0
    owners = writer.read_committed(split, "item_owner")  # non-decreasing
    last = int(owners[-1])
    return last, len(owners) - int(np.searchsorted(owners, last, side="left"))
