"""On-disk feature store: token arrays per split, written in committed chunks, reused by every protocol.

Layout of one store (a folder named ``<backbone>-<key>``)::

    meta.json              identity (backbone, weights, preprocessing, dataset fingerprint),
                           arrays, their shapes and per-chunk SHA-256 checksums
    <split>/cls.<b>.npy    CLS (or pooled) token of block b, (N_items, D_b) float32
    <split>/mean.<b>.npy   mean patch token of block b
    <split>/patch.<b>.npy  optional patch grids (N_items, D_b, h, w) float16
    <split>/item_owner.npy which record each item belongs to (the volume of a slice; itself for 2D)

Items are images for 2D datasets and slices for 3D ones; :meth:`FeatureStore.features`
pools slices into volume embeddings.

Writing: a store is built in ``<name>.tmp-<pid>``; every array is a ``.npy`` file grown by
plain appends (no sparse memory map: a full disk is an ``ENOSPC`` error, turned into a
:class:`DataError`, never a bus error). Progress is committed in chunks: the appended bytes are
flushed, each array's header is rewritten with its committed length, the chunk checksums go to
``progress.json`` (replaced atomically). A rerun after a crash or a kill adopts the folder of the
dead process, truncates every array to its last commit and continues from there; the finished
store is renamed into place, so a half-written store is never mistaken for a finished one.
Liveness of a writer is an exclusive ``flock`` held on ``.lock`` for its lifetime (released by
the kernel when the process dies, whatever the signal).

Reading: a normal open checks files, sizes and headers only; :meth:`FeatureStore.verify`
(``medprobe cache verify``) re-hashes every chunk.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medprobe.errors import ConfigError, DataError

Pooling = Literal["mean", "max"]
META = "meta.json"
PROGRESS = "progress.json"
LOCK = ".lock"
STORE_FORMAT = 2
_MAGIC = b"\x93NUMPY\x01\x00"
_TMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<pid>\d+)$")
#: space kept free beyond what a store needs (filesystem metadata, the meta file)
SPACE_MARGIN = 16 << 20
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def store_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------- .npy headers
def _header_len(dtype: np.dtype, row_shape: tuple[int, ...]) -> int:
    """A fixed header length for an array that may grow to any number of rows."""
    longest = _header_text(dtype, (10 ** 15, *row_shape))
    return 64 * ((len(_MAGIC) + 2 + len(longest) + 1 + 63) // 64)


def _header_text(dtype: np.dtype, shape: tuple[int, ...]) -> str:
    return repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(s) for s in shape)})


def npy_header(dtype: np.dtype, shape: tuple[int, ...], length: int) -> bytes:
    """A version-1.0 ``.npy`` header of exactly ``length`` bytes (space-padded, as numpy pads)."""
    text = _header_text(dtype, shape)
    body = length - len(_MAGIC) - 2
    if len(text) + 1 > body:
        raise ValueError(f"header for shape {shape} does not fit in {length} bytes")
    text = text.ljust(body - 1) + "\n"
    return _MAGIC + body.to_bytes(2, "little") + text.encode("latin1")


def read_npy_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, data offset) of a ``.npy`` file, without reading its data."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if fortran:
            raise ValueError("Fortran-ordered array")
        return np.dtype(dtype), tuple(shape), fh.tell()


# --------------------------------------------------------------------------- liveness of writers
def _lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _probe_stale(tmp: Path) -> int | None:
    """If the writer of ``tmp`` is gone, an fd locking it for the caller; else None.

    A folder with a ``.lock`` is stale when its lock can be taken; an older folder without
    one (an earlier medprobe) when its pid is not a live process on this host.
    """
    lock = tmp / LOCK
    if lock.is_file():
        try:
            return _lock(lock)
        except FileNotFoundError:  # finished or removed meanwhile
            return None
    m = _TMP.match(tmp.name)
    if m is None or _pid_alive(int(m["pid"])):
        return None
    try:
        return _lock(lock)
    except OSError:
        return None


def _release(fd: int | None) -> None:
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _resumable(tmp: Path, name: str | None = None) -> bool:
    """Whether ``tmp`` holds committed progress of the current store format (for store ``name``)."""
    try:
        progress = json.loads((tmp / PROGRESS).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(progress, dict) and progress.get("format") == STORE_FORMAT
            and bool(progress.get("arrays")) and (name is None or progress.get("name") == name))


def clean_stale(cache_dir: Path, *, keep_resumable: bool = True, skip: str | None = None,
                log: Callable[[str], None] | None = None) -> int:
    """Remove ``<store>.tmp-<pid>`` folders whose writer is gone; return the bytes freed.

    With ``keep_resumable`` a folder holding committed chunks is kept (the next extraction of
    that store continues from it); ``skip`` names a store whose folders are left alone.
    """
    freed = 0
    if not cache_dir.is_dir():
        return 0
    for tmp in sorted(cache_dir.iterdir()):
        m = _TMP.match(tmp.name)
        if m is None or not tmp.is_dir() or m["name"] == skip:
            continue
        fd = _probe_stale(tmp)
        if fd is None:
            continue
        try:
            if keep_resumable and _resumable(tmp, m["name"]):
                continue
            size = _tree_size(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            freed += size
            if log:
                log(f"removed {tmp.name}: left by a process that is gone ({human_bytes(size)})")
        finally:
            _release(fd)
    return freed


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def _space_error(folder: Path, needed: int, e: OSError | None = None) -> DataError:
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    why = f" ({e.strerror})" if e is not None and e.strerror else ""
    return DataError(f"not enough disk space in {folder}{why}: the feature store needs {human_bytes(needed)} more, "
                     f"{human_bytes(free)} free; free some space or point cache_dir (--cache-dir) to another disk. "
                     f"Nothing was kept of this store")


# --------------------------------------------------------------------------- writer
class _Appender:
    """One growing ``.npy`` file: appends, then commits (flush, header, chunk checksum)."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...], rows: int = 0) -> None:
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.header_len = _header_len(self.dtype, self.row_shape)
        self.row_bytes = int(self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64)))
        self.rows, self.pending = rows, 0
        self._hash = hashlib.sha256()
        if rows == 0:
            self.fh = open(path, "wb")
            self.fh.write(npy_header(self.dtype, (0, *self.row_shape), self.header_len))
        else:  # resume: drop whatever was appended after the last commit
            self.fh = open(path, "r+b")
            self.fh.truncate(self.header_len + rows * self.row_bytes)
            self.fh.seek(0, os.SEEK_END)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {values.shape[1:]}, expected {self.row_shape}")
        data = memoryview(values).cast("B")
        self.fh.write(data)
        self._hash.update(data)
        self.pending += len(values)

    def commit(self) -> tuple[int, str] | None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        if not self.pending:
            return None
        self.rows += self.pending
        end = self.fh.tell()
        self.fh.seek(0)
        self.fh.write(npy_header(self.dtype, (self.rows, *self.row_shape), self.header_len))
        self.fh.seek(end)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        chunk = (self.pending, self._hash.hexdigest())
        self.pending, self._hash = 0, hashlib.sha256()
        return chunk

    def close(self) -> None:
        self.fh.close()


