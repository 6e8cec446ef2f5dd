"""Build frozen config dataclasses from plain mappings (YAML, JSON): unknown keys and wrong types are
ConfigErrors naming the key. Shared by node configs (deploy/) and model manifests (model/)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from moeswarm.protocol.errors import ConfigError


def build(cls: type, data: Any, prefix: str = ""):
    """Build dataclass `cls` from a mapping, converting nested sections; raise ConfigError on bad input."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; known keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def _convert(hint: Any, value: Any, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _convert(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(errors) == 1 else f"{key}={value!r}: matches none of the allowed forms")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(map(repr, args))}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return tuple(_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}={value!r}: expected null")
    return _convert_scalar(hint, value, key)


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert_scalar(hint: Any, value: Any, key: str):
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}={value!r}: expected {getattr(hint, '__name__', hint)}")
