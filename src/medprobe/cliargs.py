"""Argument helpers shared by every subcommand module (types for argparse, ``KEY=VALUE`` options)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from medprobe.errors import ConfigError


def parse_blocks(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes comma-separated integers such as 1,4; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--blocks values are numbers of last blocks (>= 1); got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def parse_options(items: Sequence[str]) -> dict:
    """``key=value`` pairs; values parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out
