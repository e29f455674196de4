"""File helpers shared by every module that writes: atomic writes and file-name slugs."""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Writer = Callable[[BinaryIO], object]


def atomic_write(path: str | os.PathLike, data: bytes | str | Writer) -> Path:
    """Write ``path`` all at once or not at all: a temporary file in the same folder, fsync, rename.

    ``data`` is the content (bytes, or text written as UTF-8) or a function that writes into the
    open binary file (e.g. ``lambda fh: torch.save(obj, fh)``). Readers never see a half-written
    file; on any error the temporary file is removed and the error raised. The folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            if isinstance(data, str):
                fh.write(data.encode("utf-8"))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                data(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def slug(text: object, *, sep: str = "_", limit: int | None = 80) -> str:
    """``text`` as a safe file-name part: runs of characters other than letters, digits, ``.``,
    ``_`` and ``-`` become ``sep``; at most ``limit`` characters; ``"x"`` if nothing is left."""
    out = re.sub(r"[^A-Za-z0-9._-]+", sep, str(text)).strip(sep)
    return (out[:limit] if limit else out) or "x"
