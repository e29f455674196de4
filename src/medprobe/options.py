"""Typed parsing of YAML mappings into dataclasses, with errors that name the key.

``parse(Options, {"epochs": "ten"}, "protocols.linear")`` raises
``ConfigError: protocols.linear.epochs: expected an integer, got 'ten'``. Unknown keys are
reported with the closest allowed names.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from medprobe.errors import ConfigError, suggest

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}s" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted for floats, scalars for lists)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        concrete = [a for a in args if a is not type(None)]
        if len(concrete) == 1:  # X | None: X's own error (it names the nested key) rather than a generic one
            return coerce(value, concrete[0], where)
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {suggest(str(value), [str(a) for a in allowed], 'value')}")
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        out = [coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    return value


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types; ``where`` prefixes errors."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{where}: {suggest(str(key), fields, 'key')}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r} ({_type_name(hints[name])})")
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return obj


def require(condition: bool, message: str) -> None:
    """Raise a :class:`ConfigError` with ``message`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def option(name: str, value: Any, tp: Any, *, minimum: float | None = None, choices: Any = None,
           what: str = "value") -> Any:
    """One option value (an adapter's keyword, a function argument) as type ``tp``, checked.

    The single option-lookup helper: ``tp`` is ``int``, ``float``, ``str``, ``bool`` or
    ``list[str]`` (``| None`` allowed). Values from Python callers are accepted in their usual
    spellings: ``"3"`` / ``3.0`` for an int, ``yes``/``no``/``1``/``0`` for a bool, a
    comma-separated string for a list. ``minimum`` and ``choices`` are checked after the
    conversion; errors are :class:`ConfigError` naming the option (``what`` names a choice).
    """
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    base = next((a for a in args if a is not type(None)), tp) if typing.get_origin(tp) in (typing.Union,
                                                                                          types.UnionType) else tp
    if base is bool:
        if isinstance(value, bool):
            out: Any = value
        elif isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE + _FALSE:
            out = str(value).strip().lower() in _TRUE
        else:
            raise ConfigError(f"option {name} must be true or false, got {value!r}")
    elif base is int:
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            out = int(value) if isinstance(value, int) else int(float(value))
            if out != float(value):
                raise ValueError
        except (ValueError, OverflowError):
            raise ConfigError(f"option {name} must be an integer, got {value!r}") from None
    elif base is float:
        out = coerce(value, float, f"option {name}")
    elif typing.get_origin(base) in (list, tuple) or base in (list, tuple):
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise ConfigError(f"option {name} must be a list of names, got {value!r}")
        out = [str(v).strip() for v in items]
    else:
        out = value
    if minimum is not None and out < minimum:
        raise ConfigError(f"option {name} must be >= {minimum}, got {out}")
    if choices is not None and out not in tuple(choices):
        if base is str or isinstance(out, str):
            raise ConfigError(f"option {name}: " + suggest(str(out), [str(c) for c in choices], what))
        raise ConfigError(f"option {name} must be one of {', '.join(map(str, choices))}, got {out}")
    return out


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
