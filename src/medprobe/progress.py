"""The one progress bar of medprobe (rich, on stderr), for long loops: extraction, pretraining."""
from __future__ import annotations

from types import TracebackType
from typing import Any


class ProgressBar:
    """A rich progress bar on stderr; does nothing when ``enabled`` is False.

    ``total=None`` shows a count without a bar (unknown length). :meth:`update` advances it and
    may set a short status text (``loss=0.123``) shown after the bar.
    """

    def __init__(self, total: int | None, description: str, *, unit: str = "it", initial: int = 0,
                 enabled: bool = True) -> None:
        self._progress: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.fields[status]}"), console=Console(stderr=True))
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=initial, status="")

    def update(self, n: int = 1, **status: Any) -> None:
        """Advance by ``n``; keyword arguments replace the status text."""
        if self._progress is None:
            return
        fields = {"status": " ".join(f"{k}={v}" for k, v in status.items())} if status else {}
        self._progress.update(self._task, advance=n, **fields)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
