"""Helpers shared by every pipeline ``Config``: validation, presets and YAML round-trips.

Configs are frozen dataclasses with a docstring under each field (tyro turns them into ``--help``).
Each validates itself in ``__post_init__`` with the ``check_*`` helpers below, so a bad value fails when
the config is built, with one sentence naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from diffrl.errors import ConfigError

C = TypeVar("C")


def check(condition: bool, field: str, value: Any, expected: str) -> None:
    """Raise :class:`ConfigError` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"invalid {field}={value!r}: it must be {expected}.")


def check_positive(field: str, value: float) -> None:
    check(value > 0, field, value, "> 0")


def check_non_negative(field: str, value: float) -> None:
    check(value >= 0, field, value, ">= 0")


def check_unit_interval(field: str, value: float, *, low_open: bool = True, high_open: bool = False) -> None:
    """Check ``value`` lies in (0, 1] by default; the ends are configurable."""
    lo_ok = value > 0 if low_open else value >= 0
    hi_ok = value < 1 if high_open else value <= 1
    interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
    check(lo_ok and hi_ok, field, value, f"in {interval}")


def check_choice(field: str, value: Any, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    check(value in choices, field, value, "one of " + ", ".join(map(str, choices)))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data dict of a (possibly nested) dataclass config; tuples become lists, paths strings."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config dataclass from :func:`to_dict` output (unknown keys are an error)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)} for {cls.__name__}.")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        hint = hints[f.name]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint) and isinstance(v, dict):
            v = from_dict(hint, v)
        elif (origin is tuple or hint is tuple) and isinstance(v, list):
            v = tuple(v)
        elif v is not None and (hint is Path or Path in typing.get_args(hint)):
            v = Path(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def save_yaml(data: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def diff_fields(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two configs of the same class: name -> (a, b)."""
    da, db = to_dict(a), to_dict(b)
    return {k: (da[k], db.get(k)) for k in da if da[k] != db.get(k)}
