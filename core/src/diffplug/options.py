"""Component options: dataclass fields with help, ranges and choices, checked in one place.

A component declares ``Config``, a dataclass whose fields are its options::

    @dataclass
    class Config:
        eta: float = option(0.0, "noise scale: 0 deterministic, 1 = DDPM", min=0.0)

The CLI turns these into ``--eta``; checkpoints store ``asdict(config)`` as JSON.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from diffplug.errors import OptionError


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
) -> Any:
    """A dataclass field that documents and bounds one option."""
    meta = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
    }
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """What ``diffplug info`` shows of one option."""

    name: str
    type: Any
    default: Any
    help: str
    choices: Sequence[Any] | None
    min: float | None
    max: float | None
    min_exclusive: bool = False


@dataclasses.dataclass
class NoOptions:
    """The config of a component that has no options."""


def describe(config_cls: type) -> list[OptionInfo]:
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(
            OptionInfo(
                f.name,
                hints[f.name],
                default,
                f.metadata.get("help", ""),
                f.metadata.get("choices"),
                f.metadata.get("min"),
                f.metadata.get("max"),
                f.metadata.get("min_exclusive", False),
            )
        )
    return out


def build_config(config_cls: type, values: Mapping[str, Any], *, owner: str) -> Any:
    """Check names, coerce types, check ranges; return an instance of ``config_cls``."""
    infos = {i.name: i for i in describe(config_cls)}
    unknown = [k for k in values if k not in infos]
    if unknown:
        have = ", ".join(f"--{n.replace('_', '-')}" for n in infos) or "none"
        names = ", ".join(f"--{k.replace('_', '-')}" for k in unknown)
        raise OptionError(f"{owner} has no option {names}; its options: {have}")
    kwargs = {k: coerce(infos[k], v, owner=owner) for k, v in values.items()}
    config = config_cls(**kwargs)
    for info in infos.values():
        check(info, getattr(config, info.name), owner=owner)
    return config


def coerce(info: OptionInfo, value: Any, *, owner: str) -> Any:
    """Turn a CLI string (or JSON value) into the option's declared type."""
    typ = info.type
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        typ = args[0]
        origin = typing.get_origin(typ)
    if origin is typing.Literal:
        typ = type(typing.get_args(typ)[0])
    try:
        if typ is bool and isinstance(value, str):
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(value)
            return low in ("1", "true", "yes", "on")
        if origin in (list, tuple) or typ in (list, tuple):
            (inner, *_) = typing.get_args(typ) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            if inner is int and any(isinstance(v, float) and not v.is_integer() for v in items):
                raise ValueError(value)
            return [inner(v) for v in items if not isinstance(v, str) or v.strip()]
        if origin is dict or typ is dict or typ is Any:
            return value
        if typ is float and isinstance(value, int | float | str):
            number = float(value)
            if not math.isfinite(number):  # nan would slip through every min/max check
                raise ValueError(value)
            return number
        if typ is int and isinstance(value, str | int) and not isinstance(value, bool):
            return int(value)
        if typ is int and isinstance(value, float):  # 32.0 is 32; 32.7 is no whole number
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is str:
            return str(value)
        return typ(value)
    except (TypeError, ValueError):
        name = getattr(typ, "__name__", str(typ))
        raise OptionError(
            f"{owner}: --{info.name.replace('_', '-')} expects {name}, got {value!r}"
        ) from None


def check(info: OptionInfo, value: Any, *, owner: str) -> None:
    flag = f"--{info.name.replace('_', '-')}"
    if info.choices is not None and value not in info.choices:
        raise OptionError(
            f"{owner}: {flag} must be one of {', '.join(map(str, info.choices))}; got {value!r}"
        )
    if value is None or not isinstance(value, int | float) or isinstance(value, bool):
        return
    if info.min is not None and (value <= info.min if info.min_exclusive else value < info.min):
        bound = ">" if info.min_exclusive else ">="
        raise OptionError(f"{owner}: {flag} must be {bound} {info.min}; got {value}")
    if info.max is not None and value > info.max:
        raise OptionError(f"{owner}: {flag} must be <= {info.max}; got {value}")
