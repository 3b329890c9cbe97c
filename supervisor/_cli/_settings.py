"""Layered configuration: a TOML file, then ``SUPERVISOR_*`` variables, then flags.

Each layer is plain data keyed by :class:`WorkerConfig` field names; later
layers win. Values from the environment are text and are converted by the
field's type; TOML values must already have the right type. Unknown keys and
values of the wrong type are :class:`ConfigError`\\ s naming the key (the CLI
turns them into exit code 2), never ignored.

Secrets: ``SUPERVISOR_ENVIRONMENT_KEY`` may be given as
``SUPERVISOR_ENVIRONMENT_KEY_FILE`` (a path, re-read on 401); any other
``SUPERVISOR_X`` may likewise be ``SUPERVISOR_X_FILE`` whose content is the value.
The key and its file are one setting: a later layer's choice replaces an earlier
layer's, and naming both in one layer is an error (which one was meant?).

``SUPERVISOR_CONFIG`` names the TOML file when ``--config`` does not.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .._base._exceptions import ConfigError
from .._worker._config import WorkerConfig

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "config_from_layers",
    "config_path_from_environment",
    "read_environment",
    "read_toml",
]

ENV_PREFIX = "SUPERVISOR_"
#: The variable naming the TOML file (``--config`` wins over it).
CONFIG_ENV = "SUPERVISOR_CONFIG"

# Variables with the prefix that are not settings (they belong to agents or the server).
_NOT_SETTINGS = frozenset(
    {
        "SUPERVISOR_WORK_ID",
        "SUPERVISOR_SESSION_ID",
        "SUPERVISOR_WORKSPACE",
        "SUPERVISOR_SESSION_TOKEN",
        "SUPERVISOR_SESSION_CONTROL_PLANE",
        "SUPERVISOR_SESSION_ENVIRONMENT_ID",
        CONFIG_ENV,
        # supervisord (another program that calls itself "supervisor") sets these in
        # the environment of every process it runs, a worker included.
        "SUPERVISOR_ENABLED",
        "SUPERVISOR_PROCESS_NAME",
        "SUPERVISOR_GROUP_NAME",
        "SUPERVISOR_SERVER_URL",
    }
)
_KEY_FIELDS = ("environment_key", "environment_key_file")


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
        if name.lower().endswith("retention"):
            return text  # a duration ("7d"); the setting converts it and names a bad one
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number of seconds, got {text!r}", key=name) from None
    return text


def config_path_from_environment(environ: Mapping[str, str]) -> Path | None:
    """The TOML file ``SUPERVISOR_CONFIG`` names, if it names one."""
    value = environ.get(CONFIG_ENV, "").strip()
    return Path(value) if value else None


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
    """Merge the layers (later ones win) and build a validated ``WorkerConfig``.

    Raises:
        ConfigError: naming the key, for an unknown key, a value of the wrong
            type, or a value the setting cannot take.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        present = {k: v for k, v in layer.items() if v is not None}
        given = [k for k in _KEY_FIELDS if present.get(k) not in (None, "")]
        if len(given) == 2:
            raise ConfigError(
                "give the environment key or a file holding it, not both", key=given[1]
            )
        if given:
            for name in _KEY_FIELDS:
                merged.pop(name, None)
        merged.update(present)
    types = _field_types()
    for name, value in merged.items():
        if name not in types:
            continue  # from_mapping names it
        merged[name] = _check_type(name, value, types[name])
    return WorkerConfig.from_mapping(merged)


def _check_type(name: str, value: Any, type_text: str) -> Any:
    """``value`` in the field's type (numbers widened to float), or a ``ConfigError``."""
    if type_text.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type_text == "bool" and not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {value!r}", key=name)
    if type_text.startswith("str") and not isinstance(value, str):
        raise ConfigError(f"expected text, got {value!r}", key=name)
    if type_text.startswith("Path") and not isinstance(value, str | os.PathLike):
        raise ConfigError(f"expected a path, got {value!r}", key=name)
    if type_text.startswith("tuple"):
        if isinstance(value, str):
            return (value,)  # one entry; never a tuple of its characters
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"expected a list of strings, got {value!r}", key=name)
        return tuple(value)
    return value
