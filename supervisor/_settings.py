"""Layered configuration: a TOML file, then ``SUPERVISOR_*`` variables, then flags.

Each layer is plain data keyed by :class:`WorkerConfig` field names; later
layers win. Values from the environment are text and are converted by the
field's type; TOML values must already have the right type. Unknown keys and
values of the wrong type are :class:`ConfigError`\\ s naming the key (the CLI
turns them into exit code 2), never ignored.

Secrets: ``SUPERVISOR_ENVIRONMENT_KEY`` may be given as
``SUPERVISOR_ENVIRONMENT_KEY_FILE`` (a path, re-read on 401); any other
``SUPERVISOR_X`` may likewise be ``SUPERVISOR_X_FILE`` whose content is the value.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ._config import WorkerConfig
from ._exceptions import ConfigError

__all__ = ["ENV_PREFIX", "config_from_layers", "read_environment", "read_toml"]

ENV_PREFIX = "SUPERVISOR_"

# Variables with the prefix that are not settings (they belong to agents or the server).
_NOT_SETTINGS = frozenset(
    {
        "SUPERVISOR_WORK_ID",
        "SUPERVISOR_SESSION_ID",
        "SUPERVISOR_WORKSPACE",
        "SUPERVISOR_SESSION_TOKEN",
    }
)


def _field_types() -> dict[str, str]:
    return {a.name: str(a.type) for a in attrs.fields(WorkerConfig)}


def _normalise(key: str) -> str:
    return key.strip().replace("-", "_").lower()


def read_toml(path: Path) -> dict[str, Any]:
    """The settings of a TOML file: top-level keys, or a ``[worker]`` table."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"cannot read {str(path)!r}: {exc.strerror or exc}", key="config"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not valid TOML: {exc}", key="config") from None
    if "worker" in data and isinstance(data["worker"], dict):
        extra = sorted(set(data) - {"worker"})
        if extra:
            raise ConfigError(f"unknown setting in {str(path)!r} (outside [worker])", key=extra[0])
        data = data["worker"]
    return {_normalise(k): v for k, v in data.items()}


def _convert(name: str, text: str, type_text: str) -> Any:
    if "bool" in type_text:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected true or false, got {text!r}", key=name)
    if "tuple" in type_text:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if type_text.startswith("int"):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"expected a whole number, got {text!r}", key=name) from None
    if type_text.startswith("float"):
        if text.strip().lower() in ("", "none") and "None" in type_text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number of seconds, got {text!r}", key=name) from None
    return text


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings from ``SUPERVISOR_*`` variables (and their ``*_FILE`` forms)."""
    types = _field_types()
    values: dict[str, Any] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var in _NOT_SETTINGS:
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name == "environment_key_file":
            values[name] = raw
            continue
        text = raw
        if name.endswith("_file") and name[: -len("_file")] in types:
            name = name[: -len("_file")]
            try:
                text = Path(raw).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read {raw!r}: {exc.strerror or exc}", key=var) from None
        if name not in types:
            raise ConfigError("unknown setting (from the environment)", key=var)
        values[name] = _convert(var, text, types[name])
    return values


def config_from_layers(*layers: Mapping[str, Any]) -> WorkerConfig:
    """Merge the layers (later ones win) and build a validated ``WorkerConfig``."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    types = _field_types()
    for name, value in merged.items():
        if name not in types:
            continue  # from_mapping names it
        type_text = types[name]
        if type_text.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
            merged[name] = float(value)
        if type_text == "bool" and not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", key=name)
        if type_text.startswith("str") and not isinstance(value, str):
            raise ConfigError(f"expected text, got {value!r}", key=name)
        if "tuple" in type_text and isinstance(value, list):
            merged[name] = tuple(value)
    return WorkerConfig.from_mapping(merged)
