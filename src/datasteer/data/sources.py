"""Read one configured source (file, folder of files, `save_to_disk` folder) into a `datasets.Dataset`.

Why a module of its own: every way a path can be wrong (missing, unknown suffix, mixed formats,
unreadable, a DatasetDict without a train split) is found here and reported with the config key
that named it, and the same resolution feeds the content digest of the cache, so the cache can never
key on something other than what is actually read.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from datasets import Dataset, DatasetDict, load_from_disk
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from datasteer.boundary import os_failure
from datasteer.data import pretokenized
from datasteer.data.config import SourceConfig
from datasteer.data.token_store import HASH_CHUNK
from datasteer.errors import ConfigError, DatasteerError

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
FORMAT_FAMILY = {"jsonl": "json", "json": "json", "parquet": "parquet", "text": "text", "disk": "disk"}
FORMAT_FAMILY.update({name: name for name in pretokenized.FORMATS})
SUPPORTED = "a .jsonl/.json/.parquet/.txt file, a folder of such files, or a datasets.save_to_disk folder"


@dataclass(frozen=True)
class ResolvedSource:
    """A source after its format is known: `files` are the data files read (empty for a disk folder)."""

    key: str  # config key for messages, e.g. "data.sources[2]"
    path: Path
    format: str  # json | parquet | text | disk
    files: tuple[Path, ...]
    domain: str  # the configured domain, or the file stem / folder name
    sft: dict[str, Any] = field(default_factory=dict)  # sft_format, columns, tags as configured (sft rows)


def resolve(src: SourceConfig, key: str) -> ResolvedSource:
    """Check that the path exists and work out its format and files; errors name `key`."""
    path = Path(src.path).expanduser()
    sft = {"sft_format": src.sft_format, "columns": dict(src.columns), "tags": dict(src.tags)}
    if src.format in pretokenized.FORMATS:  # a Megatron prefix names files, not a path of its own
        files = pretokenized.data_files(path, src.format, key)
        domain = src.domain or (path.name if path.is_dir() else files[0].name.split(".")[0])
        return ResolvedSource(key, path, src.format, files, domain, sft)
    if not path.exists():
        raise ConfigError(
            f"{key}.path = '{src.path}' does not exist (looked in {path.absolute()}). Fix {key}.path or remove "
            f"that source; a source is {SUPPORTED}."
        )
    domain = src.domain or (path.stem if path.is_file() else path.name)
    if path.is_dir() and (src.format == "disk" or (src.format == "auto" and _is_disk(path))):
        return ResolvedSource(key, path, "disk", (), domain, sft)
    if src.format == "disk":
        raise ConfigError(f"{key}: '{path}' is not a datasets.save_to_disk folder (no {' / '.join(DISK_MARKERS)}).")
    files = _data_files(path, src.format, key)
    return ResolvedSource(key, path, FORMAT_FAMILY[_format_of(files[0], src.format, key)], files, domain, sft)


def _is_disk(path: Path) -> bool:
    return any((path / marker).is_file() for marker in DISK_MARKERS)


def _format_of(file: Path, fmt: str, key: str) -> str:
    if fmt != "auto":
        return fmt
    found = SUFFIX_FORMATS.get(file.suffix.lower())
    if found is None:
        raise ConfigError(
            f"{key}: cannot tell the format of '{file}' from its suffix. Set {key}.format to one of "
            "jsonl, json, parquet, text, disk."
        )
    return found


def _data_files(path: Path, fmt: str, key: str) -> tuple[Path, ...]:
    """The file itself, or a folder's files of one format family in sorted (stable-id) order."""
    if path.is_file():
        return (path,)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIX_FORMATS)
    if fmt != "auto":
        files = [p for p in files if FORMAT_FAMILY[SUFFIX_FORMATS[p.suffix.lower()]] == FORMAT_FAMILY[fmt]]
    if not files:
        raise ConfigError(f"{key}: folder '{path}' holds no data files; a source is {SUPPORTED}.")
    families = {FORMAT_FAMILY[SUFFIX_FORMATS[p.suffix.lower()]] for p in files}
    if len(families) > 1:
        raise ConfigError(
            f"{key}: folder '{path}' mixes formats ({', '.join(sorted(families))}); set {key}.format or give "
            "each format its own source."
        )
    return tuple(files)


