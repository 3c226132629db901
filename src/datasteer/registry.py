"""Name → class registry for selectors, mixers and weighters.

A component is registered by decorating its class; `build()` binds user parameters against the
constructor's signature, so an unknown or misspelt parameter is an error with a suggestion rather than
being silently dropped (the reference implementation's registry dropped them). Types are checked with
pydantic against the constructor's annotations.

Components outside this package register the same way, from the user's own module. That module is
imported by a config's top-level `imports: [my_pkg.my_mixer]`, or, for an installed package, through an
entry point in the `datasteer.components` group (loaded the first time components are looked up)::

    [project.entry-points."datasteer.components"]
    my_mixers = "my_pkg.my_mixer"
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from datasteer.errors import ConfigError, did_you_mean, unknown_choice

Kind = Literal["selector", "mixer", "weighter"]
KINDS: tuple[Kind, ...] = ("selector", "mixer", "weighter")
_PACKAGES = {
    "selector": "datasteer.selectors",
    "mixer": "datasteer.mixers",
    "weighter": "datasteer.weighters",
}
_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
ENTRY_POINT_GROUP = "datasteer.components"
_plugins_loaded = False
T = TypeVar("T", bound=type)
log = logging.getLogger(__name__)


def register(kind: Kind, name: str) -> Callable[[T], T]:
    """Class decorator: make the component available as `name` in config files."""

    def wrap(cls: T) -> T:
        if name in _REGISTRY[kind] and _REGISTRY[kind][name] is not cls:
            raise RuntimeError(f"{kind} '{name}' is registered twice ({_REGISTRY[kind][name]} and {cls})")
        _REGISTRY[kind][name] = cls
        cls.registered_name = name
        return cls

    return wrap


def _load_builtin(kind: Kind) -> None:
    """Import every module of the kind's package once, so their `@register` decorators run."""
    package = importlib.import_module(_PACKAGES[kind])
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def import_modules(modules: list[str], where: str = "imports") -> None:
    """Import user modules so that their `@register` decorators run; a module that fails to import is an error.

    Whatever the module raises while importing (a typo, a missing file it reads, a failed assertion) is the
    user's code failing, so it is reported as a config error naming the module and the line, not a traceback.
    """
    for name in modules:
        if not isinstance(name, str) or not name.replace(".", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}: {_module_hint(name)}")
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"{where}: cannot import {name!r} ({err}). Install the package that holds it, or put its folder on "
                "PYTHONPATH; give the module's dotted name (my_pkg.my_mixer), not a file path."
            ) from None
        except Exception as err:  # anything the user's module raises at import
            frame = traceback.extract_tb(err.__traceback__)[-1]
            raise ConfigError(
                f"{where}: importing {name!r} failed inside it: {type(err).__name__}: {str(err)[:300]} (at "
                f"{frame.filename}:{frame.lineno}). Fix the module (`python -c 'import {name}'` shows the whole "
                "traceback)."
            ) from None


def _module_hint(entry: object) -> str:
    """The error for an `imports:` entry that is not a dotted module name, with the name it probably means."""
    text = str(entry)[:200]
    path = Path(text)
    if text.endswith(".py") or "/" in text or "\\" in text:
        folder = str(path.parent) if str(path.parent) not in ("", ".") else "its folder"
        return (
            f"{text!r} is a file path; give a module's dotted name instead: put {folder} on PYTHONPATH and write "
            f"{path.stem!r} (or a package's my_pkg.{path.stem})."
        )
    return f"{text!r} is not a module name; give a dotted name such as my_pkg.my_mixer."


def load_plugins() -> None:
    """Load every `datasteer.components` entry point once (each names a module, or an object in one).

    A plugin that fails to import is reported with a warning and skipped, so one broken package does not
    stop runs that do not use it; its components are then unknown names, with the warning above them.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # any error inside a third-party module's import
            dist = getattr(ep.dist, "name", "?")
            log.warning("datasteer: skipping plugin %r = %r (from %s): %s: %s", ep.name, ep.value, dist,
                        type(err).__name__, err)  # fmt: skip


def components(kind: Kind) -> dict[str, type]:
    """All registered components of a kind: built-in ones, entry-point plugins, and any already registered."""
    _load_builtin(kind)
    load_plugins()
    return dict(sorted(_REGISTRY[kind].items()))


def get(kind: Kind, name: str, where: str = "") -> type:
    """Look a component class up by name; unknown names list the valid ones."""
    found = components(kind)
    if name not in found:
        raise unknown_choice(kind, name, found, where)
    return found[name]


@dataclass(frozen=True)
class Param:
    """One constructor parameter of a component, as shown by `datasteer components`."""

    name: str
    annotation: Any
    default: Any
    doc: str

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def params_of(cls: type) -> list[Param]:
    """The component's parameters with their defaults and the docs from its `Args:` section."""
    docs = _arg_docs(inspect.getdoc(cls) or "")
    sig = inspect.signature(cls.__init__, eval_str=True)
    return [
        Param(p.name, p.annotation, p.default, docs.get(p.name, ""))
        for p in list(sig.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _arg_docs(doc: str) -> dict[str, str]:
    """Parse a Google-style `Args:` section into {name: text}."""
    out: dict[str, str] = {}
    current = None
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        if stripped and not line.startswith(" "):
            break
        if ":" in stripped and line.startswith("    ") and not line.startswith("        "):
            current, text = stripped.split(":", 1)
            current = current.split("(")[0].strip()
            out[current] = text.strip()
        elif current and stripped:
            out[current] += " " + stripped
    return out


def build(kind: Kind, name: str, params: dict[str, Any] | None = None, where: str = "") -> Any:
    """Instantiate a component after checking every parameter name and type against its signature."""
    cls = get(kind, name, where)
    params = dict(params or {})
    loc = f" (at {where})" if where else ""
    accepted = {p.name: p for p in params_of(cls)}
    for key in params:
        if key not in accepted:
            valid = ", ".join(accepted) or "(none)"
            raise ConfigError(
                f"Unknown parameter '{key}' for {kind} '{name}'{loc}.{did_you_mean(key, accepted)} "
                f"Valid parameters: {valid}. See `datasteer components {kind}` for their meaning."
            )
    missing = [p.name for p in accepted.values() if p.required and p.name not in params]
    if missing:
        raise ConfigError(f"{kind} '{name}'{loc} needs the parameter(s) {', '.join(missing)}.")
    for key, value in params.items():
        params[key] = _check_type(accepted[key], value, kind, name, loc)
    try:
        return cls(**params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{kind} '{name}'{loc}: {err}") from err


def _check_type(param: Param, value: Any, kind: str, name: str, loc: str) -> Any:
    if param.annotation is inspect.Parameter.empty:
        return value
    try:
        adapter = TypeAdapter(param.annotation, config=ConfigDict(arbitrary_types_allowed=True))
        return adapter.validate_python(value, strict=False)
    except ValidationError as err:
        msg = err.errors()[0]["msg"]
        raise ConfigError(
            f"Parameter '{param.name}' of {kind} '{name}'{loc} has a bad value {value!r}: {msg}."
        ) from err
