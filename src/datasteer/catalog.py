"""The built-in components read from their source files, for `datasteer components` without importing them.

Importing the selectors, mixers and weighters imports torch and transformers (seconds on a small machine) only to
print their names, summaries and parameters. Those are all in the source: the `@register(kind, name)` decorator,
the class docstring (its `Args:` section) and the constructor's signature. This module reads them with `ast`,
following base classes inside the package, so the listing is the one `registry` would give (a test compares the
two for every built-in). Whatever it cannot read without running code (a default computed by an expression, a
base class from elsewhere, an installed plugin) makes it return None, and the caller imports as before.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasteer.errors import unknown_choice
from datasteer.registry import _PACKAGES, ENTRY_POINT_GROUP, Kind, Param, _arg_docs

_BASES = "datasteer.components"  # Component, Selector, Mixer, Weighter


@dataclass(frozen=True)
class Entry:
    """One registered component as the source declares it (annotations as source text)."""

    name: str
    doc: str
    params: list[Param]
    requires_target: bool


class Unreadable(Exception):
    """The source needs running to be read: fall back to importing it."""


def builtin(kind: Kind) -> dict[str, Entry] | None:
    """The kind's built-in components by name (sorted), or None when a plugin may add some or the source cannot
    be read statically."""
    from importlib.metadata import entry_points

    if list(entry_points(group=ENTRY_POINT_GROUP)):
        return None
    try:
        classes = {**_classes(_module_file(_BASES)), **_package_classes(_PACKAGES[kind])}
        found = {name: _entry(name, item, classes) for item in classes.values() if (name := _registered(item, kind))}
    except (Unreadable, OSError, SyntaxError):
        return None
    return dict(sorted(found.items()))


def lookup(kind: Kind, name: str, where: str = "") -> Entry:
    """One component as `datasteer init` needs it: from the source when it can, else imported; an unknown name
    is the registry's error (with its suggestion)."""
    entries = builtin(kind)
    if entries is None:
        from datasteer import registry

        cls = registry.get(kind, name, where)
        doc = (inspect.getdoc(cls) or "").split("\n")[0]
        return Entry(name, doc, registry.params_of(cls), bool(cls.requires_target))
    if name not in entries:
        raise unknown_choice(kind, name, entries, where)
    return entries[name]


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise Unreadable(module)
    return Path(spec.origin)


def _package_classes(package: str) -> dict[str, tuple[ast.ClassDef, dict[str, Any]]]:
    spec = importlib.util.find_spec(package)  # the package's __init__ only (empty): no component module runs
    if spec is None or not spec.submodule_search_locations:
        raise Unreadable(package)
    out: dict[str, tuple[ast.ClassDef, dict[str, Any]]] = {}
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("*.py")):
            found = _classes(path)
            if set(found) & set(out):  # a base class named twice: which one a subclass means needs the imports
                raise Unreadable(f"class {sorted(set(found) & set(out))[0]} defined twice in {package}")
            out.update(found)
    return out


def _classes(path: Path) -> dict[str, tuple[ast.ClassDef, dict[str, Any]]]:
    """Each top-level class of a file with the file's constants (for defaults and annotations that name one)."""
    tree = ast.parse(path.read_text(), str(path))
    constants = _constants(tree)
    return {n.name: (n, constants) for n in tree.body if isinstance(n, ast.ClassDef)}


def _constants(tree: ast.Module) -> dict[str, Any]:
    """Module-level names with a literal value (`MODEL = "..."`, `LIMIT = 2**24`, also imported from another
    datasteer module), and type aliases (`Strategy = Literal[...]`) as `Source` text."""
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("datasteer."):
            theirs = _file_constants(_source_file(node.module))
            out.update({a.asname or a.name: theirs[a.name] for a in node.names if a.name in theirs})
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = _literal(node.value, out)
            except Unreadable:
                out[node.targets[0].id] = Source(_alias_text(node.value, out))
    return out


_PARSING: set[Path] = set()


@functools.cache
def _file_constants(path: Path) -> dict[str, Any]:
    if path in _PARSING:  # modules that import each other: the names of the one being read are not known yet
        raise Unreadable(f"import cycle through {path}")
    _PARSING.add(path)
    try:
        return _constants(ast.parse(path.read_text(), str(path)))
    finally:
        _PARSING.discard(path)