class StoreWriter:
    """Builds a store in ``<name>.tmp-<pid>``, committing progress in chunks; resumable after a kill.

    ``StoreWriter(final_dir, meta)`` adopts the folder of a dead writer of the same store when
    it holds committed chunks (:attr:`resumed` is then True); :meth:`committed` tells how far
    each split got. Writes are plain appends; :meth:`require_space` checks the free space first.
    """

    def __init__(self, final_dir: Path, meta: dict[str, Any], log: Callable[[str], None] | None = None,
                 resume: bool = True) -> None:
        self.final_dir = Path(final_dir)
        self.log = log or (lambda msg: None)
        self.tmp_dir = self.final_dir.with_name(f"{self.final_dir.name}.tmp-{os.getpid()}")
        self.meta = dict(meta, arrays={})
        self._files: dict[str, _Appender] = {}
        self._fd: int | None = None
        self.resumed = False
        try:
            self.final_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the feature cache folder {self.final_dir.parent}: "
                            f"{e.strerror or e}; choose a writable cache_dir") from None
        clean_stale(self.final_dir.parent, skip=self.final_dir.name, log=self.log)
        try:
            self.progress = self._adopt(resume) or self._fresh()
        except OSError as e:
            raise _space_error(self.final_dir.parent, SPACE_MARGIN, e) if e.errno in _SPACE_ERRNOS else \
                DataError(f"cannot write the feature store in {self.final_dir.parent}: {e.strerror or e}") from None

    # ------------------------------------------------------------------ folder
    def _fresh(self) -> dict[str, Any]:
        if self.tmp_dir.exists():  # our own pid from an earlier, unfinished attempt in this process
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir()
        self._fd = _lock(self.tmp_dir / LOCK)
        return {"format": STORE_FORMAT, "name": self.final_dir.name, "host": socket.gethostname(),
                "arrays": {}, "splits": {}}

    def _adopt(self, resume: bool = True) -> dict[str, Any] | None:
        """Take over the folder of a dead writer of this store, truncated to its last commit
        (``resume=False``: remove such folders instead)."""
        prefix = f"{self.final_dir.name}.tmp-"
        for tmp in sorted(self.final_dir.parent.glob(f"{glob_escape(prefix)}*")):
            if not tmp.is_dir():
                continue
            fd = _probe_stale(tmp)
            if fd is None:
                continue  # another live process is extracting the same store: leave it alone
            if not resume or not _resumable(tmp, self.final_dir.name):
                shutil.rmtree(tmp, ignore_errors=True)
                _release(fd)
                continue
            if tmp != self.tmp_dir:  # (our own folder when an earlier call in this process was interrupted)
                if self.tmp_dir.exists():
                    shutil.rmtree(self.tmp_dir)
                os.replace(tmp, self.tmp_dir)  # the lock fd follows the renamed file
            self._fd = fd
            progress = json.loads((self.tmp_dir / PROGRESS).read_text())
            for key, info in progress["arrays"].items():
                self._files[key] = _Appender(self.tmp_dir / f"{key}.npy", np.dtype(info["dtype"]),
                                             tuple(info["row_shape"]), rows=int(info["rows"]))
            known = {f"{k}.npy" for k in progress["arrays"]}
            for f in self.tmp_dir.rglob("*.npy"):  # arrays begun after the last commit
                if str(f.relative_to(self.tmp_dir)) not in known:
                    f.unlink()
            self.resumed = True
            return progress
        return None

    # ------------------------------------------------------------------ state
    def committed(self, split: str) -> dict[str, Any]:
        """What was committed for ``split``: ``{"items": n, "done": bool}`` (zeros when nothing)."""
        return dict(self.progress["splits"].get(split, {"items": 0, "done": False}))

    def has(self, split: str, name: str) -> bool:
        return f"{split}/{name}" in self._files

    def rows(self, split: str, name: str) -> int:
        """Committed rows of one array."""
        f = self._files.get(f"{split}/{name}")
        return f.rows if f else 0

    def read_committed(self, split: str, name: str) -> np.ndarray:
        """The committed rows of one array (a read-only memory map)."""
        f = self._files[f"{split}/{name}"]
        return np.memmap(f.path, dtype=f.dtype, mode="r", offset=f.header_len, shape=(f.rows, *f.row_shape))

    # ------------------------------------------------------------------ writing
    def require_space(self, needed: int) -> None:
        """Raise a :class:`DataError` (nothing kept) unless ``needed`` more bytes fit on the disk."""
        folder = self.tmp_dir
        free = shutil.disk_usage(folder).free
        if free >= needed + SPACE_MARGIN:
            return
        freed = clean_stale(folder.parent, keep_resumable=False, skip=self.final_dir.name, log=self.log)
        if freed and shutil.disk_usage(folder).free >= needed + SPACE_MARGIN:
            return
        error = _space_error(folder.parent, needed + SPACE_MARGIN)
        self.abort()
        raise error

    def append(self, split: str, name: str, values: np.ndarray) -> None:
        key = f"{split}/{name}"
        try:
            f = self._files.get(key)
            if f is None:
                (self.tmp_dir / split).mkdir(exist_ok=True)
                f = self._files[key] = _Appender(self.tmp_dir / f"{key}.npy", values.dtype, values.shape[1:])
            f.append(values)
        except OSError as e:
            self._disk_error(e, values.nbytes)

    def put(self, split: str, name: str, values: np.ndarray) -> None:
        """A whole array at once (committed with the next :meth:`commit`)."""
        self.append(split, name, values)

    def _disk_error(self, e: OSError, needed: int) -> None:
        if e.errno in _SPACE_ERRNOS:
            error = _space_error(self.final_dir.parent, needed, e)
        else:
            error = DataError(f"cannot write the feature store {self.tmp_dir}: {e.strerror or e}")
        self.abort()
        raise error from None

    def commit(self, split: str, items: int, done: bool = False) -> None:
        """Make everything appended so far durable; ``split`` has ``items`` items written."""
        try:
            for key, f in self._files.items():
                chunk = f.commit()
                info = self.progress["arrays"].setdefault(
                    key, {"dtype": str(f.dtype), "row_shape": list(f.row_shape), "rows": 0, "chunks": []})
                if chunk:
                    info["rows"] = f.rows
                    info["chunks"].append(list(chunk))
            self.progress["splits"][split] = {"items": int(items), "done": bool(done)}
            _write_atomic(self.tmp_dir / PROGRESS, json.dumps(self.progress, indent=1))
        except OSError as e:
            self._disk_error(e, 1 << 20)

    def finish(self) -> "FeatureStore":
        """Write ``meta.json`` and move the store into place."""
        try:
            for key, f in self._files.items():
                if f.pending:
                    raise RuntimeError(f"{key}: {f.pending} rows appended but not committed")
                f.close()
                info = self.progress["arrays"][key]
                self.meta["arrays"][key] = {"shape": [f.rows, *f.row_shape], "dtype": str(f.dtype),
                                            "header": f.header_len, "chunks": info["chunks"]}
            self._files.clear()
            _write_atomic(self.tmp_dir / META, json.dumps(self.meta, indent=1, default=str))
            (self.tmp_dir / PROGRESS).unlink()
            (self.tmp_dir / LOCK).unlink()
            if self.final_dir.exists():
                shutil.rmtree(self.final_dir)
            os.replace(self.tmp_dir, self.final_dir)
        except OSError as e:
            self._disk_error(e, 1 << 20)
        finally:
            _release(self._fd)
            self._fd = None
        return FeatureStore(self.final_dir)

    def release(self) -> None:
        """Stop writing but keep the committed chunks for a later run to continue from."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        _release(self._fd)
        self._fd = None
        if not self.progress["arrays"]:  # nothing committed: nothing worth keeping
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def abort(self) -> None:
        """Remove the temporary folder (nothing half-written remains)."""
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        _release(self._fd)
        self._fd = None


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- reader
class FeatureStore:
    """Read access to a finished store (sizes and headers are checked on open; see :meth:`verify`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            raise DataError(f"{self.path} is not a feature store (no {META})")
        try:
            self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{meta_file}: not a readable feature store description ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != STORE_FORMAT or \
                not isinstance(self.meta.get("arrays"), dict) or not isinstance(self.meta.get("splits"), dict):
            raise DataError(f"{meta_file}: not a medprobe feature store of format {STORE_FORMAT}")
        self._cache: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- integrity
    def check(self) -> list[str]:
        """Arrays whose file is missing, has the wrong size or a header that disagrees with ``meta.json``."""
        bad = []
        for key, info in self.meta["arrays"].items():
            f = self.path / f"{key}.npy"
            try:
                dtype, shape, offset = read_npy_header(f)
                ok = (dtype == np.dtype(info["dtype"]) and list(shape) == list(info["shape"])
                      and offset == info["header"]
                      and f.stat().st_size == offset + dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
            except (OSError, ValueError, KeyError, TypeError, SyntaxError):
                ok = False
            if not ok:
                bad.append(key)
        return bad

    def verify(self) -> list[str]:
        """Arrays that fail :meth:`check` or whose bytes differ from a chunk checksum (reads everything)."""
        bad = self.check()
        for key, info in self.meta["arrays"].items():
            if key in bad:
                continue
            dtype = np.dtype(info["dtype"])
            row_bytes = dtype.itemsize * int(np.prod(info["shape"][1:], dtype=np.int64))
            with open(self.path / f"{key}.npy", "rb") as fh:
                fh.seek(info["header"])
                for rows, sha in info["chunks"]:
                    if _hash_bytes(fh, rows * row_bytes) != sha:
                        bad.append(key)
                        break
        return bad

    # ---------------------------------------------------------------- access
    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def stored_blocks(self) -> list[int]:
        return list(self.meta["blocks"])

    @property
    def patch_blocks(self) -> list[int]:
        return list(self.meta.get("patch_blocks", []))

    def size_bytes(self) -> int:
        return sum(int(np.prod(i["shape"], dtype=np.int64)) * np.dtype(i["dtype"]).itemsize + i["header"]
                   for i in self.meta["arrays"].values())

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


def _hash_bytes(fh: Any, n: int) -> str:
    h = hashlib.sha256()
    while n > 0:
        data = fh.read(min(n, 1 << 22))
        if not data:
            break
        h.update(data)
        n -= len(data)
    return h.hexdigest()


def open_store(path: Path, check: bool = True, full: bool = False) -> FeatureStore | None:
    """Open a finished store, or None when it is absent or damaged (and then remove it).

    ``check`` compares files, sizes and headers with ``meta.json`` (cheap); ``full`` also
    re-hashes every chunk (what ``medprobe cache verify`` does).
    """
    path = Path(path)
    if not (path / META).is_file():
        return None
    try:
        store = FeatureStore(path)
        bad = store.verify() if full else store.check() if check else []
        if bad:
            raise DataError(f"damaged arrays: {', '.join(bad)}")
    except (DataError, ValueError, KeyError, TypeError, AttributeError) as e:
        reason = str(e) if isinstance(e, DataError) else f"{META} is not a feature store's ({type(e).__name__}: {e})"
        print(f"medprobe: feature store {path} is damaged ({reason}); it is removed and will be rebuilt",
              file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return store


def iter_stores(folder: Path) -> Iterator[Path]:
    """Finished stores directly in ``folder`` (or ``folder`` itself when it is one)."""
    folder = Path(folder)
    if (folder / META).is_file():
        yield folder
        return
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_dir() and not _TMP.match(p.name) and (p / META).is_file():
                yield p


def find_store(cache_dir: Path, name: str, identity: dict[str, Any], prefix: str) -> FeatureStore | None:
    """The store ``name`` or any store (named ``prefix*``) equal to ``identity`` except that it
    keeps a superset of its ``blocks`` and ``patch_blocks`` (the smallest such store)."""
    exact = open_store(cache_dir / name)
    if exact is not None:
        return exact
    want = {k: v for k, v in identity.items() if k not in ("blocks", "patch_blocks")}
    candidates = []
    for p in sorted(Path(cache_dir).glob(f"{glob_escape(prefix)}*")):
        if "." in p.name[len(prefix):] or not (p / META).is_file():  # unfinished folders, parts of stores
            continue
        try:
            meta = json.loads((p / META).read_text())
            same = all(meta.get(k) == _json_roundtrip(v) for k, v in want.items())
            superset = set(identity["blocks"]) <= set(meta["blocks"]) and \
                set(identity["patch_blocks"]) <= set(meta["patch_blocks"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if same and superset:
            candidates.append((len(meta["blocks"]) + len(meta["patch_blocks"]), p))
    for _, p in sorted(candidates):
        store = open_store(p)
        if store is not None:
            return store
    return None


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


__all__ = ["FeatureStore", "StoreWriter", "clean_stale", "find_store", "iter_stores", "open_store", "store_key"]
