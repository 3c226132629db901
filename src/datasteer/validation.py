"""Strict validation shared by every config section and by component parameters.

Pydantic's default is to accept and drop unknown keys; that silence is exactly the bug the design
forbids, so every section derives from `StrictModel` (extra keys are errors) and `format_validation_error`
turns pydantic's report into one paragraph that names the key, the file and the closest valid key.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from datasteer.errors import ConfigError, did_you_mean, short


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys of the (nested) model that owns the location `loc`."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_of(field.annotation)
    return sorted(getattr(current, "model_fields", {})) if current is not None else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """Find a BaseModel inside an annotation such as `Foo | None` or `list[Foo]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str = "") -> ConfigError:
    """Convert a pydantic ValidationError into a ConfigError with one line per problem."""
    where = f" in {source}" if source else ""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, loc)
            hint = did_you_mean(str(loc[-1]), valid)
            lines.append(f"unknown key '{key}'.{hint} Valid keys here: {', '.join(valid)}.")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"'{key}': {msg} (got {short(e.get('input'))}).")
    head = f"Invalid configuration{where}: "
    return ConfigError(head + " ".join(lines))
