"""User-facing errors.

Every mistake a user can make (a bad flag, a missing file, a corrupt image, an unknown
backbone) raises :class:`MedprobeError`. The command line prints its message without a
traceback and exits with a non-zero code; programming errors keep their traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class MedprobeError(Exception):
    """An error caused by user input; its message says what was wrong and what to do."""


class ConfigError(MedprobeError):
    """An experiment file or command-line value is invalid."""


class DataError(MedprobeError):
    """A dataset file is missing, unreadable or inconsistent."""


class WeightsError(MedprobeError):
    """Model weights are missing or do not match the architecture."""


def suggest(name: str, choices: Iterable[str], what: str) -> str:
    """Message for an unknown ``name`` listing the closest ``choices``."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Available: {', '.join(choices)}."
