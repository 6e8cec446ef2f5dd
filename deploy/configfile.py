"""Load YAML into frozen config dataclasses: unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.typed_config import build  # noqa: F401  (re-exported for the CLI)


def load_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(pathlib.Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], flag: str = "--set") -> dict[str, Any]:
    """Apply `--set a.b=value` overrides (value parsed as YAML) to a nested dict, returning a copy.
    `flag`: the option the overrides came from, for error messages."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected key=value, e.g. {flag} port=50051")
        *parents, leaf = key.split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{flag} {key}: {part} is not a section")
        target[leaf] = _parse_value(raw, flag, item)
    return data


def _parse_value(raw: str, flag: str, item: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(
            f"{flag} {item!r}: {raw!r} is not valid YAML ({problem}); write a list as [a, b], or quote a string"
        ) from e


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _deep_copy(value) for key, value in data.items()}
    return data
