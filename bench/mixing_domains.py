"""Real-text pretraining domains built at run time from text on this machine (never committed as data).

Why: the demo corpus is synthetic, and a mixer's decisions on it say little about real text. Every machine that
runs datasteer has Python's standard library; Debian-based ones also have changelogs, licence texts, man pages
and C headers. Each domain below is a list of (source key, text) documents; `build` splits them by a hash of the
source key (a file, or a pydoc topic) into training and held-out files, so no held-out document shares a file
with a training one, and writes `{"text": ...}` jsonl per domain.

    python bench/mixing_domains.py /tmp/md code docstrings changelogs   # writes the files, prints the counts
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import random
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or loaded by path from the tests
from realtext_task import SKIP_PARTS

DOC_CHARS = 1200  # characters per document: a few 64-token blocks each
EVAL_SHARE = 8  # one source in EVAL_SHARE (by hash) is held out
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Corpus:
    """Paths of the built domains and what their training side read."""

    train: dict[str, Path]  # domain -> jsonl of {"text"} training documents
    eval: dict[str, Path]  # domain -> jsonl of held-out documents (other sources than any training document)
    counts: dict[str, dict[str, int]]  # domain -> {"train": docs, "eval": docs}
    stdlib_modules: frozenset[str]  # stdlib modules a training document was taken from (for the harness's exclude)


def module_name(path: Path) -> str:
    """`json.decoder` for .../python3.11/json/decoder.py (the naming of `realtext_task.stdlib_functions`)."""
    return ".".join(path.relative_to(STDLIB).with_suffix("").parts).removesuffix(".__init__")


def stdlib_files() -> list[Path]:
    """The stdlib's own .py files in a fixed order, without tests and bundled packages."""
    return [p for p in sorted(STDLIB.rglob("*.py")) if not SKIP_PARTS & set(p.relative_to(STDLIB).parts)]


def chunks(text: str, size: int = DOC_CHARS) -> Iterator[str]:
    """Consecutive pieces of about `size` characters, cut at line ends (a long line is cut where it must)."""
    piece: list[str] = []
    length = 0
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            yield line[:size]
            line = line[size:]
        if length + len(line) > size and piece:
            yield "".join(piece)
            piece, length = [], 0
        piece.append(line)
        length += len(line)
    if "".join(piece).strip():
        yield "".join(piece)


def _read(path: Path) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def code_docs() -> Iterator[tuple[str, str]]:
    """Python source of the stdlib, as written (comments and docstrings included)."""
    for path in stdlib_files():
        yield str(path), _read(path) or ""


def docstring_docs() -> Iterator[tuple[str, str]]:
    """Every docstring of a stdlib file (module, classes, functions), one after another."""
    for path in stdlib_files():
        try:
            tree = ast.parse(_read(path) or "")
        except (SyntaxError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)]
        yield str(path), "\n\n".join(d for d in (ast.get_docstring(n) for n in nodes) if d)


def topic_docs() -> Iterator[tuple[str, str]]:
    """Python's language reference as pydoc ships it (pydoc_data/topics.py), one topic per source."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]


def _files(pattern_root: str, pattern: str) -> Callable[[], Iterator[tuple[str, str]]]:
    def docs() -> Iterator[tuple[str, str]]:
        for path in sorted(Path(pattern_root).glob(pattern)):
            yield str(path), _read(path) or ""

    return docs


def license_docs() -> Iterator[tuple[str, str]]:
    """Licence texts: /usr/share/common-licenses and the packages' Debian copyright files."""
    yield from _files("/usr/share/common-licenses", "*")()
    yield from _files("/usr/share/doc", "*/copyright")()


DOMAINS: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "code": code_docs,
    "docstrings": docstring_docs,
    "topics": topic_docs,
    "changelogs": _files("/usr/share/doc", "*/changelog.Debian.gz"),
    "licenses": license_docs,
    "man": _files("/usr/share/man/man1", "*.1.gz"),
    "headers": _files("/usr/include", "**/*.h"),
}


def is_held_out(key: str) -> bool:
    """Whether a source is on the held-out side: a hash of its key, the same on every machine and run."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % EVAL_SHARE == 0


def split_domain(name: str, seed: int, train_docs: int, eval_docs: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(training (key, doc) pairs, held-out docs) of one domain: sources shuffled by seed, chunked, capped."""
    sources = [(k, t) for k, t in DOMAINS[name]() if t.strip()]
    random.Random(f"mixing:{seed}:{name}").shuffle(sources)
    train: list[tuple[str, str]] = []
    held: list[str] = []
    for key, text in sources:
        side_full = len(held) >= eval_docs if is_held_out(key) else len(train) >= train_docs
        if side_full:
            continue
        pieces = list(chunks(text))[:16]  # at most 16 pieces of one source: a domain spans many sources
        if is_held_out(key):
            held += pieces[: eval_docs - len(held)]
        else:
            train += [(key, p) for p in pieces[: train_docs - len(train)]]
        if len(train) >= train_docs and len(held) >= eval_docs:
            break
    if len(train) < train_docs or len(held) < eval_docs:
        raise SystemExit(
            f"domain {name!r}: this machine gave {len(train)} training and {len(held)} held-out documents; "
            f"need {train_docs} and {eval_docs} (choose other --domains, or fewer documents)"
        )
    return train, held


def build(folder: str | Path, names: list[str], seed: int = 0, train_docs: int = 300, eval_docs: int = 24) -> Corpus:
    """Write `train/<domain>.jsonl` and `eval/<domain>.jsonl` under `folder` for each domain of `names`."""
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise SystemExit(f"unknown domains {unknown}; choose from {', '.join(DOMAINS)}")
    folder = Path(folder)
    train, held, counts, modules = {}, {}, {}, set()
    for name in names:
        docs, eval_texts = split_domain(name, seed, train_docs, eval_docs)
        modules |= {module_name(Path(k)) for k, _ in docs if k.startswith(str(STDLIB))}
        train[name] = _write(folder / "train" / f"{name}.jsonl", [t for _, t in docs])
        held[name] = _write(folder / "eval" / f"{name}.jsonl", eval_texts)
        counts[name] = {"train": len(docs), "eval": len(eval_texts)}
    return Corpus(train, held, counts, frozenset(modules))


def _write(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


if __name__ == "__main__":
    corpus = build(sys.argv[1], sys.argv[2:] or ["code", "docstrings", "changelogs"])
    print(json.dumps(corpus.counts))
