"""One writer per output folder: an exclusive ``flock`` on ``OUTPUT_DIR/.medprobe.lock``.

The kernel drops the lock when its process dies, so a lock left by a killed run is taken
over by the next one; the file only tells who holds a live lock (PID, host, since when).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from medprobe.errors import ConfigError

LOCK_NAME = ".medprobe.lock"


class OutputLock:
    """``with OutputLock(folder, "medprobe run"):`` — raises ConfigError when another process holds it."""

    def __init__(self, folder: str | os.PathLike, what: str = "medprobe run") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot create the lock file {self.path}: {e.strerror or e}; "
                              "check that the output folder is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock {self.path}: {e.strerror or e}") from None
            raise ConfigError(f"{self.path.parent} is in use by another run ({self.holder()}); wait for it to "
                              "finish or use another output_dir") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                           "what": self.what}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "holder unknown"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return f"{info.get('what', 'a run')}, PID {info.get('pid')} on host {info.get('host')}, since {since}"

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
