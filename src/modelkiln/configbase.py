"""The config base every stage builds on: the model base, YAML, ``--set`` and error lines.

Core (imports nothing of modelkiln but :mod:`modelkiln.errors`), so a stage's
config module imports it without pulling in the pipeline config or any other
stage. :func:`load_section` is the one loader: YAML file (or given data) ->
``--set`` overrides -> validation, with pydantic's report turned into one line.

Example:
    >>> cfg = load_section(ServeConfig, "serve.yaml", ["port=8001"], label="serve config")
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from modelkiln.errors import ConfigError

__all__ = [
    "FieldError",
    "KilnModel",
    "apply_overrides",
    "format_validation_error",
    "load_section",
    "parse_override",
    "read_yaml",
]

M = TypeVar("M", bound=BaseModel)


class KilnModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FieldError(ValueError):
    """Raise from a model-level validator to name the field and the fix.

    pydantic reports ``@model_validator`` failures at the root (no field), so the error
    line could only say ``<root>``; this carries the field and hint through to
    :func:`format_validation_error`.

    Example:
        >>> raise FieldError("replicas_min", "3 > replicas_max (2)", hint="lower replicas_min")
    """

    def __init__(self, field: str, message: str, *, hint: str) -> None:
        super().__init__(message)
        self.field = field
        self.hint = hint


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(
            f"bad override {item!r}", hint="write overrides as --set section.field=value"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return ``data`` with every ``a.b=value`` override applied (creating sections)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: '{part}' is a value, not a section",
                    hint="check the key path against the config reference (kiln pipeline --help)",
                )
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(err: ValidationError, source: str) -> ConfigError:
    """Turn pydantic's report into one line naming the field, the bad value and the fix."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        at = f"{field}.{cause.field}" if first["loc"] else cause.field
        message = f"{source}: {at}: {cause}"
        hint = cause.hint
    elif first["type"] == "extra_forbidden":
        message = f"{source}: unknown field '{field}'"
        hint = "remove it or check its spelling against the stage's config reference"
    elif first["type"] == "missing":
        message = f"{source}: missing field '{field}'"
        hint = f"add '{field}' to the config"
    else:
        reason = first["msg"].removeprefix("Value error, ")
        message = f"{source}: {field} = {first.get('input')!r} is invalid: {reason}"
        hint = f"set a valid value, e.g. --set {field}=..."
    more = len(err.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(message, hint=hint)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, raising :class:`ConfigError` with the file name on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist", hint="pass an existing YAML file"
        )
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})", hint="fix the YAML syntax") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping", hint="write 'key: value' lines")
    return loaded


def load_section(
    model: type[M],
    source: str | Path | dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    *,
    section: str | None = None,
    named: dict[str, Any] | None = None,
    drop: Collection[str] = (),
    label: str = "config",
) -> M:
    """Validate ``model`` from a YAML file (or a mapping) plus ``a.b=value`` overrides.

    Precedence: model defaults < file < overrides < ``named`` (CLI flags, None skipped).

    Args:
        model: the pydantic model (a stage's config section or a job config).
        source: YAML file, an already-read mapping, or None (the model's defaults).
        overrides: ``--set`` items applied after the file.
        section: when the file is a whole pipeline config, read its ``section:`` mapping;
            overrides may then carry the ``section.`` prefix.
        named: values applied last (None values skipped).
        drop: top-level keys to ignore (keys that belong to another config).
        label: how errors name the source when it is not a file.

    Raises:
        ConfigError: the file is missing or malformed, or a field is unknown or invalid.
    """
    if isinstance(source, dict):
        raw = dict(source)
    else:
        raw = read_yaml(source) if source is not None else {}
        label = str(source) if source is not None else label
    items = list(overrides or [])
    if section is not None:
        if isinstance(raw.get(section), dict):
            raw = raw[section]
        items = [o.removeprefix(f"{section}.") for o in items]
    raw = apply_overrides({k: v for k, v in raw.items() if k not in drop}, items)
    raw.update({k: v for k, v in (named or {}).items() if v is not None})
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise format_validation_error(exc, label) from None