def read(src: ResolvedSource, hf_cache: Path, max_line_bytes: int = 8 << 20) -> Dataset:
    """Load the rows with `datasets`; its intermediate arrow files go to `hf_cache`, never to $HOME.

    Text files are checked first, streamed: UTF-8, and no line longer than `max_line_bytes` (a jsonl or text
    file; a .json file is one document). A full disk under the reader is an error about that disk, not the file.
    """
    empty = [f for f in src.files if f.stat().st_size == 0]
    if empty and src.format != "disk":
        raise ConfigError(
            f"{src.key}: '{empty[0]}' is empty, so domain '{src.domain}' would have no rows. "
            "Fill the file or remove the source."
        )
    if src.format in ("json", "text"):
        for file in src.files:
            line_limit = max_line_bytes if src.format == "text" or file.suffix.lower() != ".json" else None
            _check_text(file, src.key, line_limit)
    try:
        with quiet():
            if src.format == "disk":
                return _train_split(load_from_disk(str(src.path)), src)
            reader = {"json": Dataset.from_json, "parquet": Dataset.from_parquet, "text": Dataset.from_text}
            return reader[src.format]([str(f) for f in src.files], cache_dir=str(hf_cache))
    except ConfigError:
        raise
    except Exception as err:  # a user-data boundary: malformed JSON, bad parquet, a full disk under the reader
        if os_failure(err) is not None:  # the disk datasets writes its arrow copy to, not the source, failed
            raise DatasteerError(
                f"{src.key}: reading '{src.path}' failed while writing its arrow copy under {hf_cache}: "
                f"{os_failure(err)}"
            ) from None
        where = (
            next((w for f in src.files if (w := _bad_json_line(f) or _mixed_types(f))), "")
            if src.format == "json"
            else ""
        )
        raise ConfigError(
            f"{src.key}: could not read '{src.path}' as {src.format}: {where or _root_cause(err)}"
        ) from err


def _check_text(file: Path, key: str, max_line: int | None) -> None:
    """Text sources must be UTF-8, with no line over `max_line` bytes (None: no limit); the first bad byte or long
    line is named by line, before anything is tokenized.

    Why a pass of our own: pyarrow's JSON reader lets invalid bytes through into strings, which then fail
    deep inside encoding with no file or line, and it parses a 50 MB line into gigabytes of memory before any
    error. Decoding in 16 MiB chunks costs about a second per GB and runs only when a pool is built, not when
    it is opened from the cache.
    """
    decoder, lines, line_start, pos = codecs.getincrementaldecoder("utf-8")(), 0, 0, 0
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line = lines + chunk.count(b"\n", 0, max(err.start, 0)) + 1
                raise ConfigError(
                    f"{key}: '{file}' is not UTF-8 (line {line}: byte 0x{chunk[err.start]:02x} is not valid UTF-8). "
                    f"Re-encode it, e.g. `iconv -f latin1 -t utf-8 '{file}' > fixed.{file.suffix.lstrip('.')}`."
                ) from None
            if max_line is not None:
                line_start = _check_lines(chunk, pos, line_start, lines, max_line, file, key)
            lines += chunk.count(b"\n")
            pos += len(chunk)
        if max_line is not None and pos - line_start > max_line:
            raise _long_line(file, key, lines + 1, pos - line_start, max_line)


def _check_lines(chunk: bytes, pos: int, line_start: int, lines: int, max_line: int, file: Path, key: str) -> int:
    """Raise on the first line of `chunk` longer than `max_line`; returns where the chunk's last line starts."""
    ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + pos  # absolute offsets of the newlines
    starts = np.concatenate(([line_start], ends[:-1] + 1))
    long = np.flatnonzero(ends - starts > max_line)
    if long.size:
        raise _long_line(file, key, lines + int(long[0]) + 1, int(ends[long[0]] - starts[long[0]]), max_line)
    if ends.size == 0 and pos + len(chunk) - line_start > max_line:
        raise _long_line(file, key, lines + 1, pos + len(chunk) - line_start, max_line)
    return int(ends[-1]) + 1 if ends.size else line_start


def _long_line(file: Path, key: str, line: int, size: int, max_line: int) -> ConfigError:
    return ConfigError(
        f"{key}: '{file}' line {line} is longer than data.max_line_bytes ({max_line:,} bytes; it holds {size:,} "
        "or more). Split that document, or raise data.max_line_bytes if such lines are "
        "meant (parsing one takes memory many times its size)."
    )


JSON_TYPES = {"str": "string", "int": "number", "float": "number", "bool": "boolean", "list": "list", "dict": "object"}


def _mixed_types(file: Path) -> str:
    """Where a JSONL column first changes type ("line 11: 'text' holds int where line 1 holds str"), or "".

    Arrow infers one type per column, so a number among strings fails the whole read with a message that names
    neither the line nor the column; this pass runs only after such a failure."""
    if file.suffix.lower() == ".json":
        return ""
    first: dict[str, tuple[str, int]] = {}
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            row = json.loads(line) if line.strip() else {}
            for key, value in row.items() if isinstance(row, dict) else ():
                kind = JSON_TYPES.get(type(value).__name__, type(value).__name__)
                if value is None:
                    continue
                seen = first.setdefault(key, (kind, number))
                if seen[0] != kind:
                    return (
                        f"'{file}' line {number}: the column '{key}' holds a {kind} ({json.dumps(value)[:60]}) "
                        f"where line {seen[1]} holds a {seen[0]}; every row must give it the same type (quote "
                        "numbers meant as text)"
                    )
    return ""


