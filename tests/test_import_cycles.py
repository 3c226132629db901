"""No import cycle in `src/datasteer`, type-checking and function-level imports included (issue #33).

A cycle means two modules cannot be read, tested or changed apart; a type-checking one still makes a reader hold
both. The graph is read from the source by `scripts/code_shape.py` (`python scripts/code_shape.py` also prints the
largest class and function and the median function length). The small graphs below check the finder itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from code_shape import SRC, import_cycles, import_graph, measures


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "datasteer" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_src_has_no_import_cycle():
    cycles = import_cycles(import_graph(SRC))
    assert cycles == [], "import cycles (break each by moving the shared contract to a module both may import):\n" + (
        "\n".join(" -> ".join(c) for c in cycles)
    )


def test_the_finder_sees_type_checking_function_level_and_reexported_imports(tmp_path):
    src = write(
        tmp_path,
        {
            "__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from datasteer.b import B\n",
            "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from datasteer.b import B\n",
            "b.py": "def f():\n    import datasteer.c\n",
            "c.py": "from datasteer import B\n",  # the package re-exports B from b: c -> b
            "d.py": "import datasteer\nfrom datasteer.data import x\n",
            "data/__init__.py": "x = 1\n",
            "data/e.py": "from datasteer.data import x\n",  # its own package: no edge
        },
    )
    graph = import_graph(src)
    assert graph["datasteer.a"] == {"datasteer.b"}
    assert graph["datasteer.b"] == {"datasteer.c"}
    assert graph["datasteer.c"] == {"datasteer.b"}
    assert graph["datasteer.d"] == {"datasteer.data"}  # an ancestor package is no edge; a sibling package is
    assert graph["datasteer.data.e"] == set()
    assert import_cycles(graph) == [["datasteer.b", "datasteer.c", "datasteer.b"]]


def test_every_elementary_cycle_is_reported_once():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"a"}, "d": {"d", "a"}}
    assert import_cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"], ["d", "d"]]


def test_function_length_counts_the_body_without_the_docstring(tmp_path):
    src = write(
        tmp_path,
        {
            "__init__.py": "",
            "m.py": 'class K:\n    def f(self):\n        """Doc.\n\n        More."""\n        x = 1\n'
            "        return x\n",
        },
    )
    classes, functions = measures(src)
    assert [(m.name, m.lines) for m in classes] == [("datasteer.m:K", 7)]
    assert [(m.name, m.lines) for m in functions] == [("datasteer.m:K.f", 2)]
