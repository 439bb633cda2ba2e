"""Dataclasses from nested dicts (TOML, JSON, --set strings): unknown keys are rejected
with the closest valid name, values are checked against the field's type."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal

from fedcpt.exceptions import ConfigError


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from nested dicts, rejecting unknown keys and bad types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = closest(key, names)
            hint = f" (did you mean `{prefix}{close}`?)" if close else ""
            raise ConfigError(f"unknown config key `{full}`{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if required:
        raise ConfigError(f"`{prefix}{required[0]}` is required")
    return cls(**kwargs)


def closest(key: str, names: list[str]) -> str | None:
    """The valid name the user most likely meant: a shared prefix first (lr_rate -> lr),
    then plain string similarity."""
    prefixed = [n for n in names if key.startswith(n) or n.startswith(key)]
    if prefixed:
        return max(prefixed, key=len)
    close = difflib.get_close_matches(key, names, n=1)
    return close[0] if close else None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{key}.")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` must be a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"`{key}` must be one of {list(allowed)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a number, got {value!r}")
        try:
            number = tp(value) if isinstance(value, str) else value
        except ValueError:
            expected = "an integer" if tp is int else "a float"
            raise ConfigError(f"`{key}` must be {expected}, got {value!r}") from None
        if tp is int and not isinstance(number, int):
            raise ConfigError(f"`{key}` must be an integer, got {value!r}")
        if not isinstance(number, (int, float)):
            raise ConfigError(f"`{key}` must be a {tp.__name__}, got {value!r}")
        return tp(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module

