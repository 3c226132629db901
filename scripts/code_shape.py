"""The shape of `src/datasteer`: import cycles, largest class, largest function, median function length.

`python scripts/code_shape.py` prints the figures that issue #33 reports; `tests/test_import_cycles.py` runs
`import_cycles` so a cycle cannot come back. Everything is read from the source with `ast`, nothing is imported.

Import edges: every `import` / `from ... import` of a `datasteer` module anywhere in a file (module level, inside
functions, and under `if TYPE_CHECKING:` alike: a type-checking import is a dependency a reader has to hold too).
A name imported from a package resolves to the module the package's `__init__` re-exports it from (the lazy
`__getattr__` tables of `datasteer` and `datasteer.data`); an import of a module's own ancestor package adds no
edge, since Python has run that package before the module.

Lengths: a class counts all its lines, `class` to its last line; a function counts its body without the docstring
(as STYLE.md counts), so a 3-line docstring over a 50-line body is a 50-line function.
"""

from __future__ import annotations

import ast
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ROOT_PACKAGE = "datasteer"


@dataclass(frozen=True)
class Measure:
    """One class or function: where it is and how many lines it has."""

    name: str  # module:Qualified.name
    lines: int


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` file of the package (a package is its `__init__.py`)."""
    found = {}
    for path in sorted((src / ROOT_PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _reexports(trees: dict[str, ast.Module], known: dict[str, Path]) -> dict[tuple[str, str], str]:
    """(package, name) -> the module a package's `__init__` imports `name` from."""
    table = {}
    for name, tree in trees.items():
        if known[name].name != "__init__.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in known:
                for alias in node.names:
                    table[name, alias.asname or alias.name] = node.module
    return table


def _targets(node: ast.Import | ast.ImportFrom, known: dict[str, Path], reexports: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level or node.module not in known:  # relative imports: none in datasteer; third-party modules
        return []
    out = []
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        out.append(sub if sub in known else reexports.get((node.module, alias.name), node.module))
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the datasteer modules it imports (type-checking and function-level imports included)."""
    known = modules(src)
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in known.items()}
    reexports = _reexports(trees, known)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, known, reexports):
                    if target != name and not name.startswith(target + "."):  # not itself, not an ancestor
                        graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle of the graph, as a closed path `a -> b -> ... -> a` starting at its smallest module.

    A depth-first search from each module over the modules after it (in sorted order) finds each cycle exactly
    once; datasteer's graph (~100 modules, a few hundred edges) makes that instant.
    """
    order = sorted(graph)
    rank = {name: i for i, name in enumerate(order)}
    cycles = []
    for start in order:
        path, on_path = [start], {start}
        work = [iter(sorted(graph[start]))]
        while work:
            child = next(work[-1], None)
            if child is None:
                work.pop()
                on_path.discard(path.pop())
            elif child == start:
                cycles.append([*path, start])
            elif child not in on_path and rank[child] > rank[start]:
                path.append(child)
                on_path.add(child)
                work.append(iter(sorted(graph[child])))
    return cycles


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return body[-1].end_lineno - body[0].lineno + 1


def measures(src: Path = SRC, skip: tuple[str, ...] = ()) -> tuple[list[Measure], list[Measure]]:
    """(classes, functions) of every module but those in `skip` (dotted names)."""
    classes, functions = [], []
    for name, path in modules(src).items():
        if name in skip:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        _walk(tree, name, "", classes, functions)
    return classes, functions


def _walk(node: ast.AST, module: str, prefix: str, classes: list[Measure], functions: list[Measure]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            qual = f"{prefix}{child.name}"
            classes.append(Measure(f"{module}:{qual}", child.end_lineno - child.lineno + 1))
            _walk(child, module, qual + ".", classes, functions)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            qual = f"{prefix}{child.name}"
            functions.append(Measure(f"{module}:{qual}", _body_lines(child)))
            _walk(child, module, qual + ".", classes, functions)
        else:
            _walk(child, module, prefix, classes, functions)


def report(src: Path = SRC) -> str:
    """The figures of issue #33, one per line."""
    classes, functions = measures(src)
    cycles = import_cycles(import_graph(src))
    top_classes = sorted(classes, key=lambda m: -m.lines)[:3]
    top_functions = sorted(functions, key=lambda m: -m.lines)[:3]
    lines = [
        "largest classes: " + ", ".join(f"{m.name} ({m.lines} lines)" for m in top_classes),
        "largest functions: " + ", ".join(f"{m.name} ({m.lines} body lines)" for m in top_functions),
        f"median function body: {statistics.median(m.lines for m in functions):g} lines "
        f"over {len(functions)} functions",
        f"functions over 50 body lines: {sum(m.lines > 50 for m in functions)}"
        + "".join(f"\n  {m.name} ({m.lines})" for m in sorted(functions, key=lambda m: -m.lines) if m.lines > 50),
        "classes over 250 lines: " + (", ".join(f"{m.name} ({m.lines})" for m in classes if m.lines > 250) or "none"),
        f"import cycles: {len(cycles)}" + "".join("\n  " + " -> ".join(c) for c in cycles),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC))
