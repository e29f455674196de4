"""Registers the subcommands that live in subpackages (run, report, demo, data, pretrain, analyze).

Each entry imports lazily so ``medprobe --help`` stays fast; a subpackage that is not
present yet is simply skipped.
"""
from __future__ import annotations

import importlib

from medprobe.cli import extra_command

for _module in ("medprobe.experiment.cli", "medprobe.pretrain.cli", "medprobe.data.cli", "medprobe.analysis.cli",
                "medprobe.demo"):
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _e:
        if _e.name != _module:
            raise
        continue
    _register = getattr(_mod, "register_cli", None)
    if _register is not None:
        extra_command(_register)
