"""A real-text selection task built at run time from the running interpreter's standard library.

Why: the demo corpus is synthetic, and on it every target-aware selector looks good (the target's digits are in
one domain only). A task made of real text — Python's own sources and docstrings, which every machine that runs
datasteer has — shows whether a selector finds the rows that teach a target task among rows that look alike.

`build(folder, seed)` parses the stdlib sources with `ast` (no import, no network), keeps the documented public
functions, and writes a mixed sft pool of five instruction task types, one jsonl file (one domain) each:

- `doc`:    "docstring of: def name(args)"      -> the first line of its docstring
- `name`:   "name the function: <docstring>"    -> its name
- `next`:   "next line: <a line of its body>"   -> the line after it
- `module`: "module of: name"                   -> the module that defines it
- `args`:   "arguments of: module.name"         -> its argument list

The target task is one of the types (`name` by default) on held-out functions: no held-out function appears in
any pool row, of any type. Its items are split into `target.jsonl` (what selectors see) and a disjoint
`target_eval.jsonl` (what runs are scored on). Everything is a pure function of (interpreter, seed): the same
interpreter and seed give byte-identical files.

    python bench/realtext_task.py /tmp/rt     # writes the files and prints the counts
"""

from __future__ import annotations

import ast
import functools
import json
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

TYPES: tuple[str, ...] = ("doc", "name", "next", "module", "args")
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
MAX_FIELD = 60  # characters of a prompt's payload or a response (the demo tokenizer is one token per character)


@dataclass(frozen=True)
class Function:
    module: str
    name: str
    args: str  # "(a, b=..., *rest)"
    doc: str  # the first docstring line
    body: tuple[str, ...]  # stripped, short, non-empty body lines after the docstring


@dataclass(frozen=True)
class Task:
    """Paths of a built task and its row counts."""

    pool: dict[str, Path]  # task type -> jsonl of prompt/response rows
    target: Path
    target_eval: Path
    target_type: str
    counts: dict[str, int]


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _args(node: ast.FunctionDef) -> str:
    a = node.args
    names = [p.arg for p in (*a.posonlyargs, *a.args)]
    defaults = len(a.defaults)
    parts = [f"{n}=..." if i >= len(names) - defaults else n for i, n in enumerate(names)]
    if a.vararg:
        parts.append("*" + a.vararg.arg)
    parts += [f"{k.arg}=..." if d is not None else k.arg for k, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        parts.append("**" + a.kwarg.arg)
    return "(" + ", ".join(parts) + ")"


@functools.lru_cache(maxsize=1)
def stdlib_functions() -> tuple[Function, ...]:
    """Every documented public top-level function or method of the stdlib sources, in a fixed order.

    Kept: a name not starting with `_`, a first docstring line of 12-60 printable ASCII characters, an argument
    list of at most 60. Each (module, name) and each docstring line occurs once (the first wins), so a held-out
    item never shares its prompt or answer text with a pool row of the same type by accident."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, seen_key, seen_doc = [], set(), set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = (ast.get_docstring(node) or "").strip().split("\n")[0].strip()
            args = _args(node)
            if not (12 <= len(doc) <= MAX_FIELD and _printable(doc) and len(args) <= MAX_FIELD):
                continue
            key = (module, node.name)
            if key in seen_key or doc in seen_doc:
                continue
            seen_key.add(key)
            seen_doc.add(doc)
            first = node.body[1].lineno if len(node.body) > 1 else node.end_lineno + 1
            body = tuple(
                s
                for s in (ln.strip() for ln in lines[first - 1 : node.end_lineno])
                if s and len(s) <= MAX_FIELD and _printable(s) and not s.startswith("#")
            )
            out.append(Function(module, node.name, args, doc, body))
    return tuple(out)  # cached: parsing the stdlib takes a few seconds, and a process may build several tasks


def rows_of(fn: Function, kind: str, rng: random.Random) -> dict[str, str] | None:
    """One prompt/response row of task type `kind` about `fn` (None when fn cannot give one)."""
    if kind == "doc":
        return {"prompt": f"docstring of: def {fn.name}{fn.args}", "response": fn.doc}
    if kind == "name":
        return {"prompt": f"name the function: {fn.doc}", "response": fn.name}
    if kind == "next":
        if len(fn.body) < 2:
            return None
        i = rng.randrange(len(fn.body) - 1)
        return {"prompt": f"next line: {fn.body[i]}", "response": fn.body[i + 1]}
    if kind == "module":
        return {"prompt": f"module of: {fn.name}", "response": fn.module}
    if kind == "args":
        return {"prompt": f"arguments of: {fn.module}.{fn.name}", "response": fn.args}
    raise ValueError(f"unknown task type {kind!r}; choose from {', '.join(TYPES)}")


def build(
    folder: str | Path,
    seed: int = 0,
    per_type: int = 600,
    target_rows: int = 64,
    target_eval_rows: int = 256,
    target_type: str = "name",
) -> Task:
    """Write the pool (`pool/<type>.jsonl`), `target.jsonl` and `target_eval.jsonl` under `folder`.

    The functions are shuffled by `seed`; the first `target_rows + target_eval_rows` are held out (the target
    task's items, never in the pool), and each task type draws its `per_type` pool rows from the others. A row
    text repeated within a type (two functions with the same body line) is kept once."""
    if target_type not in TYPES:
        raise ValueError(f"target_type must be one of {', '.join(TYPES)}, got {target_type!r}")
    functions = list(stdlib_functions())
    rng = random.Random(f"realtext:{seed}")
    rng.shuffle(functions)
    held = target_rows + target_eval_rows
    if len(functions) < held + per_type:
        raise ValueError(f"the stdlib gave {len(functions)} functions; need {held + per_type} for these sizes")
    held_out, rest = functions[:held], functions[held:]
    folder = Path(folder)
    (folder / "pool").mkdir(parents=True, exist_ok=True)
    pool, counts = {}, {}
    for kind in TYPES:
        order = rest[:]
        random.Random(f"realtext:{seed}:{kind}").shuffle(order)
        rows, texts = [], set()
        for fn in order:
            row = rows_of(fn, kind, rng)
            if row is None or (row["prompt"], row["response"]) in texts:
                continue
            texts.add((row["prompt"], row["response"]))
            rows.append(row)
            if len(rows) == per_type:
                break
        pool[kind] = _write(folder / "pool" / f"{kind}.jsonl", rows)
        counts[kind] = len(rows)
    items = [rows_of(fn, target_type, rng) for fn in held_out]
    target = _write(folder / "target.jsonl", items[:target_rows])
    target_eval = _write(folder / "target_eval.jsonl", items[target_rows:])
    counts.update(target=target_rows, target_eval=target_eval_rows, functions=len(functions))
    return Task(pool, target, target_eval, target_type, counts)


def _write(path: Path, rows: list[dict[str, str] | None]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r is not None))
    return path


if __name__ == "__main__":
    task = build(sys.argv[1] if len(sys.argv) > 1 else "realtext-task")
    print(json.dumps(task.counts))
