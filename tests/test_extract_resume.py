"""Extraction under faults: a kill midway (resumed from the last commit), a full disk, leftovers of dead writers."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from medprobe.backbones import create_backbone
from medprobe.data.base import ArrayDataset, Record, TaskSpec
from medprobe.errors import DataError
from medprobe.features import extract_features
from medprobe.features import store as store_mod

pytestmark = pytest.mark.usefixtures("one_thread")

# A script that extracts a small dataset whose images are slow to read (so a kill lands midway);
# the same script, with the same settings, makes the reference store.
SCRIPT = textwrap.dedent('''
    import json, os, resource, signal, sys, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from medprobe.backbones import create_backbone
    from medprobe.data.base import ArrayDataset, Record, TaskSpec
    from medprobe.features import extract_features

    class Slow(ArrayDataset):
        def load_image(self, index):
            time.sleep(float(os.environ.get("SLOW", "0")))
            return super().load_image(index)

    cache, n, ndim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if os.environ.get("FSIZE"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(os.environ["FSIZE"]),) * 2)
    rng = np.random.default_rng(0)
    images = rng.random((n, 3, 28, 28) if ndim == 3 else (n, 28, 28), dtype=np.float32) * 255
    recs = [Record(f"i{i}", ["train", "test"][i % 2], f"p{i}", i % 2) for i in range(n)]
    ds = Slow(images, recs, TaskSpec("binary", ("a", "b")), name="slow", ndim=ndim)
    vit = create_backbone("dinov2_vits14", "random", tiny=True)
    r = extract_features(vit, ds, cache, image_size=28, last_blocks=2, patch_blocks=[-1], precision="fp32",
                         batch_size=4, commit_every=8, workers=0, progress=False, log=print)
    print(json.dumps({"path": str(r.store.path), "items": r.items, "resumed_from": r.resumed_from}))
''')


def _run(script: Path, cache: Path, n: int = 96, ndim: int = 2, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), str(cache), str(n), str(ndim)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _files(store: Path) -> dict[str, bytes]:
    return {str(f.relative_to(store)): f.read_bytes() for f in sorted(store.rglob("*")) if f.is_file()}


def _committed(cache: Path) -> int:
    for p in cache.glob("*.tmp-*/progress.json"):
        try:
            return sum(s["items"] for s in json.loads(p.read_text())["splits"].values())
        except (ValueError, KeyError, OSError):
            return 0
    return 0


def _script_dataset(n: int) -> ArrayDataset:
    """The dataset SCRIPT builds (same name, records and pixels: the same store identity)."""
    rng = np.random.default_rng(0)
    images = rng.random((n, 28, 28), dtype=np.float32) * 255
    recs = [Record(f"i{i}", ["train", "test"][i % 2], f"p{i}", i % 2) for i in range(n)]
    return ArrayDataset(images, recs, TaskSpec("binary", ("a", "b")), name="slow", ndim=2)


def test_sigkill_midway_then_rerun_continues_and_matches(tmp_path, vit):
    script = tmp_path / "extract.py"
    script.write_text(SCRIPT)
    killed = tmp_path / "killed"
    proc = _run(script, killed, SLOW="0.02")
    deadline = time.time() + 240
    while _committed(killed) < 16 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _committed(killed)
    assert 16 <= at_kill < 96
    assert len(list(killed.glob("*.tmp-*"))) == 1  # the dead writer's folder, with its commits
    kw = dict(image_size=28, last_blocks=2, patch_blocks=[-1], precision="fp32", batch_size=4, commit_every=8,
              workers=0, progress=False)
    resumed = extract_features(vit, _script_dataset(96), killed, **kw)  # the rerun
    assert resumed.resumed_from >= at_kill and resumed.resumed_from % 8 == 0
    assert resumed.items == 96 - resumed.resumed_from  # only the rest was computed
    reference = extract_features(vit, _script_dataset(96), tmp_path / "reference", **kw)
    assert reference.resumed_from == 0 and reference.items == 96
    a, b = _files(resumed.store.path), _files(reference.store.path)
    assert resumed.store.path.name == reference.store.path.name
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), "resumed store differs from an uninterrupted one"
    assert list(killed.glob("*.tmp-*")) == [] and resumed.store.verify() == []


class _Interrupting(ArrayDataset):
    """Raises KeyboardInterrupt (as Ctrl-C would) when item ``stop_at`` is read, once."""

    stop_at: int | None = None

    def load_image(self, index):
        if index == self.stop_at:
            self.stop_at = None
            raise KeyboardInterrupt
        return super().load_image(index)


def _ds(n=40, ndim=2, cls=_Interrupting):
    rng = np.random.default_rng(1)
    if ndim == 2:
        images = rng.random((n, 28, 28), dtype=np.float32) * 255
    else:  # volumes of 2 to 4 slices: batches of 4 slices span volumes, commits fall inside volumes
        images = [rng.random((2 + i % 3, 28, 28), dtype=np.float32) * 255 for i in range(n)]
    recs = [Record(f"i{i}", ["train", "val", "test"][i % 3], f"p{i}", i % 2) for i in range(n)]
    return cls(images, recs, TaskSpec("binary", ("a", "b")), name="int", ndim=ndim)


@pytest.fixture(scope="module")
def vit():
    return create_backbone("dinov2_vits14", "random", tiny=True)


@pytest.mark.parametrize("ndim", [2, 3])
def test_interrupt_keeps_commits_and_rerun_matches(tmp_path, vit, ndim):
    kw = dict(image_size=28, last_blocks=1, patch_blocks=[-1], precision="fp32", batch_size=4, commit_every=4,
              workers=0, progress=False)
    ref = extract_features(vit, _ds(ndim=ndim), tmp_path / "ref", **kw)
    ds = _ds(ndim=ndim)
    ds.stop_at = 31  # in the val split (records 1, 4, ... 37): train is done by then
    with pytest.raises(KeyboardInterrupt):
        extract_features(vit, ds, tmp_path / "run", **kw)
    assert len(list((tmp_path / "run").glob("*.tmp-*"))) == 1
    again = extract_features(vit, ds, tmp_path / "run", **kw)
    assert again.resumed_from > 0 and again.items < ref.items
    a, b = _files(again.store.path), _files(ref.store.path)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_full_disk_before_writing_is_a_clear_error(tmp_path, vit, monkeypatch):
    free = {"n": 1 << 40}
    real = store_mod.shutil.disk_usage

    def usage(path):
        u = real(path)
        return type(u)(u.total, u.used, free["n"])

    monkeypatch.setattr(store_mod.shutil, "disk_usage", usage)
    free["n"] = 1000  # a few hundred feature rows need more than that
    with pytest.raises(DataError, match=r"not enough disk space in .*needs .* more, .* free") as e:
        extract_features(vit, _ds(cls=ArrayDataset), tmp_path, image_size=28, precision="fp32", workers=0,
                         progress=False)
    assert str(tmp_path) in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_enospc_while_writing_is_a_clear_error(tmp_path, vit, monkeypatch):
    calls = {"n": 0}
    real = store_mod._Appender.append

    def append(self, values):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, values)

    monkeypatch.setattr(store_mod._Appender, "append", append)
    with pytest.raises(DataError, match="No space left on device") as e:
        extract_features(vit, _ds(cls=ArrayDataset), tmp_path, image_size=28, precision="fp32", batch_size=4,
                         commit_every=4, workers=0, progress=False)
    assert str(tmp_path) in str(e.value) and "needs" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_file_size_limit_in_a_real_process_is_an_error_not_a_crash(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(SCRIPT)
    proc = _run(script, tmp_path / "cache", n=64, FSIZE="8000")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (proc.returncode, err)  # a Python exception, not a signal (bus error: -7)
    assert "DataError" in err and "not enough disk space" in err and str(tmp_path / "cache") in err
    assert list((tmp_path / "cache").iterdir()) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers_are_removed(tmp_path, vit):
    dead = tmp_path / f"other-store.tmp-{_dead_pid()}"  # an earlier medprobe's folder: no lock, dead pid
    (dead / "train").mkdir(parents=True)
    (dead / "train" / "cls.3.npy").write_bytes(b"x" * 1000)
    alive = tmp_path / f"busy-store.tmp-{os.getppid()}"  # its process is running
    alive.mkdir()
    locked = tmp_path / "held-store.tmp-1"  # a writer holding its lock (here: this test)
    locked.mkdir()
    fd = store_mod._lock(locked / store_mod.LOCK)
    try:
        extract_features(vit, _ds(cls=ArrayDataset), tmp_path, image_size=28, precision="fp32", workers=0,
                         progress=False)
        names = {p.name for p in tmp_path.iterdir()}
        assert dead.name not in names and alive.name in names and locked.name in names
    finally:
        store_mod._release(fd)
    # lock released: the folder is a dead writer's leftover now (nothing committed in it)
    assert store_mod.clean_stale(tmp_path) >= 0 and not locked.exists() and alive.exists()


def test_resumable_leftover_of_another_store_is_kept_until_space_is_needed(tmp_path, vit, monkeypatch):
    ds = _ds(cls=_Interrupting)
    ds.stop_at = 30
    kw = dict(image_size=28, precision="fp32", batch_size=4, commit_every=4, workers=0, progress=False)
    with pytest.raises(KeyboardInterrupt):
        extract_features(vit, ds, tmp_path, last_blocks=1, **kw)
    partial = next(tmp_path.glob("*.tmp-*"))
    extract_features(vit, ds, tmp_path, last_blocks=2, **kw)  # another store: the partial one is kept
    assert partial.exists()
    real = store_mod.shutil.disk_usage
    monkeypatch.setattr(store_mod.shutil, "disk_usage",
                        lambda p: type(real(p))(1, 1, 0 if partial.exists() else 1 << 40))
    extract_features(vit, ds, tmp_path, last_blocks=3, **kw)  # space short: dead writers' folders go first
    assert not partial.exists()


def test_worker_processes_give_the_same_store_and_clear_errors(tmp_path, vit):
    kw = dict(image_size=28, last_blocks=1, precision="fp32", batch_size=5, progress=False)
    a = extract_features(vit, _ds(cls=ArrayDataset), tmp_path / "a", workers=0, **kw).store
    b = extract_features(vit, _ds(cls=ArrayDataset), tmp_path / "b", workers=2, **kw).store
    fa, fb = _files(a.path), _files(b.path)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    bad = _ds(cls=ArrayDataset)
    bad.images[17, 3, 3] = np.nan
    with pytest.raises(DataError, match=r"^i17: contains NaN") as e:
        extract_features(vit, bad, tmp_path / "c", workers=2, **kw)
    assert "Traceback" not in str(e.value)
    assert list((tmp_path / "c").iterdir()) == []