def _source_file(module: str) -> Path:
    """A datasteer module's file, found from the package folder: `find_spec` would run the parents' __init__."""
    root = _module_file("datasteer").parent
    base = root.joinpath(*module.split(".")[1:])
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _literal(node: ast.expr, constants: dict[str, Any]) -> Any:
    """A literal, a known constant, or arithmetic on them (`(1 / 3, 2 / 3)`, `2**24`, `-1.0`)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants and not isinstance(constants[node.id], Source):
        return constants[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_literal(e, constants) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
        return {_literal(k, constants): _literal(v, constants) for k, v in zip(node.keys, node.values)}  # type: ignore[arg-type]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, constants)
        return -value if isinstance(node.op, ast.USub) else +value
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a**b}  # fmt: skip
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        left, right = _literal(node.left, constants), _literal(node.right, constants)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            return ops[type(node.op)](left, right)
    raise Unreadable(ast.unparse(node))


def _registered(item: tuple[ast.ClassDef, dict[str, Any]], kind: str) -> str | None:
    """The name a class is registered under for `kind` (`@register("selector", "less")`), or None."""
    for deco in item[0].decorator_list:
        if isinstance(deco, ast.Call) and getattr(deco.func, "id", getattr(deco.func, "attr", "")) == "register":
            args = [_literal(a, {}) for a in deco.args]
            if len(args) == 2 and args[0] == kind:
                return str(args[1])
    return None


def _chain(item: tuple[ast.ClassDef, dict[str, Any]], classes: dict) -> list[tuple[ast.ClassDef, dict[str, Any]]]:
    """The class and its bases in method resolution order, as far as the package defines them."""
    out, todo = [], [item]
    while todo:
        current = todo.pop(0)
        out.append(current)
        for base in current[0].bases:  # `Base` or `module.Base` (a sibling module of the package)
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", None)
            if name in classes:
                todo.append(classes[name])
            elif name not in ("object", "Component"):
                raise Unreadable(f"base {ast.unparse(base)} of {current[0].name}")
    return out


def _entry(name: str, item: tuple[ast.ClassDef, dict[str, Any]], classes: dict) -> Entry:
    chain = _chain(item, classes)
    doc = next((d for node, _ in chain if (d := ast.get_docstring(node))), "") or ""
    init = next(((node, consts) for cls, consts in chain for node in cls.body if _is_init(node)), None)
    params = _params(*init, _arg_docs(doc)) if init else []
    return Entry(name, doc.split("\n")[0], params, bool(_class_value(chain, "requires_target", False)))


def _is_init(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and node.name == "__init__"


def _class_value(chain: list, attr: str, default: Any) -> Any:
    for cls, _ in chain:
        for node in cls.body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if getattr(target, "id", None) == attr and node.value is not None:
                return _literal(node.value, {})
    return default


def _params(init: ast.FunctionDef, constants: dict[str, Any], docs: dict[str, str]) -> list[Param]:
    """The constructor's parameters after `self`, as `registry.params_of` lists them."""
    a = init.args
    if a.vararg or a.kwarg or a.posonlyargs:
        raise Unreadable(f"{init.name} takes *args/**kwargs or positional-only parameters")
    positional = a.args[1:]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    pairs = [*zip(positional, defaults), *zip(a.kwonlyargs, a.kw_defaults)]
    return [Param(a.arg, _annotation(a, constants), _default(d, constants), docs.get(a.arg, "")) for a, d in pairs]


def _annotation(arg: ast.arg, constants: dict[str, Any]) -> Any:
    return inspect.Parameter.empty if arg.annotation is None else Source(_alias_text(arg.annotation, constants))


def _alias_text(node: ast.expr, constants: dict[str, Any]) -> str:
    """An annotation as `str()` prints it once evaluated: aliases replaced by what they name, and `A | B` with a
    typing form in it (`Literal[...] | list[float]`) as `Union[...]` (`Optional[...]` with None), since Python
    makes such a union a `typing.Union`; unions of plain types stay `int | None`."""
    if isinstance(node, ast.Name) and isinstance(constants.get(node.id), Source):
        return str(constants[node.id])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = _union_parts(node)
        texts = [_alias_text(p, constants) for p in parts]
        typing_form = any(isinstance(p, ast.Subscript) and getattr(p.value, "id", "") in _TYPING for p in parts)
        aliased = any(isinstance(p, ast.Name) and isinstance(constants.get(p.id), Source) for p in parts)
        if not (typing_form or aliased):
            return " | ".join(texts)
        others = [t for t in texts if t != "None"]
        if len(others) == 1 and len(texts) == 2:
            return f"Optional[{others[0]}]"
        return f"Union[{', '.join(texts)}]"
    return ast.unparse(node)


_TYPING = {"Literal", "Optional", "Union", "Annotated", "Callable"}


def _union_parts(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return [*_union_parts(node.left), *_union_parts(node.right)]
    return [node]


def _default(node: ast.expr | None, constants: dict[str, Any]) -> Any:
    if node is None:
        return inspect.Parameter.empty
    try:
        return _literal(node, constants)
    except Unreadable:
        raise Unreadable(f"default {ast.unparse(node)}") from None


class Source(str):
    """An annotation as written in the source (`int | None`), printed as such by `datasteer components`."""