def _bad_json_line(file: Path) -> str:
    """Where a JSON/JSONL file first fails to parse ("line 3: ..."), or "" when every line parses."""
    if file.suffix.lower() == ".json":
        try:
            json.loads(file.read_text(encoding="utf-8"))
            return ""
        except ValueError as err:
            return f"'{file}' is not valid JSON: {err}"
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                if line.strip():
                    json.loads(line)
            except ValueError as err:
                return f"'{file}' line {number} is not valid JSON ({err}): {line.strip()[:80]!r}"
    return ""


def stream(ds: Dataset, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns`, at most `rows` rows each, in row order.

    Why not `ds.iter`: that reads through the memory map, and every page it touches stays resident, so a
    build's memory would grow with the corpus. Reading datasets' own arrow files as streams allocates each
    batch and frees it after use (the file stays in the page cache, which the kernel reclaims).
    """
    files = [f["filename"] for f in ds.cache_files]
    if not files or ds._indices is not None:  # an in-memory or re-indexed dataset: nothing to stream from
        yield from ds.select_columns(columns).with_format("arrow").iter(rows)
        return
    for name in files:
        with pa.OSFile(name) as fh:
            for batch in pa.ipc.open_stream(fh):
                batch = batch.select(columns)
                for start in range(0, batch.num_rows, rows):
                    yield batch.slice(start, rows)


def locate(src: ResolvedSource, row: int) -> str:
    """Where row `row` (0-based, over the source's files in order) is: "'file' line N" for JSON Lines (blank
    lines skipped, as the reader skips them), else "'file' row N" (1-based). Only called to report an error."""
    if src.format == "disk":
        return f"'{src.path}' row {row + 1}"
    for file in src.files:
        n = _rows_in(file, src.format)
        if row < n:
            line = _line_of(file, row) if src.format in ("json", "text") else None
            return f"'{file}' line {line}" if line is not None else f"'{file}' row {row + 1}"
        row -= n
    return f"'{src.path}' row {row + 1}"


def _rows_in(file: Path, fmt: str) -> int:
    if fmt == "parquet":
        return pq.ParquetFile(file).metadata.num_rows
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            return len(data) if isinstance(data, list) else 1
        except ValueError:
            pass  # a .json file of JSON Lines
    with open(file, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _line_of(file: Path, row: int) -> int | None:
    """The 1-based line of the row-th non-blank line, or None for a JSON array file (rows are not lines)."""
    with open(file, encoding="utf-8") as f:
        if file.suffix.lower() == ".json" and f.read(1024).lstrip().startswith("["):
            return None
        f.seek(0)
        seen = -1
        for number, line in enumerate(f, start=1):
            seen += bool(line.strip())
            if seen == row:
                return number
    return None


def _root_cause(err: BaseException) -> str:
    """`datasets` wraps the real failure ("An error occurred while generating the dataset"): name both."""
    root = err
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    return str(err) if root is err else f"{err} (cause: {type(root).__name__}: {root})"


@contextmanager
def quiet() -> Iterator[None]:
    """Silence `datasets` progress bars for small internal reads/writes, restoring the caller's setting."""
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _train_split(loaded: Dataset | DatasetDict, src: ResolvedSource) -> Dataset:
    if isinstance(loaded, Dataset):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    raise ConfigError(
        f"{src.key}: '{src.path}' is a DatasetDict without a 'train' split (splits: {', '.join(loaded)}). "
        "Point the path at one split's folder."
    )


def digest(src: ResolvedSource) -> str:
    """Content hash of what `read` reads: the bytes of every file, names included, streamed.

    A `save_to_disk` folder is hashed like any other source, arrow files included: its `state.json`
    fingerprint and the files' sizes stay the same when a row's text is edited in place, and a key that
    missed such an edit would train on the old text. xxh3-128 runs at several GB/s, so keying a multi-GB
    corpus costs seconds (bench/data_scale.py measures it), and files are read in 1 MiB chunks, never whole.
    """
    h = xxhash.xxh3_128(src.format.encode())
    if src.format == "disk":
        files = sorted(p for p in src.path.rglob("*") if p.is_file())
        root = src.path
    else:
        files, root = list(src.files), src.path if src.path.is_dir() else None
    for file in files:
        h.update(str(file.relative_to(root) if root is not None else file.name).encode())
        h.update(str(file.stat().st_size).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
