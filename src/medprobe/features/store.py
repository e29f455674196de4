"""On-disk feature store: token arrays per split, written once, reused by every protocol.

Layout of one store (a folder named ``<backbone>-<key>``)::

    meta.json              identity (backbone, weights, preprocessing, dataset fingerprint),
                           arrays and their SHA-256 checksums
    <split>/cls.<b>.npy    CLS (or pooled) token of block b, (N_items, D_b) float32
    <split>/mean.<b>.npy   mean patch token of block b
    <split>/patch.<b>.npy  optional patch grids (N_items, D_b, h, w) float16
    <split>/item_owner.npy which record each item belongs to (the volume of a slice; itself for 2D)

Items are images for 2D datasets and slices for 3D ones; :meth:`FeatureStore.features`
pools slices into volume embeddings. A store is built in ``<name>.tmp-<pid>`` and renamed
when complete, so a half-written store is never mistaken for a finished one; checksums
detect later damage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medprobe.errors import ConfigError, DataError

Pooling = Literal["mean", "max"]
META = "meta.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def store_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StoreWriter:
    """Streams batches into preallocated ``.npy`` memmaps inside a temporary folder."""

    def __init__(self, final_dir: Path, meta: dict[str, Any]) -> None:
        self.final_dir = final_dir
        self.tmp_dir = final_dir.with_name(f"{final_dir.name}.tmp-{os.getpid()}")
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        self.meta = dict(meta, arrays={})
        self._arrays: dict[str, np.memmap] = {}

    def allocate(self, split: str, name: str, shape: tuple[int, ...], dtype: str = "float32") -> None:
        path = self.tmp_dir / split / f"{name}.npy"
        path.parent.mkdir(exist_ok=True)
        self._arrays[f"{split}/{name}"] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def has(self, split: str, name: str) -> bool:
        return f"{split}/{name}" in self._arrays

    def write(self, split: str, name: str, start: int, values: np.ndarray) -> None:
        self._arrays[f"{split}/{name}"][start:start + len(values)] = values

    def put(self, split: str, name: str, values: np.ndarray) -> None:
        self.allocate(split, name, values.shape, str(values.dtype))
        self.write(split, name, 0, values)

    def commit(self) -> "FeatureStore":
        for key, arr in self._arrays.items():
            arr.flush()
            self.meta["arrays"][key] = {"shape": list(arr.shape), "dtype": str(arr.dtype),
                                        "sha256": file_sha256(self.tmp_dir / f"{key}.npy")}
        self._arrays.clear()
        (self.tmp_dir / META).write_text(json.dumps(self.meta, indent=1, default=str))
        if self.final_dir.exists():
            shutil.rmtree(self.final_dir)
        os.replace(self.tmp_dir, self.final_dir)
        return FeatureStore(self.final_dir)

    def abort(self) -> None:
        self._arrays.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


class FeatureStore:
    """Read access to a finished store."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            raise DataError(f"{self.path} is not a feature store (no {META})")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        self._cache: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- integrity
    def verify(self) -> list[str]:
        """Names of arrays whose file is missing or whose checksum differs."""
        bad = []
        for key, info in self.meta["arrays"].items():
            f = self.path / f"{key}.npy"
            if not f.is_file() or file_sha256(f) != info["sha256"]:
                bad.append(key)
        return bad

    # ---------------------------------------------------------------- access
    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def stored_blocks(self) -> list[int]:
        return list(self.meta["blocks"])

    def array(self, split: str, name: str) -> np.ndarray:
        key = f"{split}/{name}"
        if key not in self.meta["arrays"]:
            have = sorted(k for k in self.meta["arrays"] if k.startswith(f"{split}/"))
            raise ConfigError(f"feature store {self.path.name} has no array {key!r}; it has {', '.join(have)}")
        if key not in self._cache:
            self._cache[key] = np.load(self.path / f"{key}.npy", mmap_mode="r")
        return self._cache[key]

    def split_info(self, split: str) -> dict[str, Any]:
        return self.meta["splits"][split]

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.array(split, "labels"))

    def patient_ids(self, split: str) -> list[str]:
        return list(self.split_info(split)["patient_ids"])

    def keys(self, split: str) -> list[str]:
        return list(self.split_info(split)["keys"])

    def metadata(self, split: str, column: str) -> list[Any]:
        rows = self.split_info(split)["metadata"]
        return [r.get(column) for r in rows]

    def block_index(self, last: int) -> list[int]:
        """Absolute indices of the last ``last`` stored blocks (oldest first)."""
        blocks = self.stored_blocks
        if last > len(blocks) or last < 1:
            raise ConfigError(f"asked for the last {last} blocks but the store {self.path.name} keeps "
                              f"{len(blocks)} (re-extract with --blocks including {last})")
        return blocks[-last:]

    def tokens(self, split: str, kind: Literal["cls", "mean"], block: int) -> np.ndarray:
        return np.asarray(self.array(split, f"{kind}.{block}"), dtype=np.float32)

    def features(self, split: str, variant: str = "cls", last_blocks: int = 1, pooling: Pooling = "mean") -> np.ndarray:
        """Probe input for one split: ``cls`` or ``cls+mean`` from the last ``last_blocks`` blocks.

        As in DINOv2's linear evaluation, the CLS tokens of the last n blocks are concatenated;
        ``cls+mean`` appends the mean patch token of the last block. For 3D datasets slice
        features are pooled per volume (``mean`` or ``max``).
        """
        if variant not in ("cls", "cls+mean", "mean"):
            raise ConfigError(f"unknown probe input {variant!r}; allowed: cls, cls+mean, mean")
        blocks = self.block_index(last_blocks)
        parts = []
        if variant in ("cls", "cls+mean"):
            parts += [self.tokens(split, "cls", b) for b in blocks]
        if variant in ("cls+mean", "mean"):
            parts.append(self.tokens(split, "mean", blocks[-1]))
        x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return self.pool(split, x, pooling)

    def pool(self, split: str, x: np.ndarray, pooling: Pooling = "mean") -> np.ndarray:
        """Pool per-slice rows into per-volume rows (identity for 2D stores)."""
        if not self.meta.get("volumetric"):
            return x
        owner = np.asarray(self.array(split, "item_owner"))
        n = len(self.keys(split))
        if pooling == "mean":
            out = np.zeros((n, x.shape[1]), dtype=np.float64)
            np.add.at(out, owner, x)
            counts = np.bincount(owner, minlength=n)[:, None]
            return (out / np.maximum(counts, 1)).astype(np.float32)
        if pooling == "max":
            out = np.full((n, x.shape[1]), -np.inf, dtype=np.float32)
            np.maximum.at(out, owner, x)
            return out
        raise ConfigError(f"unknown pooling {pooling!r}; allowed: mean, max")


def open_store(path: Path, check: bool = True) -> FeatureStore | None:
    """Open a finished store, or None when it is absent or damaged (and then remove it)."""
    if not (path / META).is_file():
        return None
    try:
        store = FeatureStore(path)
        if check and store.verify():
            raise DataError("checksum mismatch")
    except (DataError, ValueError, KeyError, json.JSONDecodeError):
        shutil.rmtree(path, ignore_errors=True)
        return None
    return store

