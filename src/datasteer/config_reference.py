"""Generate the config reference (docs/config.md) from the schema itself, so it cannot drift.

`python -m datasteer.config_reference > docs/config.md` rewrites it; a test checks it is current.
"""

from __future__ import annotations

import inspect
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from datasteer import registry
from datasteer.config import Config
from datasteer.validation import StrictModel


def _type_name(annotation: object) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("datasteer.data.config.", "").replace("NoneType", "None")


def _nested(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, StrictModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested(arg)
        if found is not None:
            return found
    return None


def _section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    out += [
        f"## `{prefix}`",
        "",
        inspect.getdoc(model) or "",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    children = []
    for name, field in model.model_fields.items():
        if field.is_required():
            default = "**required**"
        elif field.default_factory is not None:
            default = f"`{field.default_factory()!r}`"
        else:
            default = f"`{field.default!r}`" if field.default is not PydanticUndefined else ""
        doc = (field.description or "").replace("|", "\\|")
        out.append(f"| `{name}` | `{_type_name(field.annotation)}` | {default} | {doc} |")
        child = _nested(field.annotation)
        if child is not None:
            children.append((child, f"{prefix}.{name}"))
    out.append("")
    for child, path in children:
        _section(child, path, out)


def _components(out: list[str]) -> None:
    out += ["## Components", "", "Give a component by name or as `{name: ..., <params>}`.", ""]
    for kind in registry.KINDS:
        out += [f"### {kind}s", ""]
        for name, cls in registry.components(kind).items():
            summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
            out += [f"- **`{name}`**: {summary}"]
            for p in registry.params_of(cls):
                default = "required" if p.required else f"default `{p.default!r}`"
                out.append(f"  - `{p.name}` ({default}): {p.doc}")
        out.append("")


def reference_markdown() -> str:
    out = [
        "# Configuration reference",
        "",
        "*Generated from the schema by `python -m datasteer.config_reference`; do not edit by hand.*",
        "",
        "A run's YAML has four sections. Every key is validated; an unknown key is an error naming the",
        "closest valid one. Override any key from the command line: `datasteer train cfg.yaml train.max_steps=50`.",
        "",
    ]
    for name, field in Config.model_fields.items():
        child = _nested(field.annotation)
        if child is not None:
            _section(child, name, out)
        else:
            out += [f"## `{name}`", "", field.description or "", ""]
    _components(out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
